"""The docs stay true: the config reference page is the generated one, CI runs README's test
command, the router table states what config resolves, and the pages name things as they are.
tests/test_docs_site.py builds the site itself."""

from __future__ import annotations

import re
import runpy
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
ROUTING = (DOCS / "routing.md").read_text()


def _router_table() -> str:
    """docs/routing.md's table of routers: the block that starts with the `moe.router` header."""
    return next(block for block in ROUTING.split("\n\n") if block.startswith("| `moe.router`"))


def test_config_reference_page_is_generated_from_the_code():
    render = runpy.run_path(str(ROOT / "docs" / "config_reference.py"))["render"]
    assert (DOCS / "config.md").read_text() == render(), (
        "docs/config.md is stale: run `python docs/config_reference.py`"
    )


def test_ci_runs_the_readme_test_command():
    expected = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", README, re.S).group(1)
    awk = re.search(r"cmd=\$\(awk '(.*)' README.md\)", (ROOT / ".ci" / "run").read_text()).group(1)
    extracted = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert extracted.stdout.strip() == expected.strip()
    assert "pytest" in expected and "torch==2.13.0" in expected
    assert ".[test,docs]" in expected, "CI must install the docs extra: tests/test_docs_site.py builds the site"


def test_readme_quickstart_command_names_a_shipped_config():
    assert "moectl train configs/quickstart.yaml" in README
    assert (ROOT / "configs" / "quickstart.yaml").is_file()


def test_readme_links_point_at_files_that_exist():
    """README is read on GitHub and PyPI, outside the site's strict build: check its links here."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_router_table_lists_exactly_the_routers_config_accepts():
    from moectl.config import ROUTERS

    assert tuple(re.findall(r"^\| `([a-z_0-9]+)` \|", _router_table(), re.M)) == ROUTERS


def test_router_table_states_each_routers_defaults_as_config_resolves_them():
    """Each row names exactly the loss coefficients that are nonzero by default, with their value,
    and the drop order under capacity, as `moectl config` resolves them for that router."""
    from moectl import config

    table = _router_table()
    header, rows = table.splitlines()[0], table.splitlines()[2:]
    columns = [c.strip() for c in header.strip("|").split("|")]
    losses_col, capacity_col = columns.index("losses by default (each per MoE layer)"), columns.index(
        "under capacity (`drop_policy`)")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        router = cells[0].strip("`")
        top_k = {"switch": 1}.get(router, 2)
        moe = config.from_dict({"moe": {"router": router, "top_k": top_k, "capacity_factor": 1.25}}).moe
        named = dict(re.findall(r"`([a-z_]+_coef)` ([0-9.e-]+)", cells[losses_col]))
        nonzero = {k: getattr(moe, k) for k in config.LOSS_KEYS if getattr(moe, k)}
        assert {k: float(v) for k, v in named.items()} == nonzero, router
        if router in ("expert_choice", "soft"):
            assert "`" not in cells[capacity_col], router  # no drops to order
        else:
            assert re.search(r"`(\w+)`", cells[capacity_col]).group(1) == moe.drop_policy, router


def test_the_mixture_head_is_named_the_mixture_of_experts_it_is():
    """Jacobs & Jordan's mixture of experts, one output matrix per expert: Yang et al.'s mixture of
    softmaxes (one shared output matrix) is named only to say it is not that."""
    from moectl import config

    texts = {"README.md": README, "model.head": config.ModelConfig.model_fields["head"].description,
             "models/head.py": (ROOT / "moectl" / "models" / "head.py").read_text()}
    texts.update({f"docs/{p.name}": p.read_text() for p in DOCS.glob("*.md")})
    for name, text in texts.items():
        flat = " ".join(text.split()).lower()
        for at in [m.start() for m in re.finditer(r"mixture[- ]of[- ]softmaxes", flat)]:
            assert "not yang et al" in flat[max(0, at - 80) : at], f"{name}: ...{flat[max(0, at - 80) : at + 40]}..."
    assert "## The mixture-of-experts head and EM" in (DOCS / "training.md").read_text()


def test_the_docs_say_what_a_dropped_lstm_token_gets():
    """Under lstm_sigmoid (App. C.1) a dropped token's 0 goes through the sigmoid and adds 0.5 per
    unit (tests/test_published.py measures it): it keeps its hidden state only without the sigmoid."""
    for name, text in {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in DOCS.glob("*.md")}}.items():
        flat = " ".join(text.split())
        for at in [m.start() for m in re.finditer("keep(s)? its hidden state", flat)]:
            sentence = flat[: at].rsplit(". ", 1)[-1]  # the sentence that says so
            assert "only with `lstm_sigmoid: false`" in sentence.lower(), f"{name}: {sentence}"
    assert "sigmoid(0) = 0.5 in every unit" in " ".join(ROUTING.split())
