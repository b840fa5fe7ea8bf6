"""`moectl sweep`: train a grid of configurations, usually over several seeds, and compare them.

A sweep file:

    base: configs/quickstart.yaml        # the config every cell starts from
    name: routers                        # the cells go to <run.dir>/<name>/<cell>/ (default: the file's stem)
    set: {train.max_steps: 200}          # overrides for every cell (`--set` adds more)
    grid:                                # every combination of these values is a cell
      moe.router: [topk, switch, sigmoid]
      train.seed: [1, 2, 3]
    variants:                            # optional: named sets of keys, each crossed with the grid
      - {name: moe}
      - {name: dense, model.arch: transformer_dense}
      # a string may name another key of the cell: each seed fine-tunes its own run
      # - {name: tuned, train.init_from: "runs/pretrain/moe_seed={train.seed}"}
    compare:                             # optional: every group against a baseline, paired by seed
      baseline: dense                    # a variant's name, or {grid key: value}, e.g. {moe.router: topk}
      metric: eval_loss                  # one of the report's metrics (default eval_loss)
      better: lower                      # the rule, declared before the run: which way is better,
      margin: 0.02                       # and the margin within which arms are called equivalent
      # or several metrics, each with its rule (the first is the headline):
      # metrics: {eval_loss: {better: lower, margin: 0.02}, maxvio: {better: lower}}
    record: results/routers.json         # optional: the results to commit (relative to this file)

Every cell is validated before any starts (`--dry-run` stops there: it lists each cell and the
keys it sets, and writes nothing). A cell that changes `moe.router` also gets what that router
needs unless the sweep sets it (config.router_needs, as for `moectl train --set`: Switch's top_k
1, GShard's 2, and the router's own paper losses and weight normalisation); the runner says what
that changed, once per router.

Each cell is an ordinary run directory, trained by `moectl train` in a child process (its
output in <sweep>/logs/<cell>.log), so eval, route-stats, TensorBoard and export work on it. Cells
run one after another or `jobs` at a time, each with its share of the cores, seed by seed: every
arm of the first seed, then of the next, so the arms of a pair train side by side (with --jobs at
the same time, under the same load) and a stopped sweep leaves whole pairs. A finished cell
is skipped, a stopped one resumed; a failed one is reported and the others go on. The progress
counts cells done of all, with an ETA from this session's finished cells. Ctrl-C stops the
running cells at their next step (they save) and a rerun continues.

The report (sweep_report.py) groups the cells over `train.seed` and gives each group's mean and
95% confidence interval (Student's t) of the final metrics, and with `compare:` each group's
paired difference from its baseline with its interval and verdict, the eval loss at equal
training seconds, and the baseline's steps to reach the group's final loss.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from moectl import config
from moectl.commands.sweep_report import (
    SEED,
    Cell,
    Sweep,
    compare,
    finished,
    parse_compare,
    show,
    summarize,
    write_record,
    write_report,
)
from moectl.common import console
from moectl.common.errors import ConfigError
from moectl.config import Config
from moectl.services import checkpoint

SWEEP_KEYS = ("base", "name", "set", "grid", "variants", "compare", "record")
ATTEMPT = "=== moectl sweep: attempt"  # opens each attempt in a cell's log
def _as_set(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: numbers, strings, null and lists parse back as they were


def _fill(values: dict[str, Any], where: str) -> dict[str, Any]:
    """A string value may name the cell's other values in braces, e.g. train.init_from:
    runs/claims/dense_seed={train.seed}: each seed starts from its own run."""
    def filled(key: str, value: Any) -> Any:
        if not isinstance(value, str) or "{" not in value:
            return value
        def one(match: re.Match) -> str:
            name = match.group(1)
            if name not in values or name == key:
                raise ConfigError(f"{where}: {key}={value!r} names {{{name}}}, which is not another key of the cell "
                                  f"(its keys: {', '.join(k for k in values if k != key)})")
            return values[name] if isinstance(values[name], str) else _as_set(values[name])
        return re.sub(r"\{([\w.]+)\}", one, value)
    return {k: filled(k, v) for k, v in values.items()}


def _cell_name(values: dict[str, Any], variant: Optional[str]) -> str:
    shorts = [k.rsplit(".", 1)[-1] for k in values]
    parts = [f"{s if shorts.count(s) == 1 else k}={v}" for s, (k, v) in zip(shorts, values.items())]
    return "_".join(([variant] if variant else []) + parts).replace("/", "-").replace(" ", "") or "base"


def load(path: Path, overrides: Optional[list[str]] = None) -> Sweep:
    """Read and validate a sweep file and every cell's config; nothing runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with base, grid and optionally name, set, variants")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; a sweep file has {', '.join(SWEEP_KEYS)}")
    if "base" not in raw:
        raise ConfigError(f"{path}: no `base:` config to start the cells from")
    base = Path(raw["base"])
    if not base.is_file() and (path.parent / base).is_file():  # relative to the sweep file rather than here
        base = path.parent / base
    if not base.is_file():
        raise ConfigError(f"{path}: base: {base}: no such config file")
    shared = raw.get("set") or {}
    shared = [f"{k}={_as_set(v)}" for k, v in shared.items()] if isinstance(shared, dict) else list(shared)
    shared += list(overrides or [])
    grid, variants = raw.get("grid") or {}, raw.get("variants") or [{}]
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"{path}: grid: give each key a non-empty list of values, e.g. grid: {{train.seed: [1, 2, 3]}}")
    if not grid and variants == [{}]:
        raise ConfigError(f"{path}: the grid is empty; give grid: {{key: [values]}} or variants")
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"{path}: variants: give a list of mappings, e.g. [{{name: dense, model.arch: transformer_dense}}]")
    spec = parse_compare(raw.get("compare"), f"{path}: compare", grid, [v["name"] for v in variants if v.get("name")])
    base_cfg = config.load(base, shared)
    name = str(raw.get("name") or path.stem)
    root = Path(base_cfg.run.dir) / name
    cells = []
    for variant in variants:
        variant = dict(variant)
        label = variant.pop("name", None)
        for combo in itertools.product(*grid.values()):
            values = _fill({**variant, **dict(zip(grid, combo))}, f"{path}: {label or 'grid'}")
            cell_name = _cell_name(dict(zip(grid, combo)), label)
            sets = shared + [f"{k}={_as_set(v)}" for k, v in values.items()]
            try:
                cfg = config.load(base, sets + [f"run.dir={root}", f"run.name={cell_name}"])
                needs = cfg.router_filled  # the child's `moectl train` sets the same (config.load)
                _check_existing(root / cell_name, cfg)
            except ConfigError as exc:
                raise ConfigError(f"{path}: cell {cell_name}: {exc}") from None
            cells.append(Cell(cell_name, label, values, needs, sets, cfg, root / cell_name))
    if len({c.name for c in cells}) != len(cells):
        raise ConfigError(f"{path}: two cells share a name; give each variant a distinct `name:`")
    if SEED in grid:  # seed by seed: a pair's arms train side by side, and a stopped sweep leaves whole pairs
        cells.sort(key=lambda c: grid[SEED].index(c.values[SEED]))
    keys = (["variant"] if any(c.variant for c in cells) else []) + list(grid)
    record = raw.get("record")
    if record is not None and not isinstance(record, str):
        raise ConfigError(f"{path}: record: give a file path for the results, e.g. results/{name}.json")
    record = None if record is None else path.parent / record  # relative to the sweep file, as base is not
    return Sweep(path, name, base, root, keys, cells, spec, record)


# What a cell's earlier run may differ in and still be continued (or reported) as this cell.
FREE_KEYS = ("run.", "log.", "checkpoint.", "data.num_proc", "data.cache_dir", "train.eval_every")


def _check_existing(run_dir: Path, cfg: Config) -> None:
    """A run already in the cell's directory must be this cell's: the same config, but for how it
    logs and saves, and a train.max_steps that may grow (the run then continues)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    changed = {k: v for k, v in config.changed(config.load(saved_path, saved=True), cfg).items()
               if not k.startswith(FREE_KEYS) and not (k == "train.max_steps" and v[1] > v[0])}
    if changed:
        diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:3])
        raise ConfigError(f"{run_dir} holds a run of another config ({diff}); delete it, or give the sweep another name")


# ---------------------------------------------------------------------------------------- running


def _start(sweep: Sweep, cell: Cell, threads: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "moectl", "train", str(sweep.base), *(a for o in cell.overrides for a in ("--set", o)),
            "--set", f"run.dir={sweep.root}", "--run-name", cell.name]
    started_before = (cell.run_dir / "config.yaml").is_file() or checkpoint.latest(cell.run_dir) is not None
    args += ["--resume"] if started_before else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)), "PYTHONUNBUFFERED": "1"}
    log_path(sweep, cell).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path(sweep, cell), "a")
    log.write(f"{ATTEMPT} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(args[1:])}\n")
    log.flush()
    # Its own session: a Ctrl-C at the terminal reaches this process alone, which passes on one.
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def log_path(sweep: Sweep, cell: Cell) -> Path:
    return sweep.root / "logs" / f"{cell.name}.log"


def _error_line(sweep: Sweep, cell: Cell, code: int) -> str:
    """The last attempt's error line (its exit code when it printed none)."""
    text = log_path(sweep, cell).read_text(errors="replace")
    lines = text[text.rfind(ATTEMPT):].splitlines()[1:]
    said = next((line for line in reversed(lines) if line.startswith("error:")), None)
    return said or (f"killed by signal {-code}" if code < 0 else f"exited with code {code}; see {log_path(sweep, cell)}")


def run(sweep: Sweep, jobs: int = 1) -> bool:
    """Train every unfinished cell; True when all finished. A Ctrl-C stops the running cells
    (they save) and raises KeyboardInterrupt."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = []
    for cell in sweep.cells:
        if finished(cell):
            cell.status = "skipped"
        else:
            todo.append(cell)
    running: dict[subprocess.Popen, tuple[Cell, float]] = {}
    total = len(sweep.cells)
    # The cells run in sessions of their own, so a SIGTERM or a hang-up must stop them through here too;
    # SIGINT gets the handler explicitly, since a sweep started in the background inherits it ignored.
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _interrupt) for s in stopping} if threading.current_thread() is threading.main_thread() else {}
    # Cells done / total; the ETA counts the cells finished in this session (a skipped one took no time).
    with console.progress(f"sweep {sweep.name}", total, "cells", completed=total - len(todo)) as bar:
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    cell = todo.pop(0)
                    console.status(f"cell {cell.name}: training, {len(todo) + len(running) + 1} of {total} to go; "
                                   f"log {log_path(sweep, cell)}")
                    running[_start(sweep, cell, threads)] = (cell, time.perf_counter())
                for proc in [p for p in running if p.poll() is not None]:
                    cell, t0 = running.pop(proc)
                    if proc.returncode == 0:
                        cell.status = "done"
                        console.status(f"cell {cell.name}: done in {time.perf_counter() - t0:.0f} s")
                    elif proc.returncode == 130:  # it was stopped (it saved): a rerun continues it
                        cell.status = "stopped"
                    else:
                        cell.status, cell.error = "failed", _error_line(sweep, cell, proc.returncode)
                        console.warn(f"cell {cell.name} failed: {cell.error}")
                    bar.advance()
                time.sleep(0.2)
        except KeyboardInterrupt:
            _stop(running)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return all(c.status in ("done", "skipped") for c in sweep.cells)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(running: dict[subprocess.Popen, tuple[Cell, float]]) -> None:
    """Ctrl-C (or SIGTERM / SIGHUP to this process): every running cell gets one SIGINT, finishes
    its step and saves; a second Ctrl-C passes on a second one (they abort). Whatever still runs
    after 120 s is killed."""
    console.warn("interrupt: the running cells save a checkpoint and stop; rerun the sweep to continue")
    for proc, (cell, _) in running.items():
        proc.send_signal(signal.SIGINT)
        cell.status = "stopped"
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            for proc in running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    for proc in running:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------- report


def router_fills(sweep: Sweep) -> list[str]:
    """One line per router (and what it brings) of the keys the sweep fills in for the cells that
    switch to it: only those that change a value (config.load's router_filled), resolved, and not
    repeated for every cell and seed."""
    groups: dict[tuple, list[str]] = {}
    for cell in sweep.cells:
        if cell.needs:
            values = tuple(f"{k}={getattr(cell.cfg.moe, k.split('.', 1)[1])}" for k in cell.needs)
            groups.setdefault((cell.cfg.moe.router, values), []).append(cell.name)
    lines = []
    for (router, values), cells in groups.items():
        where = f"{len(cells)} cells" if len(cells) > 1 else f"cell {cells[0]}"
        lines.append(f"moe.router={router} brings {', '.join(values)} ({where}; what it needs and its paper's "
                     "defaults: set any of them in the sweep to choose your own)")
    return lines


def dry_run(sweep: Sweep) -> list[str]:
    """`--dry-run`: each cell and the keys it sets over the base config (its grid and variant
    values, then what its router brings); nothing is trained or written."""
    lines = []
    width = max(len(c.name) for c in sweep.cells)
    for cell in sweep.cells:
        keys = ", ".join(f"{k}={v if isinstance(v, str) else _as_set(v)}" for k, v in cell.values.items())
        needs = ", ".join(f"{k}={getattr(cell.cfg.moe, k.split('.', 1)[1])}" for k in cell.needs)
        keys = "; ".join(part for part in (keys, needs and f"for its router: {needs}") if part)
        done = "  (finished)" if finished(cell) else ""
        lines.append(f"{cell.name:<{width}}  {keys or '(the base config)'}{done}")
    return lines


def sweep_command(path: Path, overrides: Optional[list[str]], jobs: int, report_only: bool,
                  dry: bool = False) -> int:
    """`moectl sweep`: validate, run (unless `report_only`), report; the exit code. `dry`:
    validate and list the cells, writing nothing."""
    if dry and report_only:
        raise ConfigError("--dry-run lists the cells and --report reports them: choose one")
    sweep = load(path, overrides)
    for line in router_fills(sweep):
        console.status(line)
    if dry:
        first = sweep.cells[0]
        shared = first.overrides[: len(first.overrides) - len(first.values)]  # the sweep's set: and --set
        console.status(f"sweep {sweep.name}: {len(sweep.cells)} cells in {sweep.root}, each from {sweep.base}"
                       + (f" with {', '.join(shared)}" if shared else "") + "; dry run: nothing trained or written")
        for line in dry_run(sweep):
            console.out.print(line, highlight=False, markup=False, soft_wrap=True)
        return 0
    console.status(f"sweep {sweep.name}: {len(sweep.cells)} cells in {sweep.root}")
    complete = run(sweep, jobs) if not report_only else True
    rows, comparisons = summarize(sweep), compare(sweep)
    written = write_report(sweep, rows, comparisons)
    if sweep.record is not None:
        write_record(sweep, rows, comparisons)
    show(sweep, rows, comparisons, written)
    return 0 if complete else 1
