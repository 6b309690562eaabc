"""Small functions: none longer than ``MAX_LINES`` in the installed packages.

A function's length runs from its first decorator (or its ``def``) to its last line, docstring,
comments and nested functions included, as parsed with ``ast``. Checked: ``sparo_fast/``
(``sparo_fast.clip`` included), ``kernels/`` (the tooling in ``kernels/testing`` included),
``training/`` and ``experiment/``. A longer function is split into named steps that say what
each part does (e.g. a kernel's one-tile and tiled paths sharing one inner helper).

``KNOWN`` lists functions allowed to stay longer for now, each with the reason; an entry whose
function is gone or has become short enough must be removed, so that it cannot return.
``python tests/test_repo_functions.py`` prints the longest functions.
"""
from __future__ import annotations

import ast
import sys

from repo_scan import ROOT, tracked_files

MAX_LINES = 80
DIRS = ("sparo_fast", "kernels", "training", "experiment")
# "path::qualified name" -> why it may stay longer for now
KNOWN: dict = {}


def function_lengths(text: str, path: str = "<text>"):
    """(length, "path::qualified name", first line) of every function and method in ``text``."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                name = f"{prefix}{child.name}"
                out.append((child.end_lineno - start + 1, f"{path}::{name}", start))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(text), "")
    return out


def package_functions():
    files = [p for p in tracked_files() if p.relative_to(ROOT).parts[0] in DIRS]
    return [f for p in files for f in function_lengths(p.read_text(), str(p.relative_to(ROOT)))]


def test_the_scan_sees_the_packages():
    names = {name for _, name, _ in package_functions()}
    for name in ("sparo_fast/readout.py::SparoReadout.forward", "kernels/sparo_readout_bwd.py::_bwd_token_kernel",
                 "training/trainer.py::Trainer.__init__", "experiment/run.py::main"):
        assert name in names, name


def test_no_long_functions():
    long = sorted((n, name, line) for n, name, line in package_functions() if n > MAX_LINES and name not in KNOWN)
    report = "\n".join(f"{name} (line {line}): {n} lines" for n, name, line in long)
    assert not long, f"{len(long)} function(s) over {MAX_LINES} lines (split them into named steps):\n{report}"


def test_known_long_functions_are_still_long():
    lengths = {name: n for n, name, _ in package_functions()}
    stale = sorted(name for name in KNOWN if lengths.get(name, 0) <= MAX_LINES)
    assert not stale, f"remove these entries from KNOWN (gone or now short enough): {stale}"


def test_a_long_function_is_measured():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    src = f"@decorator\ndef long():\n{body}\n\n\nclass C:\n    def short(self):\n        def inner():\n            pass\n"
    found = {name: n for n, name, _ in function_lengths(src)}
    assert found == {"<text>::long": MAX_LINES + 2, "<text>::C.short": 3, "<text>::C.short.inner": 2}


if __name__ == "__main__":
    for n, name, line in sorted(package_functions(), reverse=True)[:20]:
        print(f"{n:4d} {name} (line {line})")
    sys.exit(0)
