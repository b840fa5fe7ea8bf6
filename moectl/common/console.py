"""Rich output for people: the training progress bar, status lines, the end-of-run summary.

Progress and status go to stderr, results to stdout. When stderr is not a terminal (a log
file, CI), the bar is replaced by one plain line per logging window. StopOnInterrupt turns the
first Ctrl-C into a request the training loop answers at the end of its step.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


class TrainProgress:
    """step, loss, lr, tokens/s, worst-layer imbalance, ETA."""

    def __init__(self, total_steps: int, start_step: int, console: Console = err, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.interactive = enabled and console.is_terminal
        self.total = total_steps
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
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, **self.fields)

    def __enter__(self) -> "TrainProgress":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

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
        """The non-interactive stand-in for the bar, once per logging window."""
        if self.enabled and not self.interactive:
            f = self.fields
            self.console.print(
                f"step {step}/{self.total} | loss {f['loss']} | lr {f['lr']} | {f['tps']} tok/s | imbalance {f['imb']}",
                highlight=False,
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


def train_summary(result) -> None:
    """The end-of-run summary: where things are, how good the model is, what to run next."""
    if not is_main_process():
        return
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
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
    grid.add_row("parameters", f"{human(result.params_total)} total, {human(result.params_active)} active per token")
    runs_root = result.run_dir.parent
    nxt = [f"tensorboard --logdir {runs_root}"]
    resume = f"moectl train {result.run_dir} --resume" + (
        f" --nproc-per-node {result.world_size}" if result.world_size > 1 else ""
    )
    if result.interrupted:
        nxt.insert(0, resume)
    else:
        nxt.append(f"{resume} --set train.max_steps={result.max_steps * 2}   # train longer")
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
