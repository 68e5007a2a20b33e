"""``camretrieval demo`` end to end (scikit-image's photos, no shared data): it indexes, searches, prints each query's
results and the mean average precision, and that figure is the one the README states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from camretrieval.cli import main
from camretrieval.demo import BOX_QUERY, SUBJECTS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a PCA on 160 crops and an index of 43 photos at 448 px: about a minute on 2 cores


def test_demo_prints_the_readme_map_and_keeps_a_searchable_index(tmp_path, capsys):
    readme = (REPO / "README.md").read_text()
    stated = re.search(r"mean average precision \((\d\.\d{3}),", readme)
    assert stated, "the README no longer states the demo's mAP as 'mean average precision (X.XXX, ...'"

    assert main(["demo", "--workdir", str(tmp_path), "--top", "4"]) == 0
    printed = capsys.readouterr().out

    blocks = re.findall(r"^query (\S+?)\.png(?: box \(.*\))?: AP (\d\.\d{3})\n((?:  .*\n)+)", printed, flags=re.MULTILINE)
    assert [subject for subject, _, _ in blocks] == [*SUBJECTS, BOX_QUERY[0]]
    for subject, _, lines in blocks:
        # Its top 4 results, best first; "+" marks exactly its subject's edited copies.
        results = re.findall(r"^  (\d)\. ([+-]) (-?\d\.\d{3})  (\S+)$", lines, flags=re.MULTILINE)
        assert [int(rank) for rank, _, _, _ in results] == [1, 2, 3, 4]
        assert all((mark == "+") == path.startswith(f"{subject}_") for _, mark, _, path in results)
        scores = [float(score) for _, _, score, _ in results]
        assert scores == sorted(scores, reverse=True)
    aps = [float(ap) for _, ap, _ in blocks]
    reported = re.search(r"^mAP over (\d+) queries: (\d\.\d{3})", printed, flags=re.MULTILINE)
    assert reported and int(reported.group(1)) == len(blocks)
    assert float(reported.group(2)) == pytest.approx(sum(aps) / len(aps), abs=6e-4)  # the mean of the printed APs
    assert reported.group(2) == stated.group(1), f"demo printed mAP {reported.group(2)}, README says {stated.group(1)}"

    # --workdir keeps what the demo made: its index answers a search from the command line.
    assert main(["search", str(tmp_path / "index"), str(tmp_path / "queries" / "coffee.png"), "--top", "4", "--json"]) == 0
    assert '"path": "coffee_' in capsys.readouterr().out
