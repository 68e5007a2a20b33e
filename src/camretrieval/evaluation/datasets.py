"""Benchmark loaders: image lists, queries (with boxes) and ground truth of standard instance-retrieval sets.

Every loader returns a :class:`RetrievalDataset`; :func:`camretrieval.evaluation.metrics.evaluate` scores rankings on it
with the set's own protocol. Supported: a folder of label sub-folders (optionally with ``boxes.json``), classic
Oxford5k/Paris6k (official text files, R-MAC's ``.mat`` or cirtorch's ``.pkl``), revisited ROxford5k/RParis6k
(revisitop's ``.pkl``), UKBench, INRIA Holidays, and any of them with distractor images appended.

Ground truth per query (``dataset.gnd[i]``, int64 arrays of database indices):

* ``"classic"``, ``"labels"``, ``"ukbench"``, ``"holidays"``: ``ok`` (positives) and ``junk`` (removed from the
  ranking; for sets whose queries are database images, the query itself, so that it is excluded);
* ``"revisited"``: ``easy``, ``hard`` and ``junk`` (revisitop's format).

The images of a dataset need not be present to load its ground truth: paths are built from the file names.
Pickled ground truth is only ever read with :class:`RestrictedUnpickler`.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from camretrieval.constants import DATASET_NAMES  # importable without the data sets' dependencies
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.images import find_images

Box = tuple[float, float, float, float]

PROTOCOLS = ("classic", "revisited", "labels", "ukbench", "holidays")

REVISITOP_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"


class DatasetError(CamRetrievalError):
    """A dataset that cannot be loaded: missing or malformed ground truth, images or boxes."""


class UnsafePickleError(DatasetError):
    """A pickle that asks to build something other than plain containers and NumPy arrays."""


@dataclass(frozen=True)
class Query:
    """One query: its image (relative to the dataset's root, or absolute), optional box [x1, y1, x2, y2] in that
    image's pixels, its name (file name without extension), its database index when the query image is also a
    database image, and a label (the classic query id such as ``all_souls_1``, or the image's label folder)."""

    path: str
    box: Box | None = None
    name: str = ""
    db_index: int | None = None
    label: str | None = None


@dataclass
class RetrievalDataset:
    """A retrieval benchmark: database images, queries and per-query ground truth (see the module docstring).

    ``root`` is the image folder; ``images`` and query paths are relative to it, except appended distractors,
    which are absolute (``root / path`` then yields the absolute path). ``labels`` holds each database image's
    label or group (None for distractors), or is None when the set has no labels.
    """

    name: str
    root: Path
    images: list[str]
    queries: list[Query]
    gnd: list[dict[str, np.ndarray]]
    protocol: str
    labels: list[str | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # where the ground truth came from, etc.

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.protocol not in PROTOCOLS:
            raise DatasetError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if len(self.gnd) != len(self.queries):
            raise DatasetError(f"{self.name}: {len(self.queries)} queries but ground truth for {len(self.gnd)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")
        keys = ("easy", "hard", "junk") if self.protocol == "revisited" else ("ok", "junk")
        n = len(self.images)
        for i, entry in enumerate(self.gnd):
            missing = [key for key in keys if key not in entry]
            if missing:
                raise DatasetError(f"{self.name}: ground truth of query {i} lacks {', '.join(missing)}")
            for key in keys:
                values = np.asarray(entry[key], dtype=np.int64).ravel()
                if values.size and (values.min() < 0 or values.max() >= n):
                    raise DatasetError(
                        f"{self.name}: ground truth '{key}' of query {i} points outside the {n} database images"
                    )
                entry[key] = values

    @property
    def image_names(self) -> list[str]:
        """Database image names: file names without extension (revisitop's ``imlist``)."""
        return [PurePosixPath(path).stem for path in self.images]

    def image_path(self, index: int) -> Path:
        """Full path of database image ``index``."""
        return self.root / self.images[index]

    def query_path(self, index: int) -> Path:
        """Full path of query ``index``'s image."""
        return self.root / self.queries[index].path


# --- safe pickles -------------------------------------------------------------------------------------------

_SAFE_BUILTINS = frozenset(
    {"list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray", "bool"}
)
# What NumPy's own pickles refer to when rebuilding arrays, dtypes and scalars (under numpy.core before NumPy 2,
# numpy._core since); _codecs.encode appears in protocol-2 pickles of arrays, _frombuffer in protocol-5 ones.
_SAFE_GLOBALS = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}
    | {(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
    | {(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")}
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only builtin containers and scalars and NumPy arrays, dtypes and scalars.

    Any other global (a function such as ``os.system``, any class) raises :class:`UnsafePickleError` before it is
    imported, so a malicious file cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        builtin_module = module in ("builtins", "__builtin__")  # the latter in Python 2 pickles
        if (builtin_module and name in _SAFE_BUILTINS) or (module, name) in _SAFE_GLOBALS:
            if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
                module = "numpy._core." + module[len("numpy.core."):]  # numpy.core is a deprecated alias since 2.0
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name} from a pickle: ground-truth files hold only lists, dicts and NumPy "
            "arrays, so this file is not one (or has been tampered with); get it again from its official source"
        )


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle with :class:`RestrictedUnpickler` (never a bare ``pickle.load`` on a user's file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        # latin1: the encoding NumPy needs for arrays in Python 2 pickles; it does not change Python 3 strings
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except Exception as error:  # truncated or not a pickle: every unpickling failure means a bad file
        raise DatasetError(f"{path} is not a readable pickle ({type(error).__name__}: {error})") from error


# --- helpers ------------------------------------------------------------------------------------------------

def _as_box(values: Any, where: str) -> Box | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        return None
    if array.size != 4 or not np.all(np.isfinite(array)) or array[2] <= array[0] or array[3] <= array[1]:
        raise DatasetError(f"{where}: a box must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {values!r}")
    return tuple(float(v) for v in array)  # type: ignore[return-value]


def _name_index(image_dir: Path) -> dict[str, str]:
    """Image file name without extension -> path relative to ``image_dir`` (Paris ships images in sub-folders)."""
    index: dict[str, str] = {}
    for path in find_images(image_dir):
        index.setdefault(PurePosixPath(path).stem, path)
    return index


def _paths_for(names: list[str], image_dir: Path) -> list[str]:
    """Relative paths of named images: found in ``image_dir`` if it exists, else ``<name>.jpg``."""
    index = _name_index(image_dir) if image_dir.is_dir() else {}
    return [index.get(name, f"{name}.jpg") for name in names]


def _indices(values: Any, offset: int = 0) -> np.ndarray:
    array = np.asarray(values if values is not None else [], dtype=np.float64).ravel()
    return np.unique(array.astype(np.int64) - offset)


def _labels_gnd(group_of: list[str]) -> list[dict[str, np.ndarray]]:
    """Every image a query: positives the others of its group, itself junk (so it is excluded, not counted)."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(group_of):
        members.setdefault(group, []).append(index)
    arrays = {group: np.asarray(indices, dtype=np.int64) for group, indices in members.items()}
    return [
        {"ok": arrays[group][arrays[group] != index], "junk": np.array([index], dtype=np.int64)}
        for index, group in enumerate(group_of)
    ]


# --- folders of labels --------------------------------------------------------------------------------------

_DEFAULT_BOXES = "boxes.json"


def image_folder(
    root: str | Path, boxes: str | Path | None = _DEFAULT_BOXES, name: str | None = None
) -> RetrievalDataset:
    """A folder of sub-folders, one per label: every image is a query against all the others (itself excluded),
    positives the images of its label.

    boxes: a JSON file (relative to ``root`` or absolute) mapping ``"<label>/<file>"`` to the query box
    [x1, y1, x2, y2]; by default ``boxes.json`` when present, None for none.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root} (expected a folder with one sub-folder of images per label)")
    images = find_images(root)
    if not images:
        raise DatasetError(f"no images in {root}: put them in one sub-folder per label")
    unlabelled = [path for path in images if "/" not in path]
    if unlabelled:
        raise DatasetError(
            f"{len(unlabelled)} image(s) directly in {root} (e.g. {unlabelled[0]}) have no label: the sub-folder "
            "names are the labels, so move each image into the folder of its label"
        )
    labels = [path.split("/", 1)[0] for path in images]
    box_of: dict[str, Box | None] = {}
    if boxes is not None:
        boxes_path = root / boxes
        if boxes_path.is_file():
            box_of = _load_boxes(boxes_path, set(images))
        elif boxes != _DEFAULT_BOXES:
            raise DatasetError(f"box file not found: {boxes_path}")
    queries = [
        Query(path, box_of.get(path), PurePosixPath(path).with_suffix("").as_posix(), index, label)
        for index, (path, label) in enumerate(zip(images, labels))
    ]
    return RetrievalDataset(
        name or root.name, root, images, queries, _labels_gnd(labels), "labels", list(labels),
        {"boxes": str(root / boxes) if box_of else None},
    )


def _load_boxes(path: Path, images: set[str]) -> dict[str, Box | None]:
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read the boxes of {path}: {error}") from error
    if not isinstance(mapping, dict):
        raise DatasetError(f"{path} must be a JSON object mapping '<label>/<file>' to [x1, y1, x2, y2]")
    unknown = sorted(key for key in mapping if key not in images)
    if unknown:
        raise DatasetError(
            f"{path} has boxes for {len(unknown)} image(s) not in the folder (e.g. {unknown[0]!r}); keys must be "
            "image paths relative to the folder, as '<label>/<file>'"
        )
    return {key: _as_box(value, f"{path}, {key!r}") for key, value in mapping.items()}


# --- classic Oxford5k / Paris6k -----------------------------------------------------------------------------

_QUERY_FILE = re.compile(r"^(?P<query>.+)_(?P<number>\d+)_query\.txt$")


def _read_names(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        raise DatasetError(
            f"ground-truth file missing: {path} (each query needs _good, _ok, _junk and _query files)"
        ) from None


def classic_from_text(
    gt_dir: str | Path, name: str = "oxford5k", image_dir: str | Path | None = None
) -> RetrievalDataset:
    """Classic Oxford5k/Paris6k from the official text files ``<query>_<n>_{good,ok,junk,query}.txt``.

    Positives are good + ok (as sets: a file listing an image twice counts it once). The database is the jpg files
    of ``image_dir`` when that folder exists, otherwise the images named in the ground-truth files.
    """
    gt_dir = Path(gt_dir)
    query_files = sorted(
        (match for match in map(_QUERY_FILE.match, (p.name for p in gt_dir.glob("*_query.txt"))) if match),
        key=lambda match: (match["query"], int(match["number"])),
    )
    if not query_files:
        raise DatasetError(f"no <name>_<n>_query.txt ground-truth files in {gt_dir}")
    raw = []
    for match in query_files:
        query_id = f"{match['query']}_{match['number']}"
        fields = (gt_dir / match.string).read_text(encoding="utf-8").split()
        if len(fields) != 5:
            raise DatasetError(f"{gt_dir / match.string}: expected '<image> x1 y1 x2 y2', got {' '.join(fields)!r}")
        image = fields[0][len("oxc1_"):] if fields[0].startswith("oxc1_") else fields[0]
        box = _as_box([float(v) for v in fields[1:]], str(gt_dir / match.string))
        lists = {kind: _read_names(gt_dir / f"{query_id}_{kind}.txt") for kind in ("good", "ok", "junk")}
        raw.append((query_id, image, box, lists))

    image_dir = Path(image_dir) if image_dir is not None else gt_dir.parent / name / "jpg"
    if image_dir.is_dir():
        paths = [path for path in find_images(image_dir) if path.lower().endswith(".jpg")]
        index_of = {PurePosixPath(path).stem: i for i, path in enumerate(paths)}
        named = {image for _, image, _, lists in raw for image in [image, *sum(lists.values(), [])]}
        absent = sorted(named - index_of.keys())
        if absent:
            raise DatasetError(
                f"{len(absent)} image(s) of the ground truth are not in {image_dir} (e.g. {absent[0]}.jpg): "
                "is it the image folder of this dataset?"
            )
    else:
        names = sorted({image for _, image, _, lists in raw for image in [image, *sum(lists.values(), [])]})
        paths = [f"{image}.jpg" for image in names]
        index_of = {image: i for i, image in enumerate(names)}

    queries, gnd = [], []
    for query_id, image, box, lists in raw:
        queries.append(Query(paths[index_of[image]], box, image, index_of[image], query_id))
        gnd.append({
            "ok": np.unique([index_of[n] for n in lists["good"] + lists["ok"]]).astype(np.int64),
            "junk": np.unique([index_of[n] for n in lists["junk"]]).astype(np.int64),
        })
    return RetrievalDataset(name, image_dir, paths, queries, gnd, "classic", info={"gnd": str(gt_dir)})


def _mat_string(value: Any) -> str:
    """A MATLAB string as scipy.io.loadmat returns it inside cell arrays (nested 1-element arrays)."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise DatasetError(f"expected a string in the .mat file, got an array of shape {value.shape}")
        value = value.ravel()[0]
    return str(value)


def classic_from_mat(
    path: str | Path, name: str | None = None, image_dir: str | Path | None = None
) -> RetrievalDataset:
    """Classic Oxford5k/Paris6k from R-MAC's ``gnd_<name>.mat``: ``imlist``, 1-based ``qidx`` and a ``gnd`` struct
    array with 1-based ``ok``, ``junk`` and ``bbx``."""
    path = Path(path)
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise DatasetError(
            f"reading {path} needs SciPy: pip install scipy (or use the .pkl or text ground truth)"
        ) from error
    try:
        mat = loadmat(path)
    except FileNotFoundError:
        raise DatasetError(f"ground-truth file missing: {path}") from None
    except Exception as error:  # scipy raises several types for a corrupt or non-MATLAB file
        raise DatasetError(f"{path} is not a readable MATLAB file ({error})") from error
    missing = [key for key in ("imlist", "qidx", "gnd") if key not in mat]
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(missing)}: expected R-MAC's gnd_oxford5k.mat / gnd_paris6k.mat")
    names = [_mat_string(item) for item in mat["imlist"].ravel()]
    query_index = mat["qidx"].ravel().astype(np.int64) - 1  # MATLAB indices are 1-based
    records = mat["gnd"].ravel()
    if len(records) != len(query_index):
        raise DatasetError(f"{path}: {len(query_index)} query indices but {len(records)} ground-truth entries")
    if query_index.size and (query_index.min() < 0 or query_index.max() >= len(names)):
        raise DatasetError(f"{path}: qidx points outside the {len(names)} images of imlist")
    fields = records.dtype.names or ()
    name = name or path.stem.removeprefix("gnd_")
    image_dir = Path(image_dir) if image_dir is not None else path.parent / name / "jpg"
    paths = _paths_for(names, image_dir)
    queries, gnd = [], []
    for i, (record, qi) in enumerate(zip(records, query_index)):
        box = _as_box(record["bbx"], f"{path}, query {i}") if "bbx" in fields else None
        queries.append(Query(paths[qi], box, names[qi], int(qi)))
        gnd.append({"ok": _indices(record["ok"], 1), "junk": _indices(record["junk"] if "junk" in fields else None, 1)})
    return RetrievalDataset(name, image_dir, paths, queries, gnd, "classic", info={"gnd": str(path)})


def from_revisitop_pickle(
    path: str | Path, name: str | None = None, image_dir: str | Path | None = None
) -> RetrievalDataset:
    """A revisitop/cirtorch ``gnd_<name>.pkl``: ``imlist``, ``qimlist`` and ``gnd`` (per query ``bbx`` and either
    ``easy``/``hard``/``junk``, revisited, or ``ok``/``junk``, classic). Images: ``<image_dir>/<name>.jpg``,
    by default the ``jpg`` folder next to the pickle."""
    path = Path(path)
    data = safe_load_pickle(path)
    if not isinstance(data, dict) or not all(key in data for key in ("imlist", "qimlist", "gnd")):
        raise DatasetError(f"{path} is not revisitop ground truth: expected a dict with imlist, qimlist and gnd")
    names, query_names, entries = list(map(str, data["imlist"])), list(map(str, data["qimlist"])), list(data["gnd"])
    if len(entries) != len(query_names):
        raise DatasetError(f"{path}: {len(query_names)} query names but {len(entries)} ground-truth entries")
    if not entries or not all(isinstance(entry, dict) for entry in entries):
        raise DatasetError(f"{path}: gnd must be a non-empty list of dicts")
    revisited = all("easy" in entry for entry in entries)
    keys = ("easy", "hard", "junk") if revisited else ("ok", "junk")
    name = name or path.stem.removeprefix("gnd_")
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "jpg"
    paths = _paths_for(names, image_dir)
    query_paths = _paths_for(query_names, image_dir)
    index_of = {image: i for i, image in enumerate(names)}
    queries, gnd = [], []
    for i, (entry, query_name) in enumerate(zip(entries, query_names)):
        missing = [key for key in keys if key not in entry and key != "junk"]
        if missing:
            raise DatasetError(f"{path}: ground truth of query {i} lacks {', '.join(missing)}")
        queries.append(Query(query_paths[i], _as_box(entry.get("bbx"), f"{path}, query {i}"), query_name,
                             index_of.get(query_name)))
        gnd.append({key: _indices(entry.get(key)) for key in keys})
    return RetrievalDataset(name, image_dir, paths, queries, gnd, "revisited" if revisited else "classic",
                            info={"gnd": str(path)})


def _missing_gnd(name: str, data_root: Path, tried: list[Path]) -> DatasetError:
    return DatasetError(
        f"ground truth of {name} not found under {data_root}; looked for "
        + ", ".join(str(p) for p in tried)
        + f". Expected layout (revisitop/cirtorch): {data_root / name / f'gnd_{name}.pkl'} with the images in "
        f"{data_root / name / 'jpg'}/<image>.jpg; the file is at {REVISITOP_URL.format(name=name)}"
    )


def _classic(name: str, data_root: str | Path) -> RetrievalDataset:
    data_root = Path(data_root)
    image_dir = data_root / name / "jpg"
    pickles = [data_root / name / f"gnd_{name}.pkl", data_root / f"gnd_{name}.pkl"]
    mats = [data_root / name / f"gnd_{name}.mat", data_root / f"gnd_{name}.mat"]
    text_dirs = [data_root / name / "gt_files", data_root / f"{name}_gt_files", data_root / name]
    for candidate in pickles:
        if candidate.is_file():
            return from_revisitop_pickle(candidate, name, image_dir)
    for candidate in mats:
        if candidate.is_file():
            return classic_from_mat(candidate, name, image_dir)
    for candidate in text_dirs:
        if candidate.is_dir() and any(candidate.glob("*_query.txt")):
            return classic_from_text(candidate, name, image_dir)
    raise _missing_gnd(name, data_root, pickles + mats + [d / "*_query.txt" for d in text_dirs])


def oxford5k(data_root: str | Path) -> RetrievalDataset:
    """Classic Oxford5k (55 queries) from ``<data_root>/oxford5k/gnd_oxford5k.pkl`` (cirtorch) or ``.mat`` (R-MAC)
    or the official text files in ``<data_root>/oxford5k/gt_files``; images in ``<data_root>/oxford5k/jpg``."""
    return _classic("oxford5k", data_root)


def paris6k(data_root: str | Path) -> RetrievalDataset:
    """Classic Paris6k (55 queries); the same layouts as :func:`oxford5k`."""
    return _classic("paris6k", data_root)


def _revisited(name: str, data_root: str | Path) -> RetrievalDataset:
    data_root = Path(data_root)
    candidates = [data_root / name / f"gnd_{name}.pkl", data_root / f"gnd_{name}.pkl"]
    for candidate in candidates:
        if candidate.is_file():
            return from_revisitop_pickle(candidate, name, data_root / name / "jpg")
    raise _missing_gnd(name, data_root, candidates)


def roxford5k(data_root: str | Path) -> RetrievalDataset:
    """Revisited Oxford (70 queries, Easy/Medium/Hard) from ``<data_root>/roxford5k/gnd_roxford5k.pkl``; images in
    ``<data_root>/roxford5k/jpg``."""
    return _revisited("roxford5k", data_root)


def rparis6k(data_root: str | Path) -> RetrievalDataset:
    """Revisited Paris (70 queries) from ``<data_root>/rparis6k/gnd_rparis6k.pkl``; images in
    ``<data_root>/rparis6k/jpg``."""
    return _revisited("rparis6k", data_root)


# --- UKBench and INRIA Holidays -----------------------------------------------------------------------------

_UKBENCH_FILE = re.compile(r"^ukbench(\d{5})\.jpe?g$", re.IGNORECASE)
_HOLIDAYS_FILE = re.compile(r"^(\d{4})(\d{2})\.jpe?g$", re.IGNORECASE)


def _numbered_images(root: Path, name: str, pattern: re.Pattern[str], example: str) -> tuple[Path, list[str]]:
    """The first of ``<root>/<name>/jpg``, ``<root>/<name>``, ``<root>/jpg``, ``<root>`` holding files that match."""
    candidates = [root / name / "jpg", root / name / "full", root / name, root / "jpg", root / "full", root]
    for folder in candidates:
        if folder.is_dir():
            files = sorted(p.name for p in folder.iterdir() if p.is_file() and pattern.match(p.name))
            if files:
                return folder, files
    raise DatasetError(
        f"no {name} images ({example}, ...) found in any of: " + ", ".join(str(c) for c in candidates)
        + f"; put them in {root / name / 'jpg'}"
    )


def ukbench(root: str | Path) -> RetrievalDataset:
    """UKBench: ``ukbench00000.jpg``...; groups of 4 consecutive numbers show one object. Every image is a query;
    positives the other 3 of its group (itself excluded from mAP; the N-S score counts it, as is the rule)."""
    folder, files = _numbered_images(Path(root), "ukbench", _UKBENCH_FILE, "ukbench00000.jpg")
    files.sort(key=lambda file: int(_UKBENCH_FILE.match(file)[1]))
    groups = [f"{int(_UKBENCH_FILE.match(file)[1]) // 4:04d}" for file in files]
    queries = [
        Query(file, None, PurePosixPath(file).stem, i, group)
        for i, (file, group) in enumerate(zip(files, groups))
    ]
    return RetrievalDataset("ukbench", folder, files, queries, _labels_gnd(groups), "ukbench", list(groups))


def holidays(root: str | Path) -> RetrievalDataset:
    """INRIA Holidays: ``100000.jpg``...; the first 4 digits are the scene group. The first image of each group
    is its query, the others its positives; the query is excluded from its own ranking."""
    folder, files = _numbered_images(Path(root), "holidays", _HOLIDAYS_FILE, "100000.jpg")
    groups = [_HOLIDAYS_FILE.match(file)[1] for file in files]
    # files are sorted, so each group is one run of consecutive files and its first file is the query
    starts = [i for i in range(len(files)) if i == 0 or groups[i - 1] != groups[i]]
    queries, gnd = [], []
    for start, end in zip(starts, [*starts[1:], len(files)]):
        queries.append(Query(files[start], None, PurePosixPath(files[start]).stem, start, groups[start]))
        gnd.append({"ok": np.arange(start + 1, end, dtype=np.int64), "junk": np.array([start], dtype=np.int64)})
    return RetrievalDataset("holidays", folder, files, queries, gnd, "holidays", list(groups))


# --- distractors and lookup by name -------------------------------------------------------------------------

def with_distractors(
    dataset: RetrievalDataset, distractor_dir: str | Path, limit: int | None = None
) -> RetrievalDataset:
    """A copy of ``dataset`` with the images under ``distractor_dir`` appended to its database (as Oxford105k
    adds Flickr100k). They are never positives; their paths are absolute, so ``dataset.root / path`` still opens
    them and they cannot collide with the dataset's own relative paths. limit: keep the first N (sorted)."""
    folder = Path(distractor_dir).resolve()
    root = dataset.root.resolve()
    if folder == root or root.is_relative_to(folder) or folder.is_relative_to(root):
        raise DatasetError(
            f"distractor folder {folder} overlaps the dataset's images in {root}: its own images would be counted "
            "as distractors; use a separate folder of distractor images"
        )
    found = find_images(folder)
    if limit is not None:
        found = found[: max(int(limit), 0)]
    if not found:
        raise DatasetError(f"no distractor images in {folder}")
    distractors = [(folder / path).as_posix() for path in found]
    labels = None if dataset.labels is None else [*dataset.labels, *([None] * len(distractors))]
    return replace(
        dataset,
        name=f"{dataset.name}+{len(distractors)}",
        images=[*dataset.images, *distractors],
        gnd=[{key: value.copy() for key, value in entry.items()} for entry in dataset.gnd],
        labels=labels,
        info={**dataset.info, "distractors": str(folder), "n_distractors": len(distractors)},
    )


_LOADERS = {
    "roxford5k": roxford5k,
    "rparis6k": rparis6k,
    "oxford5k": oxford5k,
    "paris6k": paris6k,
    "ukbench": ukbench,
    "holidays": holidays,
}


def load_dataset(name: str, data_root: str | Path) -> RetrievalDataset:
    """Load a standard benchmark by name (one of :data:`DATASET_NAMES`) from ``data_root`` in the
    revisitop layout ``<data_root>/<name>/gnd_<name>.pkl`` + ``<data_root>/<name>/jpg/``, or cirtorch's, which
    puts the same under ``<data_root>/test/``."""
    loader = _LOADERS.get(name.lower())
    if loader is None:
        raise DatasetError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASET_NAMES)} (or image_folder() for a folder of "
            "label sub-folders)"
        )
    if not Path(data_root).is_dir():
        raise DatasetError(f"data root {data_root} is not a folder (expected e.g. <data_root>/{name.lower()}/...)")
    cirtorch_root = Path(data_root) / "test"
    if not (Path(data_root) / name.lower()).is_dir() and (cirtorch_root / name.lower()).is_dir():
        data_root = cirtorch_root
    return loader(data_root)
