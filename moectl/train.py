"""The training loop: one explicit `fit()` to read top to bottom.

fit: check the run directory -> data and tokenizer -> model and optimizer -> (resume) ->
for each step: micro-batches forward/backward, clip, AdamW step; every log.every steps log
the window's losses and routing statistics; every train.eval_every steps evaluate; every
checkpoint.every steps save. Ctrl-C finishes the current step, saves and returns.

Under torchrun the same loop runs in every process (moectl/distributed.py): each rank takes
its slice of every global batch, DDP averages the gradients (skipping the all-reduce on
non-final micro-steps), routing statistics and logged losses are summed over ranks before
they are logged, evaluation is split over ranks, and only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moectl import __version__, checkpoint, config, console, data, distributed, runtime, warmstart
from moectl import tokenizer as tokenizers_
from moectl.config import Config, OptimConfig
from moectl.console import TrainProgress
from moectl.distributed import Dist
from moectl.errors import CheckpointError, ConfigError, DataError, TrainingError
from moectl.models import LanguageModel, build_model, moe_layers, moe_slots, parameter_counts
from moectl.moe import LOSS_NAMES
from moectl.stats import RoutingStats, accumulator_dtype
from moectl.tracking import Tracker

# Sections that define the model and its data: a resumed run must not change them.
FROZEN_ON_RESUME = ("model", "moe", "tokenizer")
DATA_KEYS_FREE_ON_RESUME = ("num_proc", "cache_dir")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    step: int
    max_steps: int
    tokens_seen: int
    first_eval_loss: Optional[float]
    eval_loss: Optional[float]
    interrupted: bool
    train_seconds: float
    tokens_per_sec: float
    params_total: int
    params_active: int
    world_size: int = 1

    @property
    def eval_ppl(self) -> Optional[float]:
        return perplexity(self.eval_loss) if self.eval_loss is not None else None


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


# ------------------------------------------------------------------------- device and precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device='mps' but MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """None means plain fp32. The router always runs in fp32 regardless (moe/router.py)."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16":
        if not bf16_ok and device.type != "mps":
            raise ConfigError(f"train.precision=bf16 is not supported on {device}; use train.precision=fp32")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and bf16_ok else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------- optimizer and LR


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm weights, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio * lr.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = (step - cfg.warmup_steps) / (max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    blocks: data.Blocks,
    batches: list,
    device: torch.device,
    amp: Optional[torch.dtype],
    stats: Optional[RoutingStats] = None,
    dp: Dist = Dist(),
) -> float:
    """Mean next-token cross-entropy (nats per token) over the given validation batches.

    With several processes each evaluates every world_size-th batch and the sums are combined,
    so `stats` holds the whole validation set's routing on every rank.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=accumulator_dtype(device), device=device)  # (loss sum, tokens)
    for ids in batches[dp.rank :: dp.world_size]:
        x, y = (t.to(device) for t in blocks.batch(ids))
        with autocast(device, amp):
            out = model(x, y)
        sums[0] += out.lm_loss.to(sums.dtype) * y.numel()
        sums[1] += y.numel()
        if stats is not None:
            stats.update(out.routing)
    distributed.all_reduce_sum_([sums, *(stats.tensors() if stats is not None else [])], dp)
    model.train(was_training)
    total, count = sums.tolist()
    return total / count


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for each of `world_size` processes."""
    tr = cfg.train
    if tr.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={tr.batch_size} is the global batch and must be divisible by the {world_size} processes"
        )
    share = tr.batch_size // world_size
    micro = tr.micro_batch_size or share
    if share % micro:
        raise ConfigError(
            f"each of the {world_size} processes gets {share} sequences of train.batch_size={tr.batch_size}, "
            f"not a multiple of train.micro_batch_size={micro}; change either"
        )
    return micro, share // micro


def eval_chunks(batches: list, size: int) -> list:
    """The validation set's batches re-cut to `size` sequences (each process's micro-batch), so
    every world size evaluates the same sequences."""
    if not batches:
        return []
    ids = np.concatenate(batches)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


# --------------------------------------------------------------------------------- run directory


def run_directory(cfg: Config) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def _looks_like_a_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() or checkpoint.checkpoints_dir(run_dir).is_dir()


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to clobber anything; on resume return the checkpoint to continue from."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run directory; choose another run.dir or run.name")
    here = Path.cwd().resolve()
    if run_dir.resolve() in (here, *here.parents):
        raise CheckpointError(f"the run directory {run_dir} is the current directory or one of its parents; choose a run.dir")
    ckpt = checkpoint.latest(run_dir)
    if resume:
        if ckpt is None:
            raise CheckpointError(
                f"--resume: no checkpoint in {checkpoint.checkpoints_dir(run_dir)} to resume; drop --resume to start a new run"
            )
        saved_path = run_dir / "config.yaml"
        saved = config.load(saved_path) if saved_path.is_file() else None
        if saved is None:
            raise CheckpointError(f"--resume: {saved_path} is missing, so the run's config is unknown")
        if not (run_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"--resume: {run_dir / 'tokenizer.json'} is missing; the run cannot be continued")
        changed = config.diff(saved, cfg, FROZEN_ON_RESUME)
        changed += [c for c in config.diff(saved, cfg, ("data",)) if c.split(":")[0].split(".")[1] not in DATA_KEYS_FREE_ON_RESUME]
        changed += [c for c in config.diff(saved, cfg, ("train",)) if c.startswith("train.seed:")]
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run's in what defines the model or data ({'; '.join(changed)}); "
                "resume with the same settings, or start a new run with --run-name"
            )
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite and not _looks_like_a_run(run_dir):
            raise CheckpointError(
                f"--overwrite: {run_dir} does not look like a moectl run (no config.yaml or checkpoints/); "
                "refusing to delete it: choose another run.dir or run.name"
            )
        if not overwrite:
            if ckpt is None:
                raise CheckpointError(
                    f"{run_dir} holds a run that never saved a checkpoint; pass --overwrite to start it again, "
                    "or --run-name NAME to start another run"
                )
            raise CheckpointError(
                f"{run_dir} already holds checkpoints up to {ckpt.name}; pass --resume to continue it, "
                "--overwrite to replace it, or --run-name NAME to start another run"
            )
    return None


# ------------------------------------------------------------------------------ Ctrl-C handling


class StopOnInterrupt:
    """First Ctrl-C: finish the step, checkpoint, return. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.warn("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -------------------------------------------------------------------------------------- the loop


class LossWindow:
    """Sums over the logging window, kept on the device: no host sync per micro-step."""

    ROUTER_TERMS = tuple(f"router_{name}" for name in LOSS_NAMES)
    FIELDS = ("loss", "lm_loss", "aux_loss", "z_loss", *ROUTER_TERMS, "grad_norm", "micro_steps", "steps")

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, torch.zeros((), dtype=accumulator_dtype(self.device), device=self.device))

    def add_micro(self, out) -> None:
        self.loss += out.loss.detach()
        self.lm_loss += out.lm_loss.detach()
        self.aux_loss += out.aux_loss.detach()
        self.z_loss += out.z_loss.detach()
        for name, value in out.aux_terms.items():
            getattr(self, f"router_{name}").add_(value.detach())
        self.micro_steps += 1

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm += grad_norm.detach()
        self.steps += 1

    def means(self) -> dict[str, float]:
        m, s = max(float(self.micro_steps), 1.0), max(float(self.steps), 1.0)
        out = {f"train/{k}": float(getattr(self, k)) / m for k in ("loss", "lm_loss", "aux_loss", "z_loss")}
        out["train/grad_norm"] = float(self.grad_norm) / s
        if float(self.router_z) != 0.0:  # MoE models: each router loss, unweighted
            out.update({f"train/router/{k[len('router_'):]}": float(getattr(self, k)) / m for k in self.ROUTER_TERMS})
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The accumulators, all sums: data-parallel training adds them up over ranks in place."""
        return [getattr(self, name) for name in self.FIELDS]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).cpu() for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.FIELDS:
            setattr(self, name, state[name].to(self.device, accumulator_dtype(self.device)))


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _collapse_message(step: int, slot: int, s, cfg: Config, collapsing: bool) -> str:
    window = f"over steps {step - cfg.log.every + 1}-{step}"
    if not collapsing:
        return f"step {step}: routing in layer {slot} recovered: max/mean expert load {s.max_over_mean:.2f} {window}"
    return (
        f"step {step}: routing in layer {slot} is collapsing: max/mean expert load {s.max_over_mean:.2f} > "
        f"log.collapse_threshold={cfg.log.collapse_threshold} {window}, {s.dead_experts} dead experts; "
        "if it persists, raise the balancing loss (moe.aux_loss_coef, or moe.importance_loss_coef and "
        "moe.load_loss_coef for noisy gating)"
    )


def _summed_state(acc, dp: Dist) -> dict[str, torch.Tensor]:
    """A window's sums over every rank, for the checkpoint (rank 0 carries them on at resume)."""
    sums = [t.clone() for t in acc.tensors()]
    distributed.all_reduce_sum_(sums, dp)
    return {name: t.cpu() for name, t in zip(acc.FIELDS, sums)}


def _restore_rng(saved, dp: Dist, seed: int) -> None:
    """Each rank's RNG from the checkpoint (one state per rank; older checkpoints hold one)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == dp.world_size:
        _set_rng_state(states[dp.rank])
        return
    console.warn(
        f"the checkpoint was saved by {len(states)} processes and this run has {dp.world_size}: the data order "
        "continues exactly, but dropout and routing noise take fresh random streams"
    )
    torch.manual_seed(seed + 7919 * (dp.rank + 1))


def fit(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train as `cfg` says, in this process or as one rank of a torchrun job."""
    dp, device = distributed.init(pick_device(cfg.train.device), cfg.train.dist_timeout)
    try:
        return _fit(cfg, dp, device, resume, overwrite)
    except RuntimeError as exc:
        lost = distributed.lost_contact(exc, cfg.train.dist_timeout) if dp.enabled else None
        if lost is None:
            raise
        raise lost from exc
    finally:
        distributed.shutdown(dp)


def _fit(cfg: Config, dp: Dist, device: torch.device, resume: bool, overwrite: bool) -> RunResult:
    run_dir = run_directory(cfg)
    tr, seq_len = cfg.train, cfg.data.seq_len
    micro, accum = batch_layout(cfg, dp.world_size)
    # Rank 0 alone judges the run directory, before anyone writes to it.
    resume_from = distributed.from_main(lambda: check_run_dir(run_dir, cfg, resume, overwrite), dp)
    amp = autocast_dtype(device, tr.precision)
    if device.type == "cpu":
        runtime.keep_freed_memory()  # reuse big blocks across steps instead of re-faulting them in

    # Data and tokenizer: rank 0 tokenises and fills the caches, then the other ranks read them.
    # Nothing in the run directory changes until they are ready.
    console.status(f"loading data ({cfg.data.source})")
    tokenizer_file = run_dir / "tokenizer.json" if resume_from else warmstart.source_tokenizer(cfg)
    corpus = distributed.main_first(lambda: data.prepare(cfg, tokenizer_file=tokenizer_file), dp)
    train_blocks = data.Blocks(corpus.train, seq_len)
    val_blocks = data.Blocks(corpus.validation, seq_len)
    sampler = data.BatchSampler(len(train_blocks), tr.batch_size, tr.seed)  # global batches, same on every rank
    val_batches = eval_chunks(data.eval_batches(val_blocks, cfg.micro_batch_size, tr.eval_batches), micro)
    vocab_size = corpus.tokenizer.get_vocab_size()
    console.status(
        f"tokens: {console.human(len(corpus.train.tokens))} train, {console.human(len(corpus.validation.tokens))} validation"
        f" ({'cached' if corpus.train.from_cache else 'tokenised'}); vocab {vocab_size}"
        f" ({'cached' if corpus.tokenizer_from_cache else 'trained'} tokenizer)"
    )
    trained_tokenizer = cfg.tokenizer.path is None and cfg.tokenizer.name is None
    if trained_tokenizer and not resume_from and not tr.init_from and vocab_size < cfg.tokenizer.vocab_size:
        console.warn(
            f"the BPE has {vocab_size} tokens, fewer than tokenizer.vocab_size={cfg.tokenizer.vocab_size}: "
            "the training text has no more merges to learn"
        )

    # Model and optimizer. Every rank builds the same initial model; DDP keeps them equal.
    torch.manual_seed(tr.seed)
    model = build_model(cfg, vocab_size).to(device)
    if tr.init_from and not resume_from:
        console.status(warmstart.initialize(model, cfg))
    frozen = warmstart.freeze(model, tr.freeze)
    if frozen:
        console.status(f"train.freeze={tr.freeze}: {console.human(frozen)} parameters stay as they are")
    optimizer = make_optimizer(model, cfg.optim)
    if dp.enabled:
        torch.manual_seed(tr.seed + 7919 * (dp.rank + 1))  # each rank its own dropout and routing noise
    slots = moe_slots(model)
    stats = RoutingStats(len(slots), cfg.moe.num_experts, device)
    window = LossWindow(device)
    total_params, active_params = parameter_counts(model)
    # Routers with aux-loss-free balancing get each optimizer step's chosen-token counts.
    bias_routers = [(i, layer.router) for i, layer in enumerate(moe_layers(model)) if layer.router.balances_with_bias]
    count_reduce = distributed.sum_over_ranks if dp.enabled and cfg.moe.aux_loss_scope == "global" else None
    if cfg.is_moe and cfg.moe.router == "expert_choice":
        console.warn(
            "moe.router=expert_choice: each expert picks its tokens from the whole batch, so in this causal LM a "
            "token's routing depends on other tokens, later positions included; the loss is optimistic and "
            "token-by-token generation routes differently"
        )
    if cfg.is_moe and cfg.moe.drop_policy == "probability" and cfg.moe.capacity_factor is not None:
        console.warn(
            "moe.drop_policy=probability: which tokens an expert drops depends on the whole batch, later "
            "positions included, so the model can see the future through its drops"
        )
    step, tokens_seen, first_eval, eval_loss = 0, 0, None, None
    collapsed = [False] * len(slots)  # per MoE layer: was it over log.collapse_threshold last window?
    data_keys = {"train": corpus.train.key, "validation": corpus.validation.key}

    if resume_from is not None:
        checkpoint.load_model(resume_from, model)
        state = checkpoint.load_state(resume_from)
        meta = checkpoint.read_meta(resume_from)
        try:
            optimizer.load_state_dict(state["optimizer"])
            sampler.load_state_dict(state["sampler"])
            if dp.is_main:  # the saved window sums cover every rank; rank 0 carries them on
                window.load_state_dict(state["window"])
                stats.load_state_dict(state["routing_stats"])
            _restore_rng(state["rng"], dp, tr.seed)
        except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {resume_from} is corrupt: state.pt: {exc}") from None
        step, tokens_seen = meta["step"], meta.get("tokens_seen", 0)
        first_eval, eval_loss = meta.get("first_eval_loss"), meta.get("eval_loss")
        collapsed = list(state.get("collapsed", collapsed))
        if meta.get("data", data_keys) != data_keys:
            raise DataError(
                f"--resume: the training or validation data changed since {resume_from} was saved (its tokens differ), "
                "so the run cannot continue on the same data; start a new run with --run-name"
            )
        new_lr = lr_at(step - 1, cfg.optim, tr.max_steps)
        if meta.get("lr") and abs(new_lr - meta["lr"]) > 1e-3 * meta["lr"]:
            console.warn(
                f"the LR schedule changed: step {step} trained at lr {meta['lr']:.2e}, where the new settings "
                f"(train.max_steps={tr.max_steps}, optim.*) put lr {new_lr:.2e}; training continues on the new schedule"
            )
        console.status(f"resuming {run_dir} from step {step}")
    elif dp.is_main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizers_.save(corpus.tokenizer, run_dir / "tokenizer.json")
    if dp.is_main:
        config.save(cfg, run_dir / "config.yaml")
    ddp_model = distributed.wrap(model, dp, device)

    tracker = Tracker(run_dir, cfg.log.tensorboard and dp.is_main, purge_step=step + 1 if resume_from else None)
    tracker.text("config", "    " + config.dump(cfg).replace("\n", "\n    "), step)
    processes = f"; {dp.world_size} processes ({micro}x{accum} sequences each per step)" if dp.enabled else ""
    console.status(
        f"{cfg.model.arch}: {console.human(total_params)} parameters, {console.human(active_params)} active per token"
        f"; device {device}{' bf16' if amp else ''}; {tr.max_steps} steps of {tr.batch_size}x{seq_len} tokens{processes}"
    )

    def save(eval_loss: Optional[float]) -> Path:
        """Every rank takes part (the window sums and RNG states are collected); rank 0 writes."""
        window_sums, stats_sums = _summed_state(window, dp), _summed_state(stats, dp)
        rng_states = distributed.gather_objects(_rng_state(), dp)
        if not dp.is_main:
            return checkpoint.step_dir(run_dir, step)
        state = {
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "window": window_sums,
            "routing_stats": stats_sums,
            "collapsed": collapsed,
            "rng": rng_states,
        }
        meta = {
            "tokens_seen": tokens_seen,
            "config_hash": config.config_hash(cfg),
            "moectl_version": __version__,
            "torch_version": torch.__version__,
            "lr": lr_at(step - 1, cfg.optim, tr.max_steps) if step else None,
            "eval_loss": eval_loss,
            "first_eval_loss": first_eval,
            "data": data_keys,
            "world_size": dp.world_size,
        }
        return checkpoint.save(run_dir, step, model, state, meta, cfg.checkpoint.keep_last)

    def run_eval() -> float:
        eval_stats = RoutingStats(len(slots), cfg.moe.num_experts, device)
        loss = evaluate(model, val_blocks, val_batches, device, amp, eval_stats, dp)
        tracker.scalars({"eval/loss": loss, "eval/ppl": perplexity(loss)}, step)
        if slots:
            tracker.heatmap(eval_stats.summary(), step)
        progress.print(f"step {step}: eval loss {loss:.4f}, ppl {perplexity(loss):.2f}")
        return loss

    def log_window(lr: float, seconds: float, tokens: int) -> None:
        """Window means to TensorBoard and the console; routing statistics and collapse warnings.

        The window's sums are first added up over ranks, so every number covers the whole batch."""
        distributed.all_reduce_sum_(window.tensors() + stats.tensors(), dp)
        scalars = {**window.means(), "train/lr": lr, "train/tokens_per_sec": tokens / max(seconds, 1e-9)}
        tracker.scalars(scalars, step)
        imbalance = None
        if slots and not stats.empty():
            layers = stats.summary()
            tracker.routing(slots, layers, step, cfg.log.histograms)
            imbalance = max(s.max_over_mean for s in layers)
            for i, s in enumerate(layers):
                now = s.max_over_mean > cfg.log.collapse_threshold
                if now != collapsed[i]:
                    msg = _collapse_message(step, slots[i], s, cfg, now)
                    if now:
                        console.warn(msg)
                    else:
                        progress.print(msg)
                    tracker.text("routing/warnings", msg, step)
                collapsed[i] = now
        progress.update(step, scalars["train/loss"], lr, scalars["train/tokens_per_sec"], imbalance)
        progress.window_line(step)
        window.reset()
        stats.reset()
        tracker.flush()

    train_seconds, window_seconds, window_tokens, session_tokens = 0.0, 0.0, 0, 0
    last_ckpt, stopping = resume_from, False
    share = slice(dp.rank * micro * accum, (dp.rank + 1) * micro * accum)  # this rank's part of a global batch
    try:
        with StopOnInterrupt() as stop, TrainProgress(tr.max_steps, step, enabled=dp.is_main) as progress:
            if step == 0:
                eval_loss = first_eval = run_eval()
            while step < tr.max_steps and not stopping:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.optim, tr.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                ids = sampler.next()[share].reshape(accum, micro)  # (accum, micro) block ids
                step_counts = [0] * len(bias_routers)  # chosen tokens per expert over this step's micro-batches
                for j, micro_ids in enumerate(ids):
                    x, y = (t.to(device, non_blocking=True) for t in train_blocks.batch(micro_ids))
                    with distributed.gradient_sync(ddp_model, last_micro_step=j == accum - 1):
                        with autocast(device, amp):
                            out = ddp_model(x, y, count_reduce=count_reduce)
                        (out.loss / accum).backward()
                    window.add_micro(out)
                    stats.update(out.routing)
                    for k, (i, _) in enumerate(bias_routers):
                        step_counts[k] = step_counts[k] + out.routing[i].chosen_per_expert()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip or float("inf"))
                # One host sync per step: the progress bar's loss, a divergence check before the update,
                # and (with several ranks) whether any rank was asked to stop: all ranks decide alike.
                stop_vote = grad_norm.new_tensor(float(stop.requested))
                check = torch.stack([out.loss.detach().float(), grad_norm.float(), stop_vote.float()])
                distributed.all_reduce_sum_([check], dp)
                loss_now, norm_now, stop_votes = check.tolist()
                loss_now, norm_now, stopping = loss_now / dp.world_size, norm_now / dp.world_size, stop_votes > 0
                if not (math.isfinite(loss_now) and math.isfinite(norm_now)):
                    raise TrainingError(
                        f"step {step + 1}: the loss is {loss_now} and the gradient norm {norm_now}: training diverged; "
                        f"the last checkpoint ({last_ckpt or 'none yet'}) is intact: lower optim.lr, then --resume"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                distributed.all_reduce_sum_([c for c in step_counts if torch.is_tensor(c)], dp)  # global counts
                for (_, router), counts in zip(bias_routers, step_counts):
                    router.update_bias(counts)
                window.add_step(grad_norm)
                step += 1
                tokens_seen += tr.batch_size * seq_len
                dt = time.perf_counter() - t0
                train_seconds, window_seconds = train_seconds + dt, window_seconds + dt
                window_tokens += tr.batch_size * seq_len
                session_tokens += tr.batch_size * seq_len
                progress.update(step, loss_now, lr)

                if step % cfg.log.every == 0 or step == tr.max_steps:
                    log_window(lr, window_seconds, window_tokens)
                    window_seconds, window_tokens = 0.0, 0
                if step % tr.eval_every == 0 or step == tr.max_steps:
                    eval_loss = run_eval()
                if step % cfg.checkpoint.every == 0 or step == tr.max_steps:
                    last_ckpt = save(eval_loss)
            if stopping:
                last_ckpt = save(eval_loss)
                progress.print(f"stopped at step {step}; checkpoint saved to {last_ckpt}")
    finally:
        tracker.close()
    return RunResult(
        run_dir=run_dir,
        checkpoint=last_ckpt,
        step=step,
        max_steps=tr.max_steps,
        tokens_seen=tokens_seen,
        first_eval_loss=first_eval,
        eval_loss=eval_loss,
        interrupted=stopping and step < tr.max_steps,
        train_seconds=train_seconds,
        tokens_per_sec=(session_tokens / train_seconds) if train_seconds else 0.0,
        params_total=total_params,
        params_active=active_params,
        world_size=dp.world_size,
    )
