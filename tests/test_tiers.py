"""The test tiers: `slow` and `dist` are applied in one place (conftest.py), from what each test
does, so the quick loop (`pytest -m "not slow"`) leaves out exactly the tests that train a model
or start processes."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _markers(session) -> dict[str, set[str]]:
    return {item.nodeid.split("/")[-1]: {m.name for m in item.iter_markers()} for item in session.items}


def test_no_test_marks_its_own_tier():
    for path in TESTS.glob("test_*.py"):
        assert not re.search(r"mark\.(slow|dist)\b", path.read_text()), f"{path.name}: tiers are applied in conftest.py"


def test_training_and_processes_are_slow_and_unit_tests_are_not(request):
    marks = _markers(request.session)
    if len(marks) < 100 or not any("slow" in m for m in marks.values()):
        return  # a selection, or the quick tier, was run: the other tests are not in this session
    slow = {name for name, m in marks.items() if "slow" in m}
    dist = {name for name, m in marks.items() if "dist" in m}
    assert dist <= slow
    assert any(n.startswith("test_distributed.py::test_two_processes_match_one") for n in dist)  # several processes
    assert any(n.startswith("test_train.py::test_train_writes_checkpoint") for n in slow - dist)  # fit
    assert any(n.startswith("test_sweep.py::test_a_sweep_runs") for n in slow)  # a sweep through the CLI
    assert any(n.startswith("test_train.py::test_ctrl_c_saves") for n in slow)  # a moectl subprocess
    assert not any(n.startswith(("test_moe.py", "test_config.py", "test_stats.py")) for n in slow)  # unit tests
