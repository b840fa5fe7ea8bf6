"""The package keeps its shape: each module imports only from its own layer or the layers below,
no modules import each other in a circle, and README's module map names every module.

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

# Top to bottom. A module belongs to the first entry that is it or a package holding it.
LAYERS = [
    ("entry", ["moectl.__main__", "moectl.cli"]),
    ("commands", ["moectl.train", "moectl.evaluate", "moectl.route_stats", "moectl.generate", "moectl.export",
                  "moectl.sweep", "moectl.plan"]),
    ("services", ["moectl.checkpoint", "moectl.loaded_model", "moectl.warmstart", "moectl.hf", "moectl.tracking",
                  "moectl.sft", "moectl.data", "moectl.tokenizer", "moectl.distributed", "moectl.expert_parallel",
                  "moectl.hub", "moectl.optim"]),
    ("models", ["moectl.models"]),
    ("moe", ["moectl.moe"]),
    ("leaves", ["moectl.config", "moectl.runtime", "moectl.stats", "moectl.errors", "moectl.console",
                "moectl.fileio", "moectl.plots", "moectl.perf_model", "moectl.chat", "moectl"]),
]


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
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it, and in README's module map")


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
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moectl import train\n"
        "def f():\n    from moectl.export import export_hf\n    import moectl.moe.router\n"
    )
    assert imports("moectl.fake", src, modules()) == {"moectl.export", "moectl.moe.router"}
    assert "moectl.train" in graph()["moectl.cli"]  # the CLI imports its commands lazily, and that counts


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


def test_readme_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- module-map:start -->\n(.*?)<!-- module-map:end -->", readme, re.S)
    assert block, "README.md lost its module-map markers"
    named = set(re.findall(r"[a-z_]+(?:\.py|/)", block.group(1)))
    files = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert named == files, f"README's module map: missing {sorted(files - named)}, stale {sorted(named - files)}"


def test_the_command_line_starts_without_torch():
    code = "import sys, moectl.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing moectl.cli imported torch"
