"""Rich output for people: progress bars, status lines, the end-of-run summary.

Progress and status go to stderr, results to stdout, so `--json` output stays parseable. Every
wait longer than a moment reports its progress (`progress`: done / total, elapsed, ETA): a rich
bar in a terminal, and when stderr is not a terminal (a log file, CI) a plain line at most every
PLAIN_EVERY seconds and one when it ends; training's bar becomes one plain line per logging
window. StopOnInterrupt turns the first Ctrl-C into a request the training loop answers at the
end of its step.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from moectl.common.runtime import is_main_process

err = Console(stderr=True)
out = Console()


def status(message: str) -> None:
    if is_main_process():
        err.print(f"[dim]>[/] {escape(message)}")


def warn(message: str) -> None:
    if is_main_process():
        err.print(f"[bold yellow]warning:[/] {escape(message)}")


def error(message: str) -> None:
    for line in message.splitlines() or [""]:
        err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def human(n: float) -> str:
    for unit in ("", "k", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def duration(seconds: float) -> str:
    """A time span for a progress line: 3.2s, 45s, 1m05s, 2h03m."""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(elapsed: float, done: float, left: Optional[float]) -> Optional[float]:
    """Seconds still to go at the rate so far (None before anything is done, or with no total)."""
    if left is None or done <= 0:
        return None
    return elapsed / done * max(left, 0.0)


def _count(n: float) -> str:
    return f"{int(n)}" if n < 10_000 and n == int(n) else human(n)


PLAIN_EVERY = 10.0  # seconds between a wait's plain progress lines when stderr is not a terminal
_live = threading.Lock()  # rich shows one live display at a time: a progress inside another stays silent


class _CountColumn(ProgressColumn):
    """done/total unit (done unit when the total is unknown)."""

    def render(self, task) -> Text:
        total = f"/{_count(task.total)}" if task.total is not None else ""
        return Text(f"{_count(task.completed)}{total} {task.fields['unit']}".rstrip())


class _EtaColumn(ProgressColumn):
    """The ETA from the work done since this progress started (rich's own estimate looks at the
    last 30 s alone, so it is blank where each unit takes longer, as sweep cells do)."""

    def render(self, task) -> Text:
        left = None if task.total is None else task.total - task.completed
        seconds = eta(task.elapsed or 0.0, task.completed - task.fields["begun"], left)
        return Text(f"eta {duration(seconds)}" if seconds is not None else "", style="progress.remaining")


class Task:
    """One wait being reported (see `progress`): advance it as the work gets done."""

    def __init__(self, description: str, total: Optional[float], unit: str, completed: float, mode: str,
                 console: Console):
        self.description, self.total, self.unit = description, total, unit
        self.start = self.done = completed
        self.mode, self.console = mode, console
        self.t0 = self.last_line = time.perf_counter()
        self.bar: Optional[Progress] = None
        if mode == "rich":
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=24), _CountColumn(), TimeElapsedColumn(),
                _EtaColumn(), console=console, transient=False,
            )
            self.task = self.bar.add_task(description, total=total, completed=completed, unit=unit, begun=completed)

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.mode == "plain" and time.perf_counter() - self.last_line >= PLAIN_EVERY:
            self._line(final=False)

    def describe(self, description: str) -> None:
        """A new description for what follows (e.g. the next phase of the same wait)."""
        self.description = description
        if self.bar is not None:
            self.bar.update(self.task, description=description)

    def line(self, final: bool = False) -> str:
        """The plain form: `evaluating: 3/10 batches | elapsed 4.1s | eta 9.6s`."""
        elapsed = time.perf_counter() - self.t0
        if self.total is not None:
            count = f"{_count(self.done)}/{_count(self.total)} {self.unit}"
        else:
            count = f"{_count(self.done)} {self.unit}" if self.unit else "done" if final else ""
        parts = [f"{self.description}: {count}".rstrip(": "), f"elapsed {duration(elapsed)}"]
        seconds = None if final else eta(elapsed, self.done - self.start,
                                         None if self.total is None else self.total - self.done)
        if seconds is not None:
            parts.append(f"eta {duration(seconds)}")
        return " | ".join(parts)

    def _line(self, final: bool) -> None:
        self.last_line = time.perf_counter()
        self.console.print(self.line(final), highlight=False, markup=False, soft_wrap=True)


@contextmanager
def progress(description: str, total: Optional[float], unit: str = "", completed: float = 0,
             enabled: bool = True, console: Console = err) -> Iterator[Task]:
    """Report a wait on stderr: `with progress("evaluating", len(batches), "batches") as bar:
    ... bar.advance()`. A rich bar in a terminal (done/total, elapsed, ETA); otherwise a plain line
    at most every PLAIN_EVERY seconds and a last one when the work is done. `total` None: unknown
    (the bar pulses). `completed`: work done before this started (a resumed sweep's finished
    cells), which the ETA leaves out. Only the main process reports; a progress that starts while
    another's bar is live stays silent, as does one whose work raises."""
    mode = "off"
    locked = False
    if enabled and is_main_process():
        if console.is_terminal:
            locked = _live.acquire(blocking=False)
            mode = "rich" if locked else "off"
        else:
            mode = "plain"
    task = Task(description, total, unit, completed, mode, console)
    try:
        if task.bar is not None:
            task.bar.start()
        yield task
        if mode == "plain":
            task._line(final=True)
    finally:
        if task.bar is not None:
            task.bar.stop()
        if locked:
            _live.release()


class TrainProgress:
    """step, loss, lr, tokens/s, worst-layer imbalance, elapsed, ETA."""

    def __init__(self, total_steps: int, start_step: int, console: Console = err, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.interactive = enabled and console.is_terminal
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.fields = dict(loss="-", lr="-", tps="-", imb="-")
        self.progress: Optional[Progress] = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(bar_width=24),
                TextColumn("loss [bold]{task.fields[loss]}[/] lr {task.fields[lr]} {task.fields[tps]} tok/s"),
                TextColumn("imbalance {task.fields[imb]}"),
                TimeElapsedColumn(),
                _EtaColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, begun=start_step,
                                               **self.fields)

    def __enter__(self) -> "TrainProgress":
        self.t0 = time.perf_counter()  # elapsed and ETA count this session's steps
        if self.progress and _live.acquire(blocking=False):
            self.progress.start()
        elif self.progress:  # another bar is live: plain lines instead
            self.progress, self.interactive = None, False
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()
            _live.release()

    def update(self, step: int, loss: float, lr: float, tokens_per_sec: Optional[float] = None,
               imbalance: Optional[float] = None) -> None:
        self.fields["loss"] = f"{loss:.4f}"
        self.fields["lr"] = f"{lr:.2e}"
        if tokens_per_sec is not None:
            self.fields["tps"] = human(tokens_per_sec)
        if imbalance is not None:
            self.fields["imb"] = f"{imbalance:.2f}"
        if self.progress:
            self.progress.update(self.task, completed=step, **self.fields)

    def window_line(self, step: int) -> None:
        """The non-interactive stand-in for the bar, once per logging window:
        `step 50/600 | loss 4.1234 | lr 3.00e-03 | 7.32k tok/s | imbalance 1.21 | elapsed 1m05s | eta 11m50s`."""
        if self.enabled and not self.interactive:
            f = self.fields
            elapsed = time.perf_counter() - self.t0
            left = eta(elapsed, step - self.start_step, self.total - step)
            self.console.print(
                f"step {step}/{self.total} | loss {f['loss']} | lr {f['lr']} | {f['tps']} tok/s | imbalance {f['imb']}"
                f" | elapsed {duration(elapsed)}" + (f" | eta {duration(left)}" if left is not None else ""),
                highlight=False, soft_wrap=True,  # one line per window in a log, however long
            )

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)


def quiet_libraries() -> None:
    """Keep library chatter out of our output: datasets' bars only on a terminal, no known-noise warnings."""
    import warnings

    import datasets

    if not err.is_terminal or not is_main_process():
        datasets.disable_progress_bars()
    # Builders log read failures with a traceback before raising; moectl reports them in one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def train_summary(result, instruction_tuned: bool = False) -> None:
    """The end-of-run summary: where things are, how good the model is, what to run next (for an
    instruction-tuned run, data.task=sft, also how to talk to it and score its answers)."""
    if not is_main_process():
        return
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")  # paths and commands wrap whole, never cut to "…"
    grid.add_row("checkpoint", str(result.checkpoint))
    grid.add_row("logs", f"{result.run_dir}  (TensorBoard events, config.yaml, tokenizer.json)")
    if result.eval_loss is not None:
        start = f"{result.first_eval_loss:.4f} -> " if result.first_eval_loss is not None else ""
        grid.add_row("validation", f"loss {start}{result.eval_loss:.4f} nats/token, perplexity {result.eval_ppl:.2f}")
    grid.add_row(
        "trained",
        f"{result.step}/{result.max_steps} steps, {human(result.tokens_seen)} tokens; this session "
        f"{human(result.tokens_per_sec)} tokens/s over {result.train_seconds:.0f} s of training",
    )
    trained = f", {human(result.params_trained)} trained" if 0 < result.params_trained < result.params_total else ""
    grid.add_row("parameters", f"{human(result.params_total)} total, {human(result.params_active)} active per token{trained}")
    runs_root = result.run_dir.parent
    nxt = [f"tensorboard --logdir {runs_root}"]
    resume = f"moectl train {result.run_dir} --resume" + (
        f" --nproc-per-node {result.world_size}" if result.world_size > 1 else ""
    )
    if result.interrupted:
        nxt.insert(0, resume)
    else:
        nxt.append(f"{resume} --set train.max_steps={result.max_steps * 2}   # train longer")
    if instruction_tuned and not result.interrupted:
        nxt[:0] = [f'moectl generate {result.run_dir} --prompt "..."   # answers your prompt as a user turn',
                   f"moectl eval {result.run_dir}   # loss and perplexity of the validation responses"]
    grid.add_row("next", "\n".join(nxt))
    title = "stopped early" if result.interrupted else "done"
    out.print(Panel(grid, title=f"moectl train: {title}", title_align="left", expand=False))


class StopOnInterrupt:
    """First Ctrl-C: finish the step, checkpoint, return. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        warn("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
