"""The command line's parser and start-up, without any data: --help and argument errors load no torch (checked in
a fresh interpreter), every option says what it does and its default, error messages advise only options that
exist, the lazy top-level package, and the torch-free constants that the parser offers."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import camretrieval
from camretrieval import constants
from camretrieval.cli.options import build_parser

SRC = Path(camretrieval.__file__).resolve().parent
HEAVY = ("torch", "torchvision", "timm", "faiss", "scipy", "fastapi", "ray", "numpy", "PIL", "skimage", "uvicorn")

# Each: arguments, and the exit status main() gives. Argument errors (argparse: 2) and the checks each command makes
# before it imports anything (CamRetrievalError: 2).
ARGUMENT_ERRORS = [
    (["--help"], 0),
    (["search", "--help"], 0),
    ([], 2),
    (["no-such-command"], 2),
    (["search", "INDEX", "q.jpg", "--top", "0"], 2),
    (["search", "INDEX", "q.jpg", "--box", "1,2,3"], 2),
    (["search", "INDEX", "q.jpg", "--rerank", "-1"], 2),
    (["search", "INDEX", "--backbone", "resnet50"], 2),
    (["search", "INDEX"], 2),  # no queries
    (["search", "INDEX", "a.jpg", "b.jpg", "--box", "1,2,3,4"], 2),
    (["search", "INDEX", "a.jpg", "--qe-alpha", "3"], 2),
    (["search", "INDEX", "a.jpg", "--online-top", "5"], 2),
    (["search", "INDEX", "--queries", "/nonexistent/queries.txt"], 2),
    (["index", "IMAGES", "INDEX", "--pca", "pca.npz", "--dim", "64"], 2),
    (["index", "IMAGES", "INDEX", "--backbone", "alexnet"], 2),
    (["index", "IMAGES", "INDEX", "--size", "-3"], 2),
    (["remove", "INDEX"], 2),
    (["eval", "--images", "DIR", "--pca", "a.npz", "--pca-images", "DIR"], 2),
    (["eval", "--images", "DIR", "--pca", "a.npz", "--dim", "64"], 2),
    (["eval", "--pca", "a.npz"], 2),
    (["eval", "--dataset", "roxford5k"], 2),
    (["tables", "--pca-images", "DIR"], 2),
    (["tables", "--images", "DIR", "--pca-images", "DIR", "--compare-backbones", "alexnet"], 2),
    (["explain"], 2),
    (["fit-pca", "DIR", "pca.npz", "--npca", "0"], 2),
]


def _modules_after(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; it prints a JSON object last."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_and_argument_errors_import_no_torch():
    script = f"""
import contextlib, io, json, sys
import camretrieval.cli
from camretrieval.cli import main
codes = []
for argv, _ in {ARGUMENT_ERRORS!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exit:
            codes.append(exit.code)
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    found = _modules_after(script)
    assert found["loaded"] == []
    assert found["codes"] == [code for _, code in ARGUMENT_ERRORS]


def test_every_command_help_answers_without_torch():
    commands = list(_subparsers(build_parser()))
    script = f"""
import contextlib, io, json, sys
from camretrieval.cli import main
for command in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([command, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, command
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    assert _modules_after(script) == []


def test_the_command_itself_answers_help_and_errors(tmp_path):
    command = [sys.executable, "-m", "camretrieval.cli"]
    help_run = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "info" in help_run.stdout and "search" in help_run.stdout
    error = subprocess.run([*command, "search", str(tmp_path), "a.jpg", "b.jpg", "--box", "1,2,3,4"], capture_output=True, text=True)
    assert error.returncode == 2 and "--box goes with exactly one QUERY" in error.stderr and "Traceback" not in error.stderr
    bad_box = subprocess.run([*command, "search", str(tmp_path), "a.jpg", "--box", "1,2,3"], capture_output=True, text=True)
    assert bad_box.returncode == 2 and "four numbers" in bad_box.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers(build_parser()).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            if action.option_strings:
                shown = formatter._expand_help(action) if "%(" in formatter._get_help_string(action) else formatter._get_help_string(action)
                assert "default" in shown or "required" in shown, f"{name} {action.option_strings}: no default shown"
        text = sub.format_help()
        assert "METHOD.md" not in text, name  # a clone has no ../shared/paper: the docs are docs/method.md
    assert "METHOD.md" not in build_parser().format_help()


def test_help_shows_the_defaults_users_rely_on():
    commands = _subparsers(build_parser())
    search = commands["search"].format_help()
    assert "(default: 10)" in search and "(default: 6)" in search and "docs/method.md" in search
    index = commands["index"].format_help()
    assert "(default: 256)" in " ".join(index.split()) and "--npca" in index and "--dim" in index
    for command in ("fit-pca", "eval", "tables", "index"):
        text = " ".join(commands[command].format_help().split())
        assert "--dim D" in text and "--npca N" in text, command
        assert "(default: 512;" in text and "(default: 1)" in text, command


def _all_options() -> set[str]:
    options = {"--help"}
    for sub in _subparsers(build_parser()).values():
        for action in sub._actions:
            options.update(action.option_strings)
    return options


def test_messages_advise_only_options_that_exist():
    """Every ``--option`` named in the package's source (error messages, notes, help) is an option of some command."""
    options = _all_options()
    unknown = {}
    for path in SRC.rglob("*.py"):
        for token in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", path.read_text()):
            if token not in options:
                unknown.setdefault(token, []).append(str(path.relative_to(SRC)))
    assert not unknown, unknown


def test_top_level_package_is_lazy_and_complete():
    loaded = _modules_after(
        "import json, sys, camretrieval; names = dir(camretrieval); "
        "print(json.dumps({'loaded': [m for m in ('torch', 'faiss', 'timm') if m in sys.modules], "
        "'listed': all(n in names for n in camretrieval.__all__)}))"
    )
    assert loaded == {"loaded": [], "listed": True}
    from camretrieval import Index, PCAWhitening, update_index
    from camretrieval.search.index import Index as index_class

    assert Index is index_class and PCAWhitening.__name__ == "PCAWhitening" and callable(update_index)
    for name in camretrieval.__all__:
        assert getattr(camretrieval, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        camretrieval.nothing  # noqa: B018


def test_constants_are_the_library_s_own():
    """The parser's torch-free names are the ones the library uses (one definition, re-exported)."""
    from camretrieval.evaluation.datasets import DATASET_NAMES
    from camretrieval.extraction.backbones import list_backbones
    from camretrieval.extraction.settings import DEFAULT_BACKBONE, DEFAULT_SIZE, ExtractionSettings
    from camretrieval.method.cell_major import DEFAULT_RERANK_CLASSES
    from camretrieval.method.pooling import POOLINGS
    from camretrieval.search.refinement import SearchOptions
    from camretrieval.storage import writer
    from camretrieval.storage.ann import ANN_KINDS

    assert list(constants.BACKBONE_NAMES) == list_backbones()  # every registered backbone is offered, and no other
    assert POOLINGS is constants.POOLINGS and ANN_KINDS is constants.ANN_KINDS and DATASET_NAMES is constants.DATASET_NAMES
    assert (DEFAULT_BACKBONE, DEFAULT_SIZE) == (constants.DEFAULT_BACKBONE, constants.DEFAULT_SIZE)
    assert ExtractionSettings().size == constants.DEFAULT_SIZE
    assert DEFAULT_RERANK_CLASSES == SearchOptions().rerank_classes == constants.DEFAULT_RERANK_CLASSES
    assert writer.DEFAULT_COMMIT_EVERY == constants.DEFAULT_COMMIT_EVERY
    assert writer.DEFAULT_RAY_WORKERS == constants.DEFAULT_RAY_WORKERS


def test_search_modules_load_no_torchvision_scipy_or_web_server():
    """What ``search`` imports before it loads the backbone: torch and FAISS, but not torchvision (images are resized
    with Pillow), SciPy (only region proposals need it) or the web server. (timm, loaded with the backbone, brings
    torchvision itself.)"""
    loaded = _modules_after(
        "import json, sys\nimport camretrieval.cli.search, camretrieval.search.index, camretrieval.search.refinement\n"
        "import camretrieval.extraction.describer\n"
        "print(json.dumps([m for m in ('torchvision', 'timm', 'scipy', 'fastapi', 'uvicorn', 'ray') if m in sys.modules]))"
    )
    assert loaded == []
