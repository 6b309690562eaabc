"""Static facts about the repository's own Python files, for the ``test_repo_*`` checks.

Nothing here imports the scanned code: files are read and parsed with ``ast``.

    python tests/repo_scan.py    # prints the import graph's cycles, the layering violations
                                 # and the number of imports inside functions
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent

# Where each installed package lives in the checkout (setup.py's package_dir).
PACKAGE_DIRS = {
    "sparo_fast": "sparo_fast",
    "sparo_fast_kernels": "kernels",
    "sparo_fast_training": "training",
    "sparo_fast_experiment": "experiment",
}
# Plain directories whose files import each other by bare name (pytest and the scripts put the
# directory itself on sys.path).
SCRIPT_DIRS = {"tests": "tests", "bench": "bench", "bench.trainer": "bench/trainer"}
SKIP_DIRS = {".venv", ".git", "build", "dist", "__pycache__", "logs", "runs", "data_cache"}


def tracked_files(suffixes: Tuple[str, ...] = (".py",)) -> List[Path]:
    """The repository's tracked files (git ls-files), or a walk of the checkout without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in sorted(names) if n.endswith(suffixes) and (ROOT / n).is_file()]


def module_name(path: Path) -> Tuple[str, str]:
    """(import name, group) of a tracked file; group is the package or script directory."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts
    for pkg, d in PACKAGE_DIRS.items():
        dparts = tuple(d.split("/"))
        if parts[:len(dparts)] == dparts:
            rest = list(parts[len(dparts):])
            if rest and rest[-1] == "__init__":
                rest.pop()
            name = ".".join([pkg] + rest)
            group = name if path.name == "__init__.py" else name.rpartition(".")[0]
            return name, group
    for group, d in sorted(SCRIPT_DIRS.items(), key=lambda kv: -len(kv[1])):
        if str(rel.parent) == d:
            return f"{group}:{rel.name}", group
    return f"{rel}", "other"


class Module:
    def __init__(self, path: Path):
        self.path = path
        self.name, self.group = module_name(path)
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(), filename=str(path))

    def imports(self) -> Iterator[Tuple[str, List[str], int, bool]]:
        """(absolute target, imported names, line, inside a function) for every import."""
        for node, in_function in _walk(self.tree, False):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, [], node.lineno, in_function
            elif isinstance(node, ast.ImportFrom):
                yield self._resolve(node), [a.name for a in node.names], node.lineno, in_function

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.name.split(":")[-1].split(".")
        if not self.is_package:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))


def _walk(node: ast.AST, in_function: bool) -> Iterator[Tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                       ast.Lambda)))


def load_modules() -> Dict[str, Module]:
    return {m.name: m for m in map(Module, tracked_files())}


def _target(modules: Dict[str, Module], importer: Module, target: str, names: List[str]) -> List[str]:
    """The repository modules an import statement refers to (none for third-party imports)."""
    group = importer.group
    candidates = [target]
    if group in SCRIPT_DIRS and "." not in target:
        candidates.insert(0, f"{group}:{target}")  # a bare import resolves in the script's own directory
    for cand in candidates:
        if cand in modules:
            subs = [f"{cand}.{n}" for n in names if f"{cand}.{n}" in modules]
            return subs + ([cand] if len(subs) < len(names) or not names else [])
    return []


def import_graph(modules: Dict[str, Module]) -> Dict[str, Set[str]]:
    """module -> repository modules it imports (anywhere in the file, functions included)."""
    graph: Dict[str, Set[str]] = defaultdict(set)
    for m in modules.values():
        graph[m.name]
        for target, names, _, _ in m.imports():
            for t in _target(modules, m, target, names):
                if t != m.name:
                    graph[m.name].add(t)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan), sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def package_graph(modules: Dict[str, Module], graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """The module graph collapsed to packages (a package's ``__init__`` belongs to the package)."""
    pg: Dict[str, Set[str]] = defaultdict(set)
    for a, targets in graph.items():
        for b in targets:
            ga, gb = modules[a].group, modules[b].group
            if ga != gb:
                pg[ga].add(gb)
    return pg


def in_function_imports(modules: Dict[str, Module]) -> List[Tuple[str, int, str]]:
    """(file, line, imported module) of every import statement inside a function."""
    return sorted((str(m.path.relative_to(ROOT)), line, target)
                  for m in modules.values() for target, _, line, inside in m.imports() if inside)


def main() -> int:
    modules = load_modules()
    graph = import_graph(modules)
    print("module cycles:", cycles(graph) or "none")
    print("package cycles:", cycles(package_graph(modules, graph)) or "none")
    inside = in_function_imports(modules)
    per_file: Dict[str, int] = defaultdict(int)
    for f, _, _ in inside:
        per_file[f] += 1
    print(f"imports inside functions: {len(inside)} in {len(per_file)} files")
    for f, n in sorted(per_file.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d} {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
