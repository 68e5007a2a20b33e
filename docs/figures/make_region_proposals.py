"""Regenerate region_proposals.png and region_proposals_landmark.png (METHOD.md section 5) from the shared data:

    .venv/bin/python docs/figures/make_region_proposals.py [DATA_ROOT]

DATA_ROOT defaults to $CAMRETRIEVAL_DATA or ../shared/data. Backbone: efficientnet_lite0 at the default 448 px.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image

from camretrieval import Describer, imagenet_class_names, load_backbone
from camretrieval.explain import compute_region_proposals, draw_region_proposals, stack_panels

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = os.environ.get("CAMRETRIEVAL_DATA", HERE.parents[2] / "shared" / "data")
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DATA)
# The first two views of the first object listed in clutter-dev/boxes.json: one is the query, one the photo.
QUERY, PHOTO = "apple1/apple1-022-090.jpg", "apple1/apple1-022-180.jpg"
LANDMARK = "sacre_coeur_02928139_3448003521.jpg"


def save(picture: Image.Image, name: str) -> None:
    """256 colours, dithered: a third of the bytes of full colour, for a picture kept in the repository."""
    picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
        HERE / name, optimize=True
    )


def main() -> None:
    describer = Describer(load_backbone("efficientnet_lite0"))
    names = [name.split(",")[0] for name in imagenet_class_names()]
    boxes = json.loads((DATA / "clutter-dev" / "boxes.json").read_text())
    query = describer.image_vectors(DATA / "clutter-dev" / QUERY, box=tuple(boxes[QUERY]), n_classes=2)
    query_classes = query.classes[0]
    photo = DATA / "clutter-dev" / PHOTO
    own = compute_region_proposals(describer, photo)
    as_query = compute_region_proposals(describer, photo, classes=query_classes.tolist())
    panels = [
        draw_region_proposals(own, tuple(boxes[PHOTO]), names, title=f"{PHOTO}: the photo's own top-2 classes"),
        draw_region_proposals(
            as_query,
            tuple(boxes[PHOTO]),
            names,
            title=f"{PHOTO}: the top-2 classes of the query box in {QUERY} (re-ranking)",
        ),
    ]
    save(stack_panels(panels), "region_proposals.png")
    landmark = compute_region_proposals(describer, DATA / "landmarks" / LANDMARK)
    title = f"{LANDMARK}: its own top-2 classes"
    save(draw_region_proposals(landmark, None, names, title=title), "region_proposals_landmark.png")
    for label, result in [("own", own), ("query", as_query), ("landmark", landmark)]:
        print(label, [names[c] for c in result.classes], [tuple(round(v) for v in b) for b in result.boxes])


if __name__ == "__main__":
    main()
