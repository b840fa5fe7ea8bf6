"""The package keeps its shape: the folders are the layers, each module imports only from its own
layer or the layers below, no modules import each other in a circle, only the command layer
receives the whole Config, each package's docstring maps its modules, and the module map of
docs/architecture.md names every top-level module and package.

Every import statement counts, at module level or inside a function. Only `if TYPE_CHECKING:`
blocks are skipped: they never run, they only name types for annotations.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moectl"

# Top to bottom: each layer is a set of packages (the entry: the command line's two modules). A
# module belongs to the first entry that is it or a package holding it.
LAYERS = [
    ("entry", ["moectl.__main__", "moectl.cli"]),
    ("commands", ["moectl.commands"]),
    ("services", ["moectl.services", "moectl.training", "moectl.data"]),
    ("models", ["moectl.models"]),
    ("moe", ["moectl.moe"]),
    ("leaves", ["moectl.config", "moectl.common", "moectl"]),
]
ENTRY_FILES = {"__init__.py", "__main__.py", "cli.py"}  # the only modules outside a package


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def layer_of(module: str) -> int:
    for depth, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "moectl") or module in members:
            return depth
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it, and in docs/architecture.md's module map")


def _runtime_nodes(tree: ast.AST):
    """Every node but those inside `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The moectl modules `module` imports (the most specific module each import names)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_import_points_down_or_sideways():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in graph().items()
        for b in targets
        if layer_of(b) < layer_of(a)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(g):
        if module not in state:
            visit(module, [module])


def test_the_checker_counts_imports_in_functions_but_not_type_checking_blocks(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moectl.commands import train\n"
        "def f():\n    from moectl.commands.export import export_hf\n    import moectl.moe.router\n"
    )
    assert imports("moectl.fake", src, modules()) == {"moectl.commands.export", "moectl.moe.router"}
    assert "moectl.commands.train" in graph()["moectl.cli"]  # the CLI imports its commands lazily, and that counts


def test_model_code_is_single_device():
    for module, path in modules().items():
        if module.startswith(("moectl.models", "moectl.moe")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                assert not any(n.startswith("torch.distributed") for n in names), f"{module} imports torch.distributed"


def test_module_map_names_every_module():
    """docs/architecture.md's map names every top-level module and package, and no file that is not there."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- module-map:start -->\n(.*?)<!-- module-map:end -->", page, re.S)
    assert block, "docs/architecture.md lost its module-map markers"
    named = set(re.findall(r"[a-z_]+(?:\.py|/)", block.group(1)))
    top = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    files = {p.name for p in PACKAGE.rglob("*.py")}
    stale = sorted(n for n in named if n not in top and n not in files)
    assert top <= named and not stale, f"docs/architecture.md's module map: missing {sorted(top - named)}, stale {stale}"


def test_the_command_line_starts_without_torch():
    code = "import sys, moectl.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing moectl.cli imported torch"


def test_the_folders_are_the_layers():
    """Every module but the command line's sits in a package, and every package in one layer."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ENTRY_FILES)
    assert not loose, f"modules outside a package (put each in its layer's package): {loose}"
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        layer_of(f"moectl.{package.name}")


def test_each_package_docstring_maps_its_modules():
    """A newcomer who opens a package sees which file holds what (models/ and moe/ say it in each file)."""
    for package in ("commands", "services", "training", "data", "common", "config"):
        init = PACKAGE / package / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        files = {p.name for p in init.parent.glob("*.py") if p.name != "__init__.py"}
        missing = sorted(f for f in files if not re.search(rf"(?m)^\s*{re.escape(f)}\s", doc))
        assert not missing, f"moectl/{package}/__init__.py's docstring does not map {missing}"


# Below the command layer a function takes the config section it needs, or plain values. The
# exceptions are a run's saved config (checkpoint metadata), which is the whole tree by nature,
# and the config package itself.
WHOLE_CONFIG_ALLOWED = {
    "moectl.services.checkpoint": {"metadata", "check_run_dir", "resume_conflicts", "finished"},
    "moectl.services.loaded_model": {"LoadedModel"},  # a saved run as loaded: its config.yaml, read-only
}


def _takes_whole_config(node: ast.AST) -> list[str]:
    """Names in `node` (a function or class) that receive the whole Config: parameters annotated
    Config (or named cfg without an annotation), and class fields annotated Config."""
    whole = re.compile(r"^(Optional\[)?(config\.)?Config\]?$")
    found = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        for a in args:
            annotation = ast.unparse(a.annotation).strip("'\"") if a.annotation else None
            if (annotation and whole.match(annotation)) or (annotation is None and a.arg == "cfg"):
                found.append(f"{node.name}({a.arg})")
    elif isinstance(node, ast.ClassDef):
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and whole.match(ast.unparse(item.annotation).strip("'\"")):
                found.append(f"{node.name}.{ast.unparse(item.target)}")
    return found


def whole_config_receivers() -> dict[str, list[str]]:
    """Per module below the command layer, what receives the whole Config (allowed ones left out)."""
    found = {}
    for module, path in modules().items():
        if LAYERS[layer_of(module)][0] in ("entry", "commands") or module.startswith("moectl.config"):
            continue
        allowed = WHOLE_CONFIG_ALLOWED.get(module, set())
        names = [name for node in ast.walk(ast.parse(path.read_text())) if getattr(node, "name", None) not in allowed
                 for name in _takes_whole_config(node)]
        if names:
            found[module] = names
    return found


def test_only_the_command_layer_receives_the_whole_config():
    found = whole_config_receivers()
    assert not found, "below the commands, pass the config section a function needs: " + "; ".join(
        f"{m}: {', '.join(n)}" for m, n in sorted(found.items()))


def test_the_signature_check_finds_a_whole_config(tmp_path):
    src = "def a(cfg): ...\ndef b(moe: MoEConfig): ...\ndef c(x: 'Config'): ...\nclass D:\n    cfg: Optional[Config]\n"
    tree = ast.parse(src)
    assert sorted(n for node in ast.walk(tree) for n in _takes_whole_config(node)) == ["D.cfg", "a(cfg)", "c(x)"]
