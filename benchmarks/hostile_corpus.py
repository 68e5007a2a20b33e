"""Run the command line over a corpus of hostile and clumsy inputs and count the runs that end in a traceback
(issue 12's bar: none), and whether a sound index is still whole afterwards (nothing lost).

The corpus: file names (not UTF-8, newline, backslash, spaces, leading dash), images (empty, truncated, not an
image, a folder named .jpg, dangling and looping links), boxes (reversed, outside, not numbers, NaN, huge), query
files (not UTF-8, a folder, stdin), PCA files (truncated, text, a list header, NaN, zero eigenvalues, another
backbone), index damage (a deleted shard file, a truncated approximate index, a damaged catalog page, a lock that is
a folder, a file as index), and argument typos. Each case is one `camretrieval` process, as a user runs it.

    python benchmarks/hostile_corpus.py [--data ../shared/data] [--workdir /tmp/camretrieval-hostile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("CAMRETRIEVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def camretrieval(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camretrieval.cli", *args], input=stdin, capture_output=True, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-hostile"))
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    photos = work / "photos"
    photos.mkdir(parents=True)
    sources = sorted((args.data / "eth80-dev" / "cup2").glob("*.jpg"))[:8]
    for source in sources:
        shutil.copy(source, photos / source.name)
    odd = {b"caf\xe9.jpg", b"new\nline.jpg", b"back\\slash.jpg", b"with space.jpg", b"-dash.jpg"}
    for name in odd:
        shutil.copy(sources[0], os.path.join(os.fsencode(photos), name))
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "truncated.jpg").write_bytes(sources[1].read_bytes()[:300])
    (photos / "text.png").write_text("not an image")
    (photos / "folder.jpg").mkdir()
    (photos / "dangling.jpg").symlink_to(work / "nowhere.jpg")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    query = str(sources[2])
    index = work / "index"
    common = ["--size", "96", "--workers", "0", "--quiet"]
    built = camretrieval("index", str(photos), str(index), *common, "--dim", "16", "--ann", "hnsw")
    assert built.returncode == 0, built.stderr.decode()
    reference = camretrieval("search", str(index), query, "--json", "--top", "20").stdout

    pca = work / "pca.npz"
    camretrieval("fit-pca", str(photos), str(pca), *common, "--dim", "8")
    with np.load(pca) as stored:
        arrays = dict(stored)
    bad_pcas = {}
    for name, change in {
        "nan": lambda a: a.__setitem__("mean", np.full_like(a["mean"], np.nan)),
        "zero": lambda a: a.__setitem__("eigenvalues", np.zeros_like(a["eigenvalues"])),
        "list": lambda a: a.__setitem__("header", np.array(json.dumps([1, 2]))),
    }.items():
        changed = dict(arrays)
        change(changed)
        bad_pcas[name] = work / f"{name}.npz"
        np.savez(bad_pcas[name], **changed)
    (work / "truncated.npz").write_bytes(pca.read_bytes()[:200])
    (work / "text.npz").write_text("hello")
    (work / "latin1.txt").write_bytes(b"caf\xe9.jpg\n" + query.encode() + b" 0 0 50 50\n")
    (work / "afile").write_text("x")

    cases: list[tuple[str, list[str], bytes | None]] = [
        ("search a typo index", ["search", str(work / "typo"), query], None),
        ("search a typo query", ["search", str(index), str(work / "typo.jpg")], None),
        ("search a non-image query", ["search", str(index), str(photos / "text.png")], None),
        ("search an empty query", ["search", str(index), str(photos / "empty.jpg")], None),
        ("search a folder as query", ["search", str(index), str(photos)], None),
        ("search the non-UTF-8 name", ["search", str(index), os.fsdecode(os.path.join(os.fsencode(photos), b"caf\xe9.jpg"))], None),
        ("box reversed", ["search", str(index), query, "--box", "50,50,10,10"], None),
        ("box outside", ["search", str(index), query, "--box", "1000,1000,2000,2000"], None),
        ("box not numbers", ["search", str(index), query, "--box", "a,b,c,d"], None),
        ("box nan", ["search", str(index), query, "--box", "nan,0,10,10"], None),
        ("box huge", ["search", str(index), query, "--box", "0,0,1e308,1e308"], None),
        ("queries not UTF-8", ["search", str(index), "--queries", str(work / "latin1.txt")], None),
        ("queries a folder", ["search", str(index), "--queries", str(work)], None),
        ("queries from stdin", ["search", str(index), "--queries", "-"], query.encode() + b"\n"),
        ("--top 0", ["search", str(index), query, "--top", "0"], None),
        ("--rerank -1", ["search", str(index), query, "--rerank", "-1"], None),
        ("--device bogus", ["search", str(index), query, "--device", "bogus"], None),
        ("--device cuda", ["search", str(index), query, "--device", "cuda:7"], None),
        ("index a typo folder", ["index", str(work / "typo"), str(work / "i2"), *common], None),
        ("index into a file", ["index", str(photos), str(work / "afile"), *common], None),
        ("index --classes 0", ["index", str(photos), str(work / "i3"), *common, "--classes", "0"], None),
        ("index --size 1", ["index", str(photos), str(work / "i4"), "--size", "1", "--quiet"], None),
        ("index --workers -1", ["index", str(photos), str(work / "i5"), "--workers", "-1"], None),
        ("index --pooling typo", ["index", str(photos), str(work / "i6"), "--pooling", "typo"], None),
        ("index resnet50 without weights", ["index", str(photos), str(work / "i7"), *common, "--backbone", "resnet50"], None),
        ("index with another size", ["index", str(photos), str(index), "--size", "128", "--quiet"], None),
        ("fit-pca into a folder", ["fit-pca", str(photos), str(work), *common], None),
        ("fit-pca --dim 0", ["fit-pca", str(photos), str(work / "p.npz"), "--dim", "0"], None),
        ("fit-pca --dim -5", ["fit-pca", str(photos), str(work / "p.npz"), "--dim", "-5"], None),
        ("remove from a typo index", ["remove", str(work / "typo2"), "a.jpg"], None),
        ("remove an unknown image", ["remove", str(index), "unknown.jpg"], None),
        ("explain a non-image", ["explain", str(photos / "text.png")], None),
        ("explain into a folder", ["explain", query, "--output", str(work)], None),
        ("serve --port 99999", ["serve", str(index), "--port", "99999"], None),
        ("eval a folder without labels", ["eval", "--images", str(photos), "--size", "96", "--quiet"], None),
        ("unknown command", ["serch", str(index)], None),
    ]
    for name, path in bad_pcas.items():
        cases.append((f"PCA file: {name}", ["index", str(photos), str(work / f"i-{name}"), "--pca", str(path), *common], None))
    for name in ("truncated.npz", "text.npz"):
        cases.append((f"PCA file: {name}", ["index", str(photos), str(work / "i-x"), "--pca", str(work / name), *common], None))

    # Damage to copies of the index: each is found and said (search), and repaired by `index` where it can be.
    def damaged(label: str, damage) -> Path:
        copy = work / f"damaged-{label}"
        shutil.copytree(index, copy, symlinks=True)
        damage(copy)
        return copy

    shard = sorted((index / "shards").iterdir())[0].name
    copies = {
        "shard file deleted": damaged("shard", lambda c: (c / "shards" / shard / "descriptors.npy").unlink()),
        "ann truncated": damaged("ann", lambda c: os.truncate(c / "ann.faiss", 64)),
        "lock is a folder": damaged("lock", lambda c: ((c / "writer.lock").unlink(), (c / "writer.lock").mkdir())),
    }

    def damage_catalog(copy: Path) -> None:
        data = bytearray((copy / "catalog.sqlite").read_bytes())
        data[4096:8192] = os.urandom(4096)  # one page of the database
        (copy / "catalog.sqlite").write_bytes(bytes(data))

    copies["catalog page damaged"] = damaged("catalog", damage_catalog)
    for label, copy in copies.items():
        cases.append((f"{label}: search", ["search", str(copy), query], None))
        cases.append((f"{label}: index", ["index", str(photos), str(copy), *common], None))
        cases.append((f"{label}: search again", ["search", str(copy), query], None))
        cases.append((f"{label}: info", ["info", str(copy)], None))

    tracebacks = 0
    for name, command, stdin in cases:
        result = camretrieval(*command, stdin=stdin)
        err = result.stderr.decode("utf-8", "backslashreplace")
        traceback = "Traceback (most recent call last)" in err
        tracebacks += traceback
        last = err.strip().splitlines()[-1][:150] if err.strip() else ""
        print(f"{'TRACEBACK' if traceback else 'ok':9} rc={result.returncode:<3} {name}: {last}")
    after = camretrieval("search", str(index), query, "--json", "--top", "20").stdout
    lost = after != reference
    print(f"\n{len(cases)} hostile inputs, {tracebacks} tracebacks; the sound index "
          f"{'CHANGED' if lost else 'answers exactly as before'} ({len(json.loads(after)[0]['results'])} results)")


if __name__ == "__main__":
    main()
