"""The shape of the code, read from the source (ast): utils/ and models/ import without cycles and the parts of utils/
depend only downward; no function outside bench/ is 60 lines or longer; a function with more than three parameters
takes the rest by keyword."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("utils", "models")
# the parts of utils/, lowest first: a module may import its own part and the parts below it, never one above
LEVELS = [
    ("utils.errors", "utils.runtime", "utils.stops"),
    ("utils.data",),
    ("utils.storage",),
    ("utils.session",),
    ("utils.training",),
    ("utils.evaluation",),
    ("utils.planning",),
    ("utils.api",),
    ("utils.cli", "utils.assemble", "utils.checkpoint"),
]
MAX_LINES = 60
# where a framework calls with a fixed positional signature (argparse calls an Action with four arguments)
POSITIONAL_ALLOWED = {("utils/cli/recipes.py", "__call__")}


def _modules() -> dict[str, Path]:
    """Every module of the packages: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the packages that ``name`` imports anywhere in its file (function-level imports too), with
    the packages Python initialises on the way (not its own, which are already being imported)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for mod in found:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if m in known and m != name and m not in own:
                edges.add(m)
    return edges


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _level(module: str) -> int | None:
    for i, part in enumerate(LEVELS):
        if any(module == p or module.startswith(p + ".") for p in part):
            return i
    return None


def test_no_import_cycles_in_utils_and_models():
    graph = _graph()
    assert "utils.training.loop" in graph and "utils.storage.checkpoint" in graph["utils.training.loop"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_utils_parts_depend_only_downward():
    graph = _graph()
    unplaced = [m for m in graph if m.startswith("utils.") and _level(m) is None]
    assert unplaced == [], f"add these modules to a part in LEVELS: {unplaced}"
    upward = [(m, d) for m, deps in graph.items() if m.startswith("utils.")
              for d in deps if d.startswith("utils.") and _level(d) > _level(m)]
    assert upward == []


def _python_files(*dirs: str, scripts: bool = True) -> list[Path]:
    """The scripts at the top of the repository (with ``scripts``) and every module under ``dirs``."""
    return (sorted(ROOT.glob("*.py")) if scripts else []) + [f for d in dirs for f in sorted((ROOT / d).rglob("*.py"))]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _long(files: list[Path]) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for f in files for fn in _functions(f) if fn.end_lineno - fn.lineno + 1 >= MAX_LINES]


def test_no_function_is_60_lines_or_longer():
    files = _python_files("utils", "tests")
    assert any(f.name == "api.py" for f in files) and any(f.name == "retrain_merge.py" for f in files)
    assert _long(files) == []


def test_no_function_in_models_is_60_lines_or_longer():
    files = _python_files("models", scripts=False)
    assert any(f.name == "llama.py" for f in files)
    assert _long(files) == []


def test_more_than_three_parameters_are_keyword_only():
    files = _python_files("utils", "models")
    assert any(f.name == "compress.py" for f in files)
    wide = []
    for f in files:
        for fn in _functions(f):
            positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
            if len(positional) > 3 and (str(f.relative_to(ROOT)), fn.name) not in POSITIONAL_ALLOWED:
                wide.append(f"{f.relative_to(ROOT)}:{fn.lineno} {fn.name}({', '.join(positional)})")
    assert wide == []


def test_tests_mirror_the_code_and_share_only_helpers():
    """Test files live beside the part of the code they test and import no other test file (only conftest's
    fixtures and helpers.py)."""
    files = sorted((ROOT / "tests").rglob("test_*.py"))
    assert {f.parent.relative_to(ROOT / "tests").parts[:1] for f in files} >= {("models",), ("utils",), ("scripts",)}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[-1].startswith(("test_", "conftest"))], f
