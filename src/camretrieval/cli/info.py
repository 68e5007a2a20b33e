"""``camretrieval info``: what an index holds and how it was made, from its catalog and files (no model is loaded)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _folder_bytes(folder: Path, name_part: str | None = None) -> int:
    """The bytes of the files under ``folder`` (those whose name contains ``name_part``, when given)."""
    total = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            if name_part is None or name_part in name:
                try:
                    total += os.stat(os.path.join(directory, name)).st_size
                except OSError:  # deleted meanwhile by a writer
                    pass
    return total


def _maps_formats(shards: Path) -> dict[str, int]:
    """How many shard folders hold maps of each format (storage/maps.py: 2 compressed, 1 float16), by their files."""
    counts: dict[str, int] = {}
    for folder in shards.iterdir() if shards.is_dir() else []:
        found = "2" if (folder / "features_maps.blocks").is_file() else "1" if (folder / "features_maps.npy").is_file() else None
        if found:
            counts[found] = counts.get(found, 0) + 1
    return counts


def index_info(index_dir: str | Path) -> dict[str, Any]:
    """What ``camretrieval info --json`` prints about the index in ``index_dir`` (see README.md)."""
    from camretrieval.method.whitening import PCAWhitening
    from camretrieval.storage.catalog import CATALOG, SHARDS, IndexStore

    index_dir = Path(index_dir)
    store = IndexStore.open(index_dir)
    try:
        meta = store.meta()
        images = store.count_done()
        failures = store.failures()
        last_commit = store.connection.execute(
            "SELECT MAX(t) FROM (SELECT MAX(updated) AS t FROM images UNION ALL SELECT MAX(created) FROM shards)"
        ).fetchone()[0]
    finally:
        store.close()
    whitening = None
    if meta.get("whitening"):
        learned = PCAWhitening.load(index_dir / meta["whitening"])
        recorded = learned.settings
        whitening = {
            "source": "collection" if recorded.get("learned_on") == "collection" else "pca-file",
            "input_dim": learned.input_dim,
            "dim": learned.dim_,
            "n_images": recorded.get("n_images"),
            "n_pca": recorded.get("n_pca"),
            "file": meta["whitening"],
        }
    ann = meta.get("ann")
    # The catalog's files change with every commit, removal and change of search options.
    changed = [p.stat().st_mtime for p in index_dir.glob(CATALOG + "*") if p.name != CATALOG + "-shm"]
    last_change = max(changed + ([last_commit] if last_commit else []))
    root = meta.get("image_root")
    settings = meta.get("settings")
    return {
        "index": str(index_dir),
        "images": images,
        "failed": [{"path": path, "error": error} for path, error in failures],
        "root": root,
        "root_exists": bool(root) and Path(root).is_dir(),
        "settings": settings,
        "whitening": whitening,
        "dim": meta.get("dim"),
        "float16": bool(meta.get("float16")),
        "maps": {
            "stored": bool(meta.get("maps")),
            "bytes": _folder_bytes(index_dir / SHARDS, "_maps") if meta.get("maps") else 0,
            "formats": _maps_formats(index_dir / SHARDS) if meta.get("maps") else {},
        },
        "ann": None if not meta.get("ann_kind") else {
            "kind": meta["ann_kind"],
            "recall_at_100": ann.get("recall_at_100") if ann else None,
            "target": ann.get("target") if ann else meta.get("ann_recall"),
            "effort": (ann.get("effort") or {}) if ann else {},
            "up_to_date": bool(ann) and ann.get("generation") == meta.get("generation"),
        },
        "bytes": _folder_bytes(index_dir),
        "last_change": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(last_change)),
        "generation": meta.get("generation"),
    }


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def scales_note(scales: Sequence[float] | None) -> str:
    """", scales 1,0.707,0.5" for multi-scale settings, nothing for one scale (what every output appends to the size)."""
    return f", scales {','.join(f'{scale:g}' for scale in scales)}" if scales and len(scales) > 1 else ""


def info_text(info: dict[str, Any]) -> str:
    """``camretrieval info`` as lines a person reads."""
    settings = info["settings"]
    lines = [("index", info["index"])]
    if settings is None:
        lines.append(("images", "none yet (camretrieval index IMAGES_DIR INDEX_DIR describes them)"))
        return "\n".join(f"{key + ':':<13} {value}" for key, value in lines)
    failed = len(info["failed"])
    lines.append((
        "images",
        f"{info['images']}" + (f" ({failed} {'file' if failed == 1 else 'files'} could not be used: camretrieval info "
                               "--json lists them)" if failed else ""),
    ))
    root = info["root"]
    lines.append(("folder", f"{root}" + ("" if info["root_exists"] else " (not found here)") if root else "not recorded"))
    described = [
        settings["backbone"] + (f" (weights {settings['weights']})" if settings.get("weights") else ""),
        f"layer {settings.get('feature_layer')}" + (
            f", CAMs from {settings['cam_layer']}" if settings.get("cam_layer") not in (None, settings.get("feature_layer")) else ""
        ),
        f"size {settings['size']} px{scales_note(settings.get('scales'))}",
        f"pooling {settings['pooling']}",
    ]
    if settings.get("class_list"):
        described.append(f"a fixed list of {len(settings['class_list'])} classes")
    elif settings["pooling"] == "cam":
        described.append(f"N_c = {settings['n_classes']}")
    lines.append(("settings", ", ".join(described)))
    whitening = info["whitening"]
    if whitening is None:
        lines.append(("whitening", "none (raw descriptors)"))
    else:
        source = (
            f"learned on {whitening['n_images']} images of the collection itself" if whitening["source"] == "collection"
            else f"from a PCA file learned on {whitening['n_images']} images of another collection"
        )
        lines.append(("whitening", f"{whitening['input_dim']} -> {whitening['dim']} PCA-whitening {source} "
                                   f"(N_pca = {whitening['n_pca']})"))
    lines.append(("descriptors", f"{info['dim']}-d, searched in {'float16' if info['float16'] else 'float32'}"))
    maps = info["maps"]
    lines.append(("maps", f"stored ({_megabytes(maps['bytes'])}): search --online and --rerank work" if maps["stored"]
                  else "not stored (index --no-maps): no search --online or --rerank"))
    if maps.get("formats", {}).get("1"):
        lines.append(("maps format", f"{maps['formats']['1']} shards keep their maps in float16 (format 1): the next camretrieval "
                          "index IMAGES_DIR INDEX_DIR re-encodes them losslessly, about 19x smaller"))
    ann = info["ann"]
    if ann is None:
        lines.append(("search", "exact"))
    else:
        recall = f", recall@100 {ann['recall_at_100']:.3f} against exact search" if ann["recall_at_100"] is not None else ""
        if ann.get("target"):
            effort = ", ".join(f"{key} {value}" for key, value in ann["effort"].items())
            recall += f" (target {ann['target']}{': ' + effort if effort else ''})"
        state = "" if ann["up_to_date"] else " (out of date: searches are exact until camretrieval index rebuilds it)"
        lines.append(("search", f"approximate ({ann['kind']}){recall}{state}"))
    lines.append(("on disk", _megabytes(info["bytes"])))
    lines.append(("last change", f"{info['last_change']} (generation {info['generation']})"))
    return "\n".join(f"{key + ':':<13} {value}" for key, value in lines)


def run_info(args: argparse.Namespace) -> int:
    info = index_info(args.index_dir)
    print(json.dumps(info, indent=2) if args.json else info_text(info))
    return 0
