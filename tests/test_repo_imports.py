"""The import structure of the repository (parsed with ``ast``, imports inside functions included).

* no cycle between modules, nor between packages (``sparo_fast``, ``sparo_fast.clip``,
  ``sparo_fast_kernels``, ``sparo_fast_kernels.testing``, the trainer, the experiment, and the
  ``tests``/``bench`` directories);
* the core read-out (``sparo_fast`` outside ``sparo_fast.clip``) does not import
  ``sparo_fast.clip``: it must work with torch alone;
* the library (``sparo_fast`` and ``sparo_fast_kernels`` outside ``.testing``) does not import
  the developer tooling in ``sparo_fast_kernels.testing``.

``python tests/repo_scan.py`` prints the same facts for the whole checkout.
"""
import repo_scan

MODULES = repo_scan.load_modules()
GRAPH = repo_scan.import_graph(MODULES)


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scan_sees_the_packages():
    """Guards the checks below against a scan that silently finds nothing."""
    for name in ("sparo_fast.readout", "sparo_fast.clip.model", "sparo_fast_kernels.sparo_readout_op",
                 "sparo_fast_kernels.testing.interpreter_trace", "tests:accuracy", "bench:render"):
        assert name in MODULES, name
    assert "sparo_fast.clip.slots" in GRAPH["sparo_fast.clip.model"]
    assert "sparo_fast.readout" in GRAPH["sparo_fast.clip.model"]


def test_no_module_cycles():
    found = repo_scan.cycles(GRAPH)
    assert not found, f"import cycles between modules: {found}"


def test_no_package_cycles():
    found = repo_scan.cycles(repo_scan.package_graph(MODULES, GRAPH))
    assert not found, f"import cycles between packages: {found}"


def test_core_does_not_import_clip():
    bad = sorted((a, b) for a, targets in GRAPH.items() for b in targets
                 if _in(a, "sparo_fast") and not _in(a, "sparo_fast.clip") and _in(b, "sparo_fast.clip"))
    assert not bad, f"the core read-out imports sparo_fast.clip: {bad}"


def test_library_does_not_import_testing_tools():
    library = [m for m in GRAPH if (_in(m, "sparo_fast") or _in(m, "sparo_fast_kernels"))
               and not _in(m, "sparo_fast_kernels.testing")]
    bad = sorted((a, b) for a in library for b in GRAPH[a] if _in(b, "sparo_fast_kernels.testing"))
    assert not bad, f"library modules import sparo_fast_kernels.testing: {bad}"


def test_a_cycle_is_detected():
    """The cycle finder itself: a -> b -> c -> a is one cycle, d -> a is not part of it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert repo_scan.cycles(graph) == [["a", "b", "c"]]
    assert repo_scan.cycles({"a": {"b"}, "b": set()}) == []
