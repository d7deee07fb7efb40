"""The package's shape, checked: stage folders whose imports run one way (no cycle, no module importing a
later stage), modules short enough to read, functions that fit on a screen. docs/architecture.md states the
same rule; this test keeps it true."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "distill"

# Each top-level module or folder of distill/ and its rank in the pipeline: a module may import modules of
# its own rank or lower, never a higher one.
RANKS = {
    "errors": 0, "fileio": 0, "versions": 0, "config": 0,
    "models": 1,
    "data": 2,
    "student": 3, "teacher": 3,
    "cache": 4,
    "evaluate": 5,
    "train": 6,
    "export": 7,
    "doctor": 8, "cli": 8, "cli_options": 8, "__main__": 8, "__init__": 8,
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(path: Path, name: str) -> set[str]:
    """The distill modules `path` imports (a package's __init__ counts as the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; distill uses absolute imports"
            base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    known = modules()
    return {m for m in out if m in known and m != name}


def stage(module: str) -> str:
    return module.split(".")[1]


def test_every_top_level_module_has_a_rank():
    missing = sorted({stage(m) for m in modules()} - set(RANKS))
    assert not missing, f"give these a rank in RANKS and in docs/architecture.md: {missing}"


def test_imports_run_one_way_without_cycles():
    graph = {m: imports(p, m) for m, p in modules().items()}
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if RANKS[stage(d)] > RANKS[stage(m)]]
    assert not upward, "imports of a later stage:\n" + "\n".join(sorted(upward))
    # cycles: depth-first search for a back edge
    state, cycles = {}, []

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_and_functions_are_short():
    long_modules = [f"{p.relative_to(PKG.parent)}: {n} lines" for p in PKG.rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{p.relative_to(PKG.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)
