"""The package's shape (docs/architecture.md): commands on top, wings below, imports pointing down or
sideways. Read from the source with ast, so function-level imports count too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "urfm_fast"
COMMANDS = {"pretrain", "prepare", "evaluate", "export", "plot"}
TOP_LEVEL = COMMANDS | {"__init__", "config", "cli_checks"}
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


# ---------------------------------------------------------------------------------------------
# Rules over every source file of the package, kernels/, experiments/ and bench/ (tests excluded): commands
# are leaves, privates stay home, one lazy-import mechanism, small modules. Each reads source text with ast, so
# a self-test can plant a violation in a string.

ROOT = PKG.parent
COMMAND_MODULES = {f"urfm_fast.{c}" for c in COMMANDS}
LAZY_HOME = "urfm_fast/__init__.py"  # the one module-level __getattr__: every CLI's --help starts without torch
MAX_LINES = 500


def _sources() -> dict[str, str]:
    """Repository-relative path -> source text."""
    files = [*PKG.rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "experiments").rglob("*.py"),
             *(ROOT / "bench").rglob("*.py")]
    return {str(f.relative_to(ROOT)): f.read_text() for f in files if "__pycache__" not in f.parts}


def _dotted(path: str) -> str:
    """Repository-relative path -> its module name (kernels/ is installed as urfm_fast.kernels)."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "urfm_fast")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("urfm_fast", "bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def command_imports(path: str, source: str) -> list[str]:
    """Every import of a command module: import statements (any depth) and importlib.import_module("...")."""
    module, found = _dotted(path), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in COMMAND_MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.endswith("__init__.py"))
            found += [base] if base in COMMAND_MODULES else [
                f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in COMMAND_MODULES]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in COMMAND_MODULES):
            found.append(node.args[0].value)
    return [f"{path}: imports {m}" for m in found]


def private_imports(path: str, source: str, modules: set[str]) -> list[str]:
    """``from urfm_fast.x import _name`` and ``x._name`` where x is one of our modules bound by an import
    (``modules``: every module name of the tree, to tell a module from a class imported by name)."""
    module, bound, found = _dotted(path), {}, []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.endswith("__init__.py"))
            if not _ours(base):
                continue
            for a in node.names:
                if _private(a.name):
                    found.append(f"{path}:{node.lineno}: from {base} import {a.name}")
                elif f"{base}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name):
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, inner = [], node.value
            while isinstance(inner, ast.Attribute):
                chain.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in bound:
                owner = ".".join([bound[inner.id], *chain])
                if owner in modules and owner != module:
                    found.append(f"{path}:{node.lineno}: {owner}.{node.attr}")
    return found


def lazy_mechanisms(path: str, source: str) -> list[str]:
    """A module-level ``__getattr__`` outside LAZY_HOME, and any import hook (meta path finders) anywhere."""
    tree, found = ast.parse(source), []
    if path != LAZY_HOME:
        found += [f"{path}:{n.lineno}: module __getattr__" for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        if name in ("MetaPathFinder", "meta_path", "path_hooks"):
            found.append(f"{path}:{node.lineno}: import hook ({name})")
    return found


def long_modules(sources: dict[str, str]) -> list[str]:
    return [f"{p}: {n} lines" for p, s in sources.items() if p.startswith("urfm_fast/")
            and (n := len(s.splitlines())) > MAX_LINES]


def _modules(sources: dict[str, str]) -> set[str]:
    return {_dotted(p) for p in sources}


def test_nothing_imports_a_command():
    """Commands are leaves: tests drive them through main(argv) or a subprocess; nothing else imports one."""
    found = [v for p, s in _sources().items() for v in command_imports(p, s)]
    assert not found, "\n".join(found)


def test_no_private_name_crosses_a_module():
    sources = _sources()
    found = [v for p, s in sources.items() for v in private_imports(p, s, _modules(sources))]
    assert not found, "\n".join(found)


def test_one_lazy_import_mechanism():
    found = [v for p, s in _sources().items() for v in lazy_mechanisms(p, s)]
    assert not found, "\n".join(found)


def test_no_module_over_500_lines():
    assert not long_modules(_sources()), "\n".join(long_modules(_sources()))


def test_the_rules_catch_planted_violations():
    """Each rule above finds a violation planted in a made-up file, and passes the allowed spellings."""
    mods = {"urfm_fast.data", "urfm_fast.data.shards", "urfm_fast.kernels", "urfm_fast.kernels._triton"}
    wing = "urfm_fast/eval/x.py"
    assert command_imports(wing, "def f():\n    from urfm_fast.evaluate import run\n")
    assert command_imports(wing, "from urfm_fast import prepare\n")
    assert command_imports("experiments/x.py", "import urfm_fast.plot as p\n")
    assert command_imports(wing, "import importlib\nimportlib.import_module('urfm_fast.export')\n")
    assert command_imports("urfm_fast/data/x.py", "from .. import pretrain\n")
    assert not command_imports(wing, "from urfm_fast.eval import protocols\nimport urfm_fast.config\n")

    assert private_imports(wing, "from urfm_fast.data.shards import _read_jsonl\n", mods)
    assert private_imports("bench/x.py", "from bench.reference import _normalize\n", mods)
    assert private_imports("urfm_fast/data/x.py", "from .shards import _write_jsonl\n", mods)
    assert private_imports(wing, "from urfm_fast.kernels import _triton\n", mods)
    assert private_imports(wing, "from urfm_fast.data import shards\nshards._read_jsonl(p)\n", mods)
    assert private_imports(wing, "import urfm_fast.data.shards as s\ns._MARKER\n", mods)
    assert private_imports(wing, "import urfm_fast.data.shards\nurfm_fast.data.shards._x()\n", mods)
    assert not private_imports(wing, "from urfm_fast.data import shards\nfrom torch import _C\n"
                                     "shards.MARKER\nx._y\nself._z\n", mods)
    assert not private_imports("urfm_fast/data/shards.py", "import urfm_fast.data.shards as me\nme._x\n", mods)

    assert lazy_mechanisms("urfm_fast/data/__init__.py", "def __getattr__(name):\n    pass\n")
    assert lazy_mechanisms(LAZY_HOME, "import sys\nsys.meta_path.insert(0, Finder())\n")
    assert lazy_mechanisms("urfm_fast/x.py", "import importlib.abc\nclass F(importlib.abc.MetaPathFinder):\n"
                                             "    pass\n")
    assert not lazy_mechanisms(LAZY_HOME, "def __getattr__(name):\n    pass\n")
    assert not lazy_mechanisms("urfm_fast/x.py", "class A:\n    def __getattr__(self, name):\n        pass\n")

    assert long_modules({"urfm_fast/big.py": "x = 1\n" * 501, "urfm_fast/ok.py": "x = 1\n" * 500,
                         "kernels/k.py": "x = 1\n" * 900}) == ["urfm_fast/big.py: 501 lines"]


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
