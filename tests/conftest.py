"""Shared test setup: never touch the network, keep every cache inside pytest's temp dirs.

The environment is set at import time, before `datasets` / `huggingface_hub` read it.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import pytest
import yaml

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="moectl-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf")
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_TMP / "hf" / "datasets")
os.environ["MOECTL_CACHE"] = str(_SESSION_TMP / "moectl-cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real text for test corpora: a fixed set of standard-library modules, written out by the tests.
CORPUS_MODULES = [
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "csv.py", "dataclasses.py",
    "difflib.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py",
    "json/encoder.py", "operator.py", "pprint.py", "random.py", "shlex.py", "statistics.py",
    "string.py", "textwrap.py", "tokenize.py", "typing.py", "uuid.py",
]


def module_texts(limit: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / m).read_text(encoding="utf-8") for m in CORPUS_MODULES[:limit]]


def write_corpus(directory: Path, n_files: int = 24) -> Path:
    """Write real text files (stdlib sources) as .txt; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(module_texts(n_files)):
        (directory / f"doc{i:02d}.txt").write_text(text)
    return directory


_SHARED_CORPUS = _SESSION_TMP / "corpus"
_shared_corpus_files: dict = {}  # name -> (size, mtime) as written; empty until it is


def _files(directory: Path) -> dict:
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir()} if directory.is_dir() else {}


def shared_corpus() -> Path:
    """The 24-file corpus of `tiny_config`, written once per session and read-only: every run on
    it finds its data and tokenizer in the session's cache (the cache key follows the files' paths
    and times, so a corpus written per test is tokenised, and its tokenizer trained, per test)."""
    if not _shared_corpus_files:
        shutil.rmtree(_SHARED_CORPUS, ignore_errors=True)
        write_corpus(_SESSION_TMP / "corpus.tmp").rename(_SHARED_CORPUS)
        for file in _SHARED_CORPUS.iterdir():
            file.chmod(0o444)  # a test that edits its corpus must ask tiny_config for its own
        _shared_corpus_files.update(_files(_SHARED_CORPUS))
    return _SHARED_CORPUS


@pytest.fixture(autouse=True)
def _shared_corpus_unchanged():
    """After each test: the shared corpus is as written (a test that changed it, even as root,
    errors here and the next test gets a new one)."""
    yield
    if _shared_corpus_files and _files(_SHARED_CORPUS) != _shared_corpus_files:
        _shared_corpus_files.clear()
        pytest.fail("this test changed the shared corpus of tiny_config; give it tiny_config(..., own_corpus=True)")


def tiny_config(tmp_path: Path, arch: str = "transformer_moe", *, own_corpus: bool = False, **sections) -> dict:
    """A config dict for a model that trains in seconds on a written corpus: the session's shared
    one, or with `own_corpus` one written to tmp_path/corpus (for a test that changes or moves it)."""
    corpus = write_corpus(tmp_path / "corpus") if own_corpus else shared_corpus()
    cfg = {
        "run": {"name": "tiny", "dir": str(tmp_path / "runs")},
        "model": {"arch": arch, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32},
        "data": {"source": "files", "data_files": str(corpus / "*.txt"), "sample_by": "document", "seq_len": 32},
        "tokenizer": {"vocab_size": 300},
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "device": "cpu"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "log": {"every": 2},
        "checkpoint": {"every": 3, "keep_last": 5},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def events(run_dir: Path):
    """Everything a run logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def weights(ckpt: Path) -> dict:
    """A checkpoint's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def prepare_corpus(cfg, tokenizer_file=None, only=None):
    """moectl.data.prepare with a whole config's data and tokenizer sections."""
    from moectl import data

    return data.prepare(cfg.data, cfg.tokenizer, tokenizer_file=tokenizer_file, only=only)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))


def interrupt_after_first_checkpoint(args: list[str], run_dir: Path):
    """Start `python -m moectl ARGS`, send Ctrl-C once its first checkpoint exists, and return
    (exit code, combined output, the step of its latest checkpoint)."""
    import signal
    import subprocess
    import sys
    import time

    from moectl.services import checkpoint

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moectl", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    deadline = time.time() + 120
    while checkpoint.latest(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output, checkpoint.read_meta(checkpoint.latest(run_dir))["step"]


def assert_sorted_equals_loop(make_layer, x, target, seed=None, tol=None):
    """Build an MoE layer on its sorted path and on its loop reference (`make_layer(impl)`, the
    loop copy given the sorted one's weights), run both on the same input (and, with `seed`, the
    same random draws) and assert equal outputs, input gradients and parameter gradients.
    Returns (sorted output, sorted record, loop record, sorted parameter gradients)."""
    import torch

    tol = tol or dict(rtol=1e-5, atol=1e-6)
    layers = {"sorted": make_layer("sorted"), "loop": make_layer("loop")}
    layers["loop"].load_state_dict(layers["sorted"].state_dict())
    results = {}
    for impl, layer in layers.items():
        assert layer.impl == impl
        xi = x.clone().requires_grad_(True)
        if seed is not None:
            torch.manual_seed(seed)
        out, record = layer(xi)
        (out * target).sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
        results[impl] = (out.detach(), xi.grad.clone(), grads, record)
    (out_s, gx_s, g_s, rec_s), (out_l, gx_l, g_l, rec_l) = results["sorted"], results["loop"]
    assert torch.equal(rec_s.kept, rec_l.kept) and torch.equal(rec_s.expert_idx, rec_l.expert_idx)
    torch.testing.assert_close(out_s, out_l, **tol)
    torch.testing.assert_close(gx_s, gx_l, **tol)
    assert set(g_s) == set(g_l)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_l[name], **tol, msg=lambda m: f"grad of {name}: {m}")
    return out_s, rec_s, rec_l, g_s


# ---------------------------------------------------------------------------------- test tiers
#
# Two markers, applied here and nowhere else, from what a test does (its source, its fixtures'
# and the test modules' helpers they call): `slow` where it trains a model (fit, `moectl train`
# or a sweep through the CLI, optimizer steps) or starts a process; `dist` where it starts
# several (torchrun, spawn). `pytest -m "not slow"` is the developer's quick loop; README's
# command runs everything.
_SEVERAL_PROCESSES = ("mp.spawn", "torchrun", "--nproc-per-node", "nproc_per_node")
_ONE_PROCESS = ("subprocess", "Popen", "interrupt_after_first_checkpoint", "moectl(")
_TRAINS = ("fit(", '"sweep"', "sweeping.run(", ".step()")
_CLI_TRAINS = ('["train"', "exit_code == 0")  # `moectl train` through CliRunner, expected to succeed


def _sources(item) -> str:
    """The source of a test function, of every fixture it uses, and of the test modules' helper
    functions these call (two calls deep)."""
    import inspect
    import re

    funcs = [getattr(item, "function", None)] + [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    seen, out = set(), []
    for _ in range(3):
        called = []
        for func in funcs:
            if func is None or func in seen:
                continue
            seen.add(func)
            try:
                text = inspect.getsource(func)
            except (TypeError, OSError):
                continue
            out.append(text)
            module = inspect.getmodule(func)
            for name in re.findall(r"\b([A-Za-z_]\w*)\(", text):
                helper = getattr(module, name, None)
                if inspect.isfunction(helper) and helper.__module__.split(".")[-1].startswith(("test_", "conftest")):
                    called.append(helper)
        funcs = called
    return "\n".join(out)


def pytest_sessionfinish(session, exitstatus):
    """The session's directory (caches, shared corpus, HF home) goes with the session: a full run
    leaves a few hundred MB in it."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model or starts a process (the quick loop: -m 'not slow')")
    config.addinivalue_line("markers", "dist: starts several processes (torchrun, spawn)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        text = _sources(item)
        dist = any(s in text for s in _SEVERAL_PROCESSES)
        if dist:
            item.add_marker(pytest.mark.dist)
        if dist or any(s in text for s in _ONE_PROCESS + _TRAINS) or all(s in text for s in _CLI_TRAINS):
            item.add_marker(pytest.mark.slow)
