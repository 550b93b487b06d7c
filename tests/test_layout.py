"""The package's shape (docs/architecture.md): commands on top, wings below, imports pointing down or
sideways. Read from the source with ast, so function-level imports count too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "urfm_fast"
COMMANDS = {"pretrain", "prepare", "evaluate", "export", "plot"}
TOP_LEVEL = COMMANDS | {"__init__", "config", "cli_checks", "synthetic", "shard_index"}  # the last two: old spellings
WINGS = {"data", "model", "train", "checkpoints", "eval"}


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The urfm_fast modules a file imports (``from urfm_fast.x import y`` counts y when y is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("urfm_fast"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("urfm_fast")}
    return out - {"urfm_fast.kernels"} - {m for m in out if m.startswith("urfm_fast.kernels.")}


def _graph() -> dict[str, set[str]]:
    # kernels/ is mapped in as urfm_fast.kernels by pyproject (a link to it in some checkouts): not a wing
    files = {_module(f): f for f in PKG.rglob("*.py") if f.relative_to(PKG).parts[0] != "kernels"}
    return {m: _imports(f, set(files)) for m, f in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    # a package's __init__ is imported with any of its modules: ignore that edge, count the rest
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _graph().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _stage(module: str) -> str:
    return (module.split(".") + [""])[1]


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(wing module, command module) for every import of a command from inside a wing."""
    return [(m, d) for m, deps in graph.items() if _stage(m) in WINGS for d in deps if _stage(d) in COMMANDS]


def test_no_wing_imports_a_command():
    assert not _upward(_graph()), _upward(_graph())


def test_top_level_holds_commands_and_wings_only():
    top = {f.stem for f in PKG.glob("*.py")}
    assert top <= TOP_LEVEL, sorted(top - TOP_LEVEL)
    assert {d.name for d in PKG.iterdir() if (d / "__init__.py").is_file()} - {"kernels"} == WINGS


def test_no_module_repeats_its_wings_name():
    repeated = [str(f.relative_to(PKG)) for w in WINGS for f in (PKG / w).glob("*.py")
                if f.stem.startswith(w.rstrip("s") + "_") or f.stem.startswith(w + "_")]
    assert not repeated, repeated


def test_the_checker_finds_a_circle_and_an_upward_import():
    """The graph helpers above are what the tests trust: a made-up circle and command import are caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = {"urfm_fast.eval.data": {"urfm_fast.prepare", "urfm_fast.data.shards"}, "urfm_fast.prepare": set()}
    assert _upward(graph) == [("urfm_fast.eval.data", "urfm_fast.prepare")]


def test_readme_is_short_and_reaches_every_doc_page():
    """README is the five-minute page; the manual is docs/, every page of it linked from README."""
    import re

    root = PKG.parent
    readme = (root / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024
    assert readme.index("pip install -e .") < readme.index("## A five-minute tour")  # the two commands first
    linked = {root / m for m in re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", readme)}
    pages = set((root / "docs").glob("*.md"))
    assert pages - linked == set(), sorted(p.name for p in pages - linked)
    assert all(p.is_file() for p in linked), sorted(str(p) for p in linked if not p.is_file())
