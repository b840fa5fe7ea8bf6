"""README stays true: the generated config reference and the command CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from moectl.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_config_reference_matches_the_code():
    block = re.search(r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", README, re.S)
    assert block, "README.md lost its config-reference markers"
    assert block.group(1).strip() == reference_markdown().strip(), (
        "README's config reference is stale: paste the output of "
        "`python -c 'from moectl.config import reference_markdown; print(reference_markdown())'`"
    )


def test_ci_runs_the_readme_test_command():
    expected = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", README, re.S).group(1)
    awk = re.search(r"cmd=\$\(awk '(.*)' README.md\)", (ROOT / ".ci" / "run").read_text()).group(1)
    extracted = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert extracted.stdout.strip() == expected.strip()
    assert "pytest" in expected and "torch==2.13.0" in expected


def test_readme_quickstart_command_names_a_shipped_config():
    assert "moectl train configs/quickstart.yaml" in README
    assert (ROOT / "configs" / "quickstart.yaml").is_file()


def test_readme_router_table_lists_exactly_the_routers_config_accepts():
    from moectl.config import ROUTERS

    section = README.split("## Routing methods", 1)[1].split("\n## ", 1)[0]
    table = next(block for block in section.split("\n\n") if block.startswith("| `moe.router`"))
    assert tuple(re.findall(r"^\| `([a-z_0-9]+)` \|", table, re.M)) == ROUTERS
