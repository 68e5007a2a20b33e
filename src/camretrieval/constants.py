"""Names and defaults that the command line offers before any model is loaded: importable without torch, FAISS or
any other heavy dependency (``camretrieval --help`` reads only this module).

Each is defined here once; the modules that use them import them from here (``extraction.settings``,
``method.pooling``, ``storage.ann``, ...). :data:`BACKBONE_NAMES` lists the backbones that
:mod:`camretrieval.extraction.backbones` registers (a test checks that it is exactly ``list_backbones()``): the names
must be known without building, or even importing, the networks.
"""

from __future__ import annotations

# --- extraction (camretrieval.extraction.settings, .backbones) ---

BACKBONE_NAMES = ("densenet161", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "vgg16_cam")
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_SIZE = 448
DEFAULT_CLASSES = 64
DEFAULT_POOLING = "cam"
# The backbone's forward pass: float32, or autocast to bfloat16 / float16 (for GPUs: about twice the images per
# second; the CAM arithmetic stays float32). How fast, not what: not part of the settings.
PRECISIONS = ("float32", "bfloat16", "float16")

# --- the paper's maths (camretrieval.method) ---

# How an image's maps become the vectors that are whitened, l2-normalised and summed into D_I (section 3).
POOLINGS = {
    "cam": "class-weighted: one vector per top class (Eq. 4), the paper's method",
    "sum": "sum pooling of the raw features (SPoC without centre prior, the paper's 'raw')",
    "sum-cw": "sum pooling times the CroW channel weights (the paper's 'raw + CroW')",
    "crow": "CroW: spatial and channel weights",
    "mac": "MAC: max pooling",
    "gem": "GeM: generalised mean, p = 3",
    "rmac": "R-MAC: max pooling of a 3-level grid of regions, each region whitened",
}
# Online aggregation re-aggregates the top 1000 of plain search by default: a query then costs on 100 000 images
# about what it costs on 1000 (benchmarks/refinement_scale.py, docs/refinement.md "At 100 000 images").
DEFAULT_ONLINE_TOP = 1000
# search --refine: online aggregation over the query's top 8 classes, unwhitened (docs/refinement.md "The measured
# best": .366 mAP on clutter-dev's box queries against .305 whitened, measured by benchmarks/refinement.py).
REFINE_ONLINE_CLASSES = 8
# search --qe K expands only with the results that are 5-reciprocal neighbours of the query (benchmarks/gated_qe.py,
# docs/refinement.md "QE that knows when to help": QE2 gated .771 against .743 on ETH-80 objects, and on clutter-dev's
# box queries never below the first ranking, where plain QE2 costs up to .045).
DEFAULT_QE_GATE = 5
DEFAULT_RERANK_CLASSES = 6  # N_re of the paper: the query classes a candidate's regions are described with
DEFAULT_TOP = 64  # learn-classes N: classes counted per example image (the descriptor's default N_c)
DEFAULT_LENGTH = 64  # learn-classes L: classes kept
DEFAULT_WHITENING_DIM = 512  # PCA-whitening output dimensions (or K when K <= 512)
DEFAULT_NPCA = 1  # N_pca: class vectors per image the PCA-whitening is learned on

# --- the index folder (camretrieval.storage) ---

ANN_KINDS = ("hnsw", "ivf", "ivfpq")
# index --ann ivf calibrates its search effort to this recall@100 unless --recall says otherwise (storage.ann.calibrate)
DEFAULT_ANN_RECALL = 0.95
DEFAULT_COMMIT_EVERY = 256
DEFAULT_RAY_WORKERS = 2

# --- benchmarks (camretrieval.evaluation.datasets) ---

DATASET_NAMES = ("roxford5k", "rparis6k", "oxford5k", "paris6k", "ukbench", "holidays")
# `index` without --pca learns the whitening on the collection itself only from this many images (docs/method.md:
# on fewer, a whitening of the collection itself flattens what tells its few objects apart).
MIN_COLLECTION_WHITENING = 1000


def box_numbers(text: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` (commas or spaces) -> four numbers, or ValueError with the message a user sees. Plain text
    parsing, here so that the command line checks a --box without importing torch (method.regions.parse_box and
    the parser both call it)."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError(f"a box is four numbers x1,y1,x2,y2 in the image's pixels; got {text!r}")
    return values  # type: ignore[return-value]
