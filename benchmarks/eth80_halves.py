"""The two halves of eth80-dev that docs/tables_eth80.md, docs/evaluation.md and docs/refinement.md use, as folders of
links a command can be given: ``OUT/even`` (every other object in name order: apple1, apple3, apple5, car11, ...;
where PCA-whitening and class lists are learned) and ``OUT/odd`` (the other 20 objects: searched, every view a
query). The split is ``benchmarks/size_sweep.py``'s ``eth80_split``, as in every benchmark that splits ETH-80.

    python benchmarks/eth80_halves.py OUT [--data ../shared/data]
    camretrieval tables --images OUT/odd --pca-images OUT/even --compare-backbones efficientnet_lite0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from size_sweep import eth80_split

DATA = Path(os.environ.get("CAMRETRIEVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    eth80 = args.data / "eth80-dev"
    for half, paths in zip(("even", "odd"), eth80_split(eth80)):
        for path in paths:
            link = args.output / half / path
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((eth80 / path).resolve())
        objects = sorted({path.split("/")[0] for path in paths})
        print(f"{args.output / half}: {len(paths)} images of {len(objects)} objects ({', '.join(objects)})")


if __name__ == "__main__":
    main()
