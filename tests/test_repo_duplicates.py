"""No new duplicated code: every run of WINDOW normalised lines that appears twice in the tracked
Python files must be listed in ``tests/duplicates_allowed.txt``.

Normalisation: indentation and trailing comments are dropped, and blank lines, comment lines and
import lines are skipped (files legitimately start with the same imports). Each window of WINDOW
consecutive remaining lines is hashed; a hash seen at two places is a duplicated block.

When this fails, make the code shared (a function both places call). If the repetition is
deliberate (e.g. two tests that must stay independent), add the printed line(s) to
``tests/duplicates_allowed.txt`` with a comment saying why. ``python tests/test_repo_duplicates.py``
prints the current duplicates in that file's format.
"""
from __future__ import annotations

import hashlib
import re
import sys
from collections import defaultdict
from pathlib import Path

from repo_scan import ROOT, tracked_files

WINDOW = 6
ALLOWED_FILE = Path(__file__).with_name("duplicates_allowed.txt")
_SKIP = re.compile(r"^(#|import |from \S+ import |\)|\]|\}|\"\"\"$|'''$|else:$|try:$|pass$|return$)")


def normalised_lines(text: str):
    """(line number, normalised text) of the lines that count."""
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if line and not _SKIP.match(line):
            yield n, re.sub(r"\s+", " ", line)


def windows(text: str):
    """(hash, first line number) of every WINDOW-line window of normalised lines."""
    lines = list(normalised_lines(text))
    for i in range(len(lines) - WINDOW + 1):
        chunk = "\n".join(t for _, t in lines[i:i + WINDOW])
        yield hashlib.sha1(chunk.encode()).hexdigest()[:16], lines[i][0]


def duplicated(files=None) -> dict:
    """hash -> sorted places ("path:line") of every window found at two places or more."""
    seen = defaultdict(list)
    for path in files if files is not None else tracked_files():
        rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        for h, line in windows(path.read_text()):
            seen[h].append(f"{rel}:{line}")
    return {h: sorted(places) for h, places in seen.items() if len(places) > 1}


def allowed() -> set:
    if not ALLOWED_FILE.exists():
        return set()
    return {line.split()[0] for line in ALLOWED_FILE.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_no_new_duplicated_blocks():
    new = {h: p for h, p in duplicated().items() if h not in allowed()}
    report = "\n".join(f"{h} {' '.join(places)}" for h, places in sorted(new.items(), key=lambda kv: kv[1]))
    assert not new, (f"{len(new)} duplicated {WINDOW}-line window(s) not in {ALLOWED_FILE.name} "
                     f"(share the code, or allow them with a reason):\n{report}")


def test_allowance_list_has_no_stale_entries():
    """An allowed duplicate that no longer exists is removed from the list, so it cannot return."""
    stale = allowed() - set(duplicated())
    assert not stale, f"remove these entries from {ALLOWED_FILE.name}: {sorted(stale)}"


def test_a_copied_block_is_found(tmp_path):
    block = "\n".join(f"value_{i} = compute({i}) * scale + offset_{i}" for i in range(WINDOW + 2))
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import os\n\n" + block + "\n")
    b.write_text("def f():\n    # the same lines, indented, with comments\n" +
                 "\n".join("    " + line + "  # note" for line in block.splitlines()) + "\n")
    found = duplicated([a, b])
    assert len(found) == 3  # 8 lines: three 6-line windows
    assert all(len(places) == 2 for places in found.values())
    (c := tmp_path / "c.py").write_text("\n".join(f"other_{i} = {i}" for i in range(10)) + "\n")
    assert duplicated([a, c]) == {}


if __name__ == "__main__":
    for h, places in sorted(duplicated().items(), key=lambda kv: kv[1]):
        print(h, " ".join(places))
    sys.exit(0)
