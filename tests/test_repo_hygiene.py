"""The repository speaks of itself alone.

Tracked text files must not cite issue numbers, the external copy of the design (the design is
``docs/DESIGN.md``, cited by section name), or the machinery of the environment the project was
developed in (work sessions, borrowed machines, remote-execution calls). Notes say what changed
and why in the project's own terms (e.g. "v1 -> v2").

Each pattern is small and precise; ``ALLOWED`` lists the legitimate uses (pytest's own
"session" API).
"""
import re

import pytest

from repo_scan import ROOT, tracked_files

FORBIDDEN = {
    "issue number": r"\bissues?\s*#?\d+",
    "bare #number reference": r"(?<![\w&/#])#\d{1,4}\b(?![\w-])",
    "the external design file": r"SPARO\.md|\.\./shared\b|\bshared/SPARO",
    "work sessions": r"\bsessions?\b",
    "borrowed machines": r"\blent\b",
    "remote-execution calls": r"\brun\(command=|\bcarry=\[|\bdevice (?:calls?|sessions?|tool)\b",
    "this environment's tools": r"\bsearch tool\b|`duplicates`|\bduplicates command\b|\bhelper sessions?\b",
}
# pytest's API: session-scoped fixtures, session hooks, the benchmark plugin's session object,
# subprocess's start_new_session.
ALLOWED = re.compile(r'scope="session"|\bpytest_session\w+\((session\b)?|\b_benchmarksession\b|\bstart_new_session\b|'
                     r'\bsession\.config\b')
SKIP_SUFFIXES = (".pt", ".png", ".jpg", ".whl", ".gz", ".tar")
THIS_FILE = "tests/test_repo_hygiene.py"


def hits(text: str, path: str = "<text>"):
    """(path, line number, what, line) for every forbidden use in ``text``."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if re.search(pattern, line, flags=re.IGNORECASE):
                if what == "work sessions" and not re.sub(ALLOWED, "", line).lower().count("session"):
                    continue
                out.append((path, n, what, line.strip()[:160]))
    return out


def _text_files():
    for path in tracked_files(suffixes=("",)):
        rel = str(path.relative_to(ROOT))
        if rel == THIS_FILE or rel.endswith(SKIP_SUFFIXES):
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue
        yield rel, data.decode("utf-8", errors="replace")


def test_no_forbidden_references():
    found = [h for rel, text in _text_files() for h in hits(text, rel)]
    report = "\n".join(f"{p}:{n}: {what}: {line}" for p, n, what, line in found)
    assert not found, f"{len(found)} reference(s) to things outside the project:\n{report}"


def test_the_scan_reads_the_docs():
    names = {rel for rel, _ in _text_files()}
    for rel in ("README.md", "docs/DESIGN.md", "bench/NOTES.md", "sparo_fast/readout.py"):
        assert rel in names, rel


def _j(*parts: str) -> str:
    return "".join(parts)


# Assembled from pieces so that no line of this file is itself a reference of the kind it forbids.
CAUGHT = [
    _j("see is", "sue 10 for the targets"), _j("as asked in ", "#", "12"), _j("the spec (../sha", "red/SPARO.md)"),
    _j("see SPARO", ".md"), _j("measured while 6 ses", "sions shared it"), _j("no GPU was le", "nt"),
    _j("run(com", 'mand="bash x.sh", car', 'ry=[".whl"])'), _j("two dev", "ice calls"),
    _j("found with the `dupli", "cates` command"),
]


@pytest.mark.parametrize("line", CAUGHT)
def test_patterns_catch(line):
    assert hits(line), line


@pytest.mark.parametrize("line", [
    '@pytest.fixture(scope="session")', "def pytest_sessionfinish(session, exitstatus):",
    'out = session.config.getoption("bench_out")', "subprocess.Popen(cmd, start_new_session=True)",
    "a sequence with no duplicates", "OpenCLIP's zero-shot helpers", "tests/helpers.py", "colour #ff0000",
    "docs/DESIGN.md, \"The floor and how bench/ counts against it\"", "a known issue of the interpreter",
])
def test_patterns_allow(line):
    assert not hits(line), line
