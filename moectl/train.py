"""`moectl train`: the training loop. `fit()` reads top to bottom and calls one named step at a time:

  setup       check the run directory, load data and tokenizer, build the model and optimizer,
              resume from a checkpoint, open the logs: a `Run` (fixed for the run) and a
              `LoopState` (what the loop changes)
  train_step  one optimizer step: micro-batches forward and backward (gradient accumulation),
              clip, divergence check, AdamW, the sigmoid router's bias update
  log_window  every log.every steps: the window's loss means and routing statistics to
              TensorBoard and the console, collapse warnings
  evaluate    every train.eval_every steps: the validation loss (evaluate.mean_loss) and heatmap
  save        every checkpoint.every steps, at the end, and on Ctrl-C (the first Ctrl-C finishes
              the step, saves and returns)

Under torchrun the same loop runs in every process (moectl/distributed.py): each rank takes
its slice of every global batch, DDP averages the gradients (skipping the all-reduce on
non-final micro-steps), routing statistics and logged losses are summed over ranks before
they are logged, evaluation is split over ranks, and only rank 0 writes logs and checkpoints.
With train.expert_parallel each rank holds only its share of the experts (moectl/expert_parallel.py):
the loop reduces and clips their gradients itself and saves and loads them in the one-process layout.
"""

from __future__ import annotations

import gc
import math
import shutil
import signal
import threading
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from moectl import chat, checkpoint, config, console, data, distributed, expert_parallel, perf_model, runtime, sft, warmstart
from moectl import tokenizer as tokenizers_
from moectl.config import Config
from moectl.console import TrainProgress
from moectl.errors import CheckpointError, ConfigError, DataError, TrainingError
from moectl.evaluate import mean_loss, perplexity
from moectl.expert_parallel import ExpertParallel
from moectl.fileio import atomic_write_text
from moectl.models import LanguageModel, build_model, lookahead, moe_layers, moe_slots, parameter_counts, routed_experts
from moectl.moe import LOSS_NAMES
from moectl.optim import lr_at, make_optimizer
from moectl.runtime import Dist
from moectl.stats import LayerStats, RoutingStats, Sums, accumulator_dtype, worst_imbalance
from moectl.tracking import Tracker


@dataclass
class Run:
    """What setup builds. Which objects these are never changes during the run."""

    cfg: Config
    dp: Dist
    device: torch.device
    amp: Optional[torch.dtype]  # autocast dtype; None: fp32
    run_dir: Path
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    train_blocks: Union[data.Blocks, sft.ExampleBlocks]
    sampler: Union[data.BatchSampler, data.StreamSampler]  # global batches of block ids, the same on every rank
    val_blocks: Union[data.Blocks, sft.ExampleBlocks]
    val_batches: list  # the validation block ids, in chunks of one micro-batch; each rank scores its share
    data_keys: dict[str, str]  # identify the tokenised data: a resumed run checks they did not change
    micro: int  # sequences per forward pass in this process
    accum: int  # micro-batches per optimizer step in this process
    slots: list[int]  # FFN slot of each MoE layer
    bias_routers: list  # (routing-record index, router) of routers balanced by their expert bias
    count_reduce: Optional[Callable]  # sums the Switch loss's counts over ranks (moe.aux_loss_scope=global)
    window: "LossWindow"
    stats: RoutingStats  # the logging window's routing counts
    params: tuple[int, int]  # (total, active per token) of the whole model, however its experts are sharded
    carry: Optional[list] = None  # train.lstm_stateful: each micro-batch's LSTM state, (layers, 2, micro, D) or None
    ep: Optional[ExpertParallel] = None  # train.expert_parallel > 1: this rank's experts and its groups
    ddp_model: Optional[nn.Module] = None  # the model as the loop calls it: DDP-wrapped under torchrun
    tracker: Optional[Tracker] = None
    progress: Optional[TrainProgress] = None


@dataclass
class LoopState:
    """What the loop changes. A checkpoint keeps what resuming needs: the step, tokens seen, the
    eval losses and the collapse flags (the rest of the state is the Run's objects')."""

    step: int = 0
    tokens_seen: int = 0
    first_eval_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    collapsed: list[bool] = field(default_factory=list)  # per MoE layer: over log.collapse_threshold last window
    checkpoint: Optional[Path] = None  # the newest checkpoint
    stopping: bool = False  # Ctrl-C on any rank: save after this step and return
    best_eval_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0  # evaluations in a row without a lower eval loss (train.early_stopping)
    early_stopped: bool = False
    # train.init_from: the starting model's top-1 expert of each scored validation token, an
    # (MoE layers, tokens) tensor per validation batch this rank scores, to measure router drift against
    routes_at_start: Optional[list] = None
    train_seconds: float = 0.0  # in this session
    session_tokens: int = 0
    window_seconds: float = 0.0
    window_tokens: int = 0


@dataclass
class RunResult(LoopState):
    """What fit() returns: the loop's final state, and what describes the run."""

    run_dir: Path = Path()
    max_steps: int = 0
    world_size: int = 1
    params_total: int = 0
    params_active: int = 0

    @property
    def interrupted(self) -> bool:
        return self.stopping and self.step < self.max_steps

    @property
    def tokens_per_sec(self) -> float:
        return self.session_tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def eval_ppl(self) -> Optional[float]:
        return perplexity(self.eval_loss) if self.eval_loss is not None else None


def fit(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train as `cfg` says, in this process or as one rank of a torchrun job."""
    expert_parallel.check_layout(cfg, runtime.torchrun_env().world_size)
    with distributed.process_group(runtime.pick_device(cfg.train.device), cfg.train.dist_timeout) as (dp, device):
        run, state = setup(cfg, dp, device, resume, overwrite)
        tr = run.cfg.train
        with StopOnInterrupt() as stop, run.progress, closing(run.tracker):
            if state.step == 0:
                state.first_eval_loss = evaluate(run, state)
                if run.cfg.checkpoint.keep_best:  # the starting weights, best until something beats them
                    save(run, state)
            while state.step < tr.max_steps and not state.stopping and not state.early_stopped:
                lr = train_step(run, state, stop)
                last = state.step == tr.max_steps
                if last or state.step % run.cfg.log.every == 0:
                    log_window(run, state, lr)
                best = False
                if last or state.step % tr.eval_every == 0:
                    evaluate(run, state)
                    best = state.best_step == state.step
                if last or state.early_stopped or state.step % run.cfg.checkpoint.every == 0 or (
                        best and run.cfg.checkpoint.keep_best):
                    save(run, state)
            if state.stopping:
                save(run, state)
                run.progress.print(f"stopped at step {state.step}; checkpoint saved to {state.checkpoint}")
        total, active = run.params
        result = RunResult(**vars(state), run_dir=run.run_dir, max_steps=tr.max_steps, world_size=dp.world_size,
                           params_total=total, params_active=active)
        # Free DDP (its reducer holds the process group) before the group is destroyed on leaving
        # the block, not at interpreter exit: a rank has aborted in gloo's teardown otherwise.
        # DDP sits in a reference cycle (its hooks refer back to it), so dropping the last name
        # is not enough: collect the cycle now.
        del run
        gc.collect()
    return result


# ----------------------------------------------------------------------------------------- setup


def setup(cfg: Config, dp: Dist, device: torch.device, resume: bool, overwrite: bool) -> tuple[Run, LoopState]:
    """Everything before the first step. Nothing in the run directory changes until the data,
    tokenizer and model are ready."""
    tr, run_dir = cfg.train, checkpoint.run_directory(cfg)
    if cfg.optim.warmup_steps > tr.max_steps:  # lr_at warms up over the whole run instead
        console.warn(f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than train.max_steps={tr.max_steps}: "
                     f"warming up over all {tr.max_steps} steps")
    micro, accum = batch_layout(cfg, dp.world_size)
    amp = runtime.autocast_dtype(device, tr.precision)
    # Rank 0 alone judges the run directory, before anyone writes to it.
    resume_from = distributed.from_main(lambda: checkpoint.check_run_dir(run_dir, cfg, resume, overwrite), dp)
    if device.type == "cpu":
        runtime.keep_freed_memory()  # reuse big blocks across steps instead of re-faulting them in
    corpus = _prepare_data(cfg, dp, run_dir / "tokenizer.json" if resume_from else warmstart.source_tokenizer(cfg),
                           new_tokenizer=not resume_from and not tr.init_from)

    # Every rank builds the same initial model (on the CPU, so that a device only ever holds its
    # share of the experts); DDP keeps the replicated parameters equal.
    torch.manual_seed(tr.seed)
    model = build_model(cfg, corpus.tokenizer.get_vocab_size())
    if tr.init_from and not resume_from:
        console.status(warmstart.initialize(model, cfg))
    frozen = warmstart.freeze(model, tr.freeze)
    if frozen:
        console.status(f"train.freeze={tr.freeze}: {console.human(frozen)} parameters stay as they are")
    params = parameter_counts(model)
    ep = expert_parallel.shard(model, tr.expert_parallel, dp, tr.shadow_experts, perf_model.hardware(tr.hardware, device.type),
                              tr.ep_overlap)
    model = model.to(device)
    if dp.enabled:
        _seed_rank(tr.seed, dp)
    for warning in lookahead(cfg, training=True):
        console.warn(warning)
    train_blocks, val_blocks = (sft.blocks(split, cfg, corpus.eot_id) for split in (corpus.train, corpus.validation))
    if isinstance(train_blocks, sft.ExampleBlocks):
        _report_examples(cfg, train_blocks, val_blocks)
    slots = moe_slots(model)
    run = Run(
        cfg=cfg, dp=dp, device=device, amp=amp, run_dir=run_dir, model=model,
        optimizer=make_optimizer(model, cfg.optim),
        train_blocks=train_blocks,
        sampler=data.StreamSampler(len(train_blocks), tr.batch_size) if tr.lstm_stateful
        else data.BatchSampler(len(train_blocks), tr.batch_size, tr.seed),
        val_blocks=val_blocks,
        val_batches=data.stream_batches(val_blocks, cfg.train.micro_batch, tr.eval_batches) if tr.lstm_stateful
        else eval_chunks(data.eval_batches(val_blocks, cfg.train.micro_batch, tr.eval_batches), micro),
        data_keys={"train": corpus.train.key, "validation": corpus.validation.key},
        micro=micro, accum=accum, slots=slots,
        bias_routers=[(i, layer.router) for i, layer in enumerate(moe_layers(model)) if layer.router.balances_with_bias],
        count_reduce=distributed.sum_over_ranks if dp.enabled and cfg.moe.aux_loss_scope == "global" else None,
        window=LossWindow(device),
        stats=RoutingStats(len(slots), routed_experts(model), device),
        params=params,
        carry=[None] * accum if tr.lstm_stateful else None,
        ep=ep,
    )
    state = LoopState(collapsed=[False] * len(slots))
    if resume_from is not None:
        restore(run, state, resume_from)
    elif dp.is_main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        if resume:  # --resume of a run that was killed before its first checkpoint
            console.status(f"{run_dir} has no checkpoint yet: starting it again from step 0")
        run_dir.mkdir(parents=True, exist_ok=True)
    if dp.is_main:  # config.yaml first: a directory that holds it is a run that --resume can start again
        config.save(cfg, run_dir / "config.yaml")
        if resume_from is None:
            tokenizers_.save(corpus.tokenizer, run_dir / "tokenizer.json")
        if corpus.chat_template is not None:  # what `moectl generate --chat` renders prompts with
            atomic_write_text(run_dir / chat.TEMPLATE_FILE, corpus.chat_template)
    run.ddp_model = distributed.wrap(model, dp, device, ignore=expert_parallel.parameter_names(model, ep) if ep else ())
    # Resuming drops the events logged after the checkpoint; starting again drops all of them.
    purge = state.step + 1 if resume_from else 0 if resume else None
    run.tracker = Tracker(run_dir, cfg.log.tensorboard and dp.is_main, purge_step=purge)
    run.tracker.config(config.dump(cfg), state.step)
    run.progress = TrainProgress(tr.max_steps, state.step, enabled=dp.is_main)
    total, active = params
    processes = f"; {dp.world_size} processes ({micro}x{accum} sequences each per step)" if dp.enabled else ""
    if ep is not None:
        processes += f", experts sharded over groups of {ep.size} ({cfg.moe.num_experts // ep.size} per process per layer)"
    console.status(
        f"{cfg.model.arch}: {console.human(total)} parameters, {console.human(active)} active per token"
        f"; device {device}{' bf16' if run.amp else ''}; {tr.max_steps} steps of {tr.batch_size}x{cfg.data.seq_len} tokens"
        f"{processes}"
    )
    return run, state


def _prepare_data(cfg: Config, dp: Dist, tokenizer_file: Optional[Path], new_tokenizer: bool) -> data.Corpus:
    """Rank 0 tokenises and fills the caches, then the other ranks read them."""
    console.status(f"loading data ({cfg.data.source}{', instruction tuning' if cfg.data.task == 'sft' else ''})")
    prepare = sft.prepare if cfg.data.task == "sft" else data.prepare
    corpus = distributed.main_first(lambda: prepare(cfg, tokenizer_file=tokenizer_file), dp)
    vocab = corpus.tokenizer.get_vocab_size()
    console.status(
        f"tokens: {console.human(len(corpus.train.tokens))} train, {console.human(len(corpus.validation.tokens))} validation"
        f" ({'cached' if corpus.train.from_cache else 'tokenised'}); vocab {vocab}"
        f" ({'cached' if corpus.tokenizer_from_cache else 'trained'} tokenizer)"
    )
    trained_bpe = cfg.tokenizer.path is None and cfg.tokenizer.name is None
    if new_tokenizer and trained_bpe and cfg.tokenizer.vocab_size != "auto" and vocab < cfg.tokenizer.vocab_size:
        console.warn(
            f"the BPE has {vocab} tokens, fewer than tokenizer.vocab_size={cfg.tokenizer.vocab_size}: "
            "the training text has no more merges to learn"
        )
    return corpus


def _report_examples(cfg: Config, train: sft.ExampleBlocks, validation: sft.ExampleBlocks) -> None:
    examples = train.split.num_docs + validation.split.num_docs
    rows = f"{len(train)} + {len(validation)} {'packed ' if cfg.data.packing else ''}sequences"
    console.status(f"instruction tuning: {train.split.num_docs} + {validation.split.num_docs} examples in {rows}; "
                   "the loss counts response tokens only")
    truncated, cut = train.truncated + validation.truncated, train.responses_cut + validation.responses_cut
    lost = train.responses_lost + validation.responses_lost
    if truncated:
        console.warn(f"{truncated} of {examples} examples are longer than data.seq_len + 1 = {cfg.data.seq_len + 1} "
                     f"tokens and lose their first tokens (the prompt side); in {cut} the response is cut too")
    if lost:
        console.warn(f"{lost} of {examples} examples have no response token left after that cut and train nothing "
                     "(they count as zero loss and zero tokens); raise data.seq_len, or shorten their prompts")


def restore(run: Run, state: LoopState, ckpt: Path) -> None:
    """Continue from `ckpt`: weights, optimizer, data position, logging window, RNG and counters."""
    with _full_experts(run, gather=False):  # every rank reads the full checkpoint and keeps its experts
        checkpoint.load_model(ckpt, run.model)
    saved, meta = checkpoint.load_state(ckpt), checkpoint.read_meta(ckpt)
    mults = [group.get("lr_mult", 1.0) for group in run.optimizer.param_groups]  # the config's, not the saved ones
    try:
        if run.ep is not None:
            run.ep.load_optimizer_state(run.optimizer, saved["optimizer"])
        else:
            run.optimizer.load_state_dict(saved["optimizer"])
        for group, mult in zip(run.optimizer.param_groups, mults):
            group["lr_mult"] = mult
        run.sampler.load_state_dict(saved["sampler"])
        if run.dp.is_main:  # the saved window sums cover every rank; rank 0 carries them on
            run.window.load_state_dict(saved["window"])
            run.stats.load_state_dict(saved["routing_stats"])
        _restore_rng(saved["rng"], run.dp, run.cfg.train.seed)
        if run.carry is not None:
            _restore_carry(run, saved.get("lstm_state"))
        _restore_routes(run, state, saved.get("routes_at_start"))
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.pt: {exc}") from None
    if meta.get("data", run.data_keys) != run.data_keys:
        raise DataError(
            f"--resume: the training or validation data changed since {ckpt} was saved (its tokens differ), "
            "so the run cannot continue on the same data; start a new run with --run-name"
        )
    state.step, state.tokens_seen = meta["step"], meta.get("tokens_seen", 0)
    state.first_eval_loss, state.eval_loss = meta.get("first_eval_loss"), meta.get("eval_loss")
    state.best_eval_loss, state.best_step = meta.get("best_eval_loss"), meta.get("best_step")
    state.evals_since_best = meta.get("evals_since_best", 0)
    state.collapsed = list(saved.get("collapsed", state.collapsed))
    state.checkpoint = ckpt
    new_lr = lr_at(state.step - 1, run.cfg.optim, run.cfg.train.max_steps)
    if meta.get("lr") and abs(new_lr - meta["lr"]) > 1e-3 * meta["lr"]:
        console.warn(
            f"the LR schedule changed: step {state.step} trained at lr {meta['lr']:.2e}, where the new settings "
            f"(train.max_steps={run.cfg.train.max_steps}, optim.*) put lr {new_lr:.2e}; training continues on the new schedule"
        )
    console.status(f"resuming {run.run_dir} from step {state.step}")


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


# ------------------------------------------------------------------------------------ the steps


def train_step(run: Run, state: LoopState, stop: "StopOnInterrupt") -> float:
    """One optimizer step over this rank's share of the next global batch; returns its LR."""
    tr, dp = run.cfg.train, run.dp
    started = time.perf_counter()
    lr = lr_at(state.step, run.cfg.optim, tr.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    share = slice(dp.rank * run.micro * run.accum, (dp.rank + 1) * run.micro * run.accum)
    if run.carry is not None and run.sampler.fresh:  # the streams start again: a zero state
        run.carry = [None] * run.accum
    ids = run.sampler.next()[share].reshape(run.accum, run.micro)  # (accum, micro) block ids
    counts = [0] * len(run.bias_routers)  # chosen tokens per expert over this step's micro-batches
    step_loss = torch.zeros(3, dtype=accumulator_dtype(run.device), device=run.device)  # loss_sums over micro-batches
    batches = [run.train_blocks.batch(micro_ids) for micro_ids in ids]
    shares = _target_shares([y for _, y in batches], dp, run.device) if run.cfg.data.task == "sft" else None
    for j, micro_ids in enumerate(ids):
        x, y = (t.to(run.device, non_blocking=True) for t in batches[j])
        layout = {k: v.to(run.device) for k, v in run.train_blocks.layout(micro_ids).items()}  # packing, padding
        with distributed.gradient_sync(run.ddp_model, last_micro_step=j == run.accum - 1):
            with runtime.autocast(run.device, run.amp):
                out = run.ddp_model(x, y, count_reduce=run.count_reduce, state=run.carry[j] if run.carry else None,
                                    **layout)
            if shares is None:
                loss = out.loss / run.accum
            else:  # each response token weighs the same, however they fall over micro-batches and ranks
                loss = out.lm_loss * shares[j] + (out.aux_loss + out.z_loss) / run.accum  # no response: lm_loss 0
            loss.backward()
        sums = loss_sums(out)
        step_loss += sums
        if run.carry is not None:  # truncated BPTT: the next block of these streams starts here
            run.carry[j] = out.state.detach()
        run.window.add_micro(out, sums)
        run.stats.update(out.routing)
        for k, (i, _) in enumerate(run.bias_routers):
            counts[k] = counts[k] + out.routing[i].chosen_per_expert()
    if run.ep is not None:
        run.ep.reduce_gradients()  # DDP left the experts' gradients to it
        grad_norm = run.ep.clip_grad_norm_(run.model.parameters(), tr.grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tr.grad_clip or float("inf"))
    # One host sync per step: the progress bar's loss, a divergence check before the update, and
    # (with several ranks) whether any rank was asked to stop: all ranks decide alike.
    loss = step_loss[0] / step_loss[1].clamp_min(1.0) + step_loss[2] / run.accum  # this rank's loss of the step
    check = torch.stack([loss.float(), grad_norm.float(), grad_norm.new_tensor(float(stop.requested)).float()])
    distributed.all_reduce_sum_([check], dp)
    loss, norm, stop_votes = check.tolist()
    loss, norm = loss / dp.world_size, norm / dp.world_size
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainingError(
            f"step {state.step + 1}: the loss is {loss} and the gradient norm {norm}: training diverged; "
            f"the last checkpoint ({state.checkpoint or 'none yet'}) is intact: lower optim.lr, then --resume"
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    distributed.all_reduce_sum_([c for c in counts if torch.is_tensor(c)], dp)  # global counts
    for (_, router), c in zip(run.bias_routers, counts):
        router.update_bias(c)
    run.window.add_step(grad_norm)
    tokens, seconds = tr.batch_size * run.cfg.data.seq_len, time.perf_counter() - started
    state.step, state.stopping = state.step + 1, stop_votes > 0
    state.tokens_seen, state.session_tokens, state.window_tokens = (
        state.tokens_seen + tokens, state.session_tokens + tokens, state.window_tokens + tokens)
    state.train_seconds, state.window_seconds = state.train_seconds + seconds, state.window_seconds + seconds
    run.progress.update(state.step, loss, lr)
    return lr


def _target_shares(targets: list[torch.Tensor], dp: Dist, device: torch.device) -> list[float]:
    """Instruction tuning: the weight of each micro-batch's mean response loss so that the step
    minimises the mean over every response token of the global batch: its share of them, times
    the number of processes (DDP averages the gradients over processes)."""
    mine = torch.tensor([float((y != sft.IGNORE).sum()) for y in targets], dtype=torch.float64)
    total = mine.sum().reshape(1).to(device)
    distributed.all_reduce_sum_([total], dp)
    return (mine * dp.world_size / total.cpu().clamp_min(1.0)).tolist()


def log_window(run: Run, state: LoopState, lr: float) -> None:
    """The window's means to TensorBoard and the console, its routing statistics and collapse
    warnings. The window's sums are first added up over ranks, so every number covers the whole batch."""
    cfg = run.cfg
    distributed.all_reduce_sum_(run.window.tensors() + run.stats.tensors(), run.dp)
    means = {**run.window.means(), "lr": lr, "tokens_per_sec": state.window_tokens / max(state.window_seconds, 1e-9)}
    run.tracker.train(means, state.step)
    imbalance = None
    if run.slots and not run.stats.empty():
        layers = run.stats.summary()
        run.tracker.routing(run.slots, layers, state.step, cfg.log.histograms)
        imbalance = worst_imbalance(layers)
        for i, s in enumerate(layers):
            collapsing = s.max_over_mean > cfg.log.collapse_threshold
            if collapsing != state.collapsed[i]:
                # The window holds the steps since the last log (or before the resume step: the
                # checkpoint carries the window on); its `steps` now sum over the ranks.
                first = max(state.step - round(float(run.window.steps) / run.dp.world_size) + 1, 1)
                message = _collapse_message(state.step, first, run.slots[i], s, cfg, collapsing)
                console.warn(message) if collapsing else run.progress.print(message)
                run.tracker.warning(message, state.step)
            state.collapsed[i] = collapsing
    run.progress.update(state.step, means["loss"], lr, means["tokens_per_sec"], imbalance)
    run.progress.window_line(state.step)
    run.window.reset()
    run.stats.reset()
    state.window_seconds, state.window_tokens = 0.0, 0
    run.tracker.flush()


def _collapse_message(step: int, first: int, slot: int, s: LayerStats, cfg: Config, collapsing: bool) -> str:
    """The warning (or the all-clear) for a layer whose routing crossed log.collapse_threshold over
    the window of steps first..step."""
    window = f"over steps {first}-{step}" if first < step else f"at step {step}"
    if not collapsing:
        return f"step {step}: routing in layer {slot} recovered: max/mean expert load {s.max_over_mean:.2f} {window}"
    return (
        f"step {step}: routing in layer {slot} is collapsing: max/mean expert load {s.max_over_mean:.2f} > "
        f"log.collapse_threshold={cfg.log.collapse_threshold} {window}, {s.dead_experts} dead experts; "
        "if it persists, raise the balancing loss (moe.aux_loss_coef, or moe.importance_loss_coef and "
        "moe.load_loss_coef for noisy gating)"
    )


def evaluate(run: Run, state: LoopState) -> float:
    """The validation loss (split over ranks), logged with the routing heatmap, and for a
    fine-tuned MoE the router drift since the starting checkpoint; returns the loss."""
    stats = RoutingStats(len(run.slots), run.stats.experts, run.device)
    drift = bool(run.slots) and bool(run.cfg.train.init_from) and run.carry is None and (
        state.step == 0 or state.routes_at_start is not None)
    routes: Optional[list] = [] if drift else None
    loss = mean_loss(run.model, run.val_blocks, run.val_batches, run.device, run.amp, stats, run.dp,
                     stateful=run.carry is not None, lockstep=run.ep is not None, top1=routes)
    run.tracker.evaluation(loss, perplexity(loss), state.step)
    if run.slots:
        run.tracker.heatmap(stats.summary(), state.step)
    changed = ""
    if routes is not None:
        routes = [r[: len(run.slots)] if r is not None else None for r in routes]  # MoE layers (not a mixture head's gate)
        if state.routes_at_start is None:
            state.routes_at_start = routes
        else:
            fractions = _route_drift(run, state.routes_at_start, routes)
            run.tracker.drift(run.slots, fractions, state.step)
            changed = f", top-1 expert changed since the start for {sum(fractions) / len(fractions):.1%} of tokens"
    run.progress.print(f"step {state.step}: eval loss {loss:.4f}, ppl {perplexity(loss):.2f}{changed}")
    state.eval_loss = loss
    _track_best(run, state, loss)
    return loss


def _route_drift(run: Run, start: list, now: list) -> list[float]:
    """Per MoE layer, the fraction of scored validation tokens (over all ranks) whose top-1
    expert differs between `start` and `now` (mean_loss's top1 lists of the same batches)."""
    sums = torch.zeros(2, len(run.slots), dtype=torch.float64)  # (changed, tokens) per layer
    for a, b in zip(start, now):
        if a is not None and b is not None:
            sums[0] += (a != b).sum(dim=1).double()
            sums[1] += a.shape[1]
    if run.dp.enabled:
        sums = sums.to(run.device)
        distributed.all_reduce_sum_([sums], run.dp)
        sums = sums.cpu()
    return (sums[0] / sums[1].clamp_min(1.0)).tolist()


def _track_best(run: Run, state: LoopState, loss: float) -> None:
    """The best eval loss so far, and train.early_stopping's count of evaluations since it (the
    starting model's evaluation counts as the first best)."""
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
        return
    state.evals_since_best += 1
    patience = run.cfg.train.early_stopping
    if patience is not None and state.evals_since_best >= patience:
        state.early_stopped = True
        run.progress.print(
            f"step {state.step}: stopping early (train.early_stopping={patience}): no eval loss below "
            f"{state.best_eval_loss:.4f} (step {state.best_step}) in {state.evals_since_best} evaluations"
        )


def save(run: Run, state: LoopState) -> None:
    """A checkpoint of this step, in the one-process layout. Every rank takes part (the window
    sums and RNG states are collected, and under expert parallelism every expert and its optimizer
    state); rank 0 writes."""
    window, routing = _summed_state(run.window, run.dp), _summed_state(run.stats, run.dp)
    rng = distributed.gather_objects(_rng_state(), run.dp)
    carry = _gathered_carry(run)
    routes = _gathered_routes(run, state)
    optimizer = run.ep.full_optimizer_state(run.optimizer) if run.ep is not None else run.optimizer.state_dict()
    with _full_experts(run, gather=True):
        if run.dp.is_main:
            _write_checkpoint(run, state, optimizer, window, routing, rng, carry, routes)
    state.checkpoint = checkpoint.step_dir(run.run_dir, state.step)


def _full_experts(run: Run, gather: bool):
    """The model with every expert in place (expert_parallel.ExpertParallel.full_experts)."""
    return run.ep.full_experts(gather) if run.ep is not None else nullcontext()


def _write_checkpoint(run: Run, state: LoopState, optimizer: dict, window, routing, rng, carry, routes) -> None:
    """Rank 0's part of `save`: the checkpoint directory, from what every rank collected."""
    saved = {"optimizer": optimizer, "sampler": run.sampler.state_dict(), "window": window,
             "routing_stats": routing, "collapsed": state.collapsed, "rng": rng}
    if carry is not None:
        saved["lstm_state"] = carry
    if routes is not None:
        saved["routes_at_start"] = routes
    meta = checkpoint.metadata(
        run.cfg,
        tokens_seen=state.tokens_seen,
        lr=lr_at(state.step - 1, run.cfg.optim, run.cfg.train.max_steps) if state.step else None,
        eval_loss=state.eval_loss,
        first_eval_loss=state.first_eval_loss,
        data=run.data_keys,
        world_size=run.dp.world_size,
        expert_parallel=run.ep.size if run.ep is not None else 1,
        tokens_per_sec=state.session_tokens / state.train_seconds if state.train_seconds else None,
        best_eval_loss=state.best_eval_loss,
        best_step=state.best_step,
        evals_since_best=state.evals_since_best,
    )
    keep_best = run.cfg.checkpoint.keep_best and state.best_step is not None
    checkpoint.save(run.run_dir, state.step, run.model, saved, meta, run.cfg.checkpoint.keep_last,
                    keep=state.best_step if keep_best else None)
    if keep_best and checkpoint.step_dir(run.run_dir, state.best_step).is_dir():
        checkpoint.mark_best(run.run_dir, state.best_step)


def _gathered_routes(run: Run, state: LoopState) -> Optional[torch.Tensor]:
    """The starting model's top-1 experts (LoopState.routes_at_start) of every rank, in the order
    of the validation batches: (MoE layers, scored tokens), whatever the number of processes."""
    if state.routes_at_start is None:
        return None
    ranks, w = distributed.gather_objects(state.routes_at_start, run.dp), run.dp.world_size
    return torch.cat([ranks[i % w][i // w] for i in range(len(run.val_batches))], dim=1)


def _restore_routes(run: Run, state: LoopState, full: Optional[torch.Tensor]) -> None:
    """This rank's share of _gathered_routes' tensor, cut at its validation batches."""
    if full is None:
        return
    counts = [int((run.val_blocks.batch(ids)[1] != sft.IGNORE).sum()) for ids in run.val_batches]
    if sum(counts) != full.shape[1]:
        console.warn("the validation batches changed since the start (train.eval_batches?): router drift against "
                     "the starting checkpoint is no longer measured")
        return
    ends = np.cumsum(counts)
    state.routes_at_start = [full[:, ends[i] - counts[i] : ends[i]] for i in range(run.dp.rank, len(counts), run.dp.world_size)]


def _gathered_carry(run: Run) -> Optional[torch.Tensor]:
    """The carried LSTM state of all streams in stream order, (layers, 2, batch_size, D), on rank 0;
    None when stateless or when the streams start again at the next step. Stream order does not
    depend on the number of processes, so the run resumes under any world size."""
    if run.carry is None:
        return None
    local = None if any(c is None for c in run.carry) else torch.cat(run.carry, dim=2).cpu()
    parts = distributed.gather_objects(local, run.dp)
    if not run.dp.is_main or any(p is None for p in parts):
        return None
    return torch.cat(parts, dim=2)


def _restore_carry(run: Run, full: Optional[torch.Tensor]) -> None:
    """This rank's micro-batches' share of a checkpoint's carried state (see _gathered_carry)."""
    if run.sampler.fresh:
        return
    if full is None:
        raise ValueError("it holds no carried LSTM state, which train.lstm_stateful needs to continue the streams")
    if full.shape[2] != run.cfg.train.batch_size:
        raise ValueError(f"the carried LSTM state holds {full.shape[2]} streams, not train.batch_size")
    rows = full[:, :, run.dp.rank * run.micro * run.accum : (run.dp.rank + 1) * run.micro * run.accum]
    run.carry = [c.to(run.device) for c in rows.split(run.micro, dim=2)]


# ------------------------------------------------------------------------------- loop helpers


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


def loss_sums(out) -> torch.Tensor:
    """One micro-batch's (objective * scored targets, scored targets, router losses), in the
    accumulators' dtype: its objective weighs by the targets it scores (none: zero loss, zero
    count), its router losses by one."""
    dtype = accumulator_dtype(out.loss.device)
    routers = (out.aux_loss + out.z_loss).detach().to(dtype)
    scored = out.scored.to(dtype)
    return torch.stack([(out.loss.detach().to(dtype) - routers) * scored, scored, routers])


class LossWindow(Sums):
    """Loss sums over the logging window, kept on the device: no host sync per micro-step. The
    objective and lm_loss are means over the scored targets (a micro-batch with none, e.g. an
    instruction-tuning row whose response was cut off, adds zero loss and zero count); the
    router losses are means over micro-batches; loss = objective + aux_loss + z_loss."""

    ROUTER_TERMS = tuple(f"router_{name}" for name in LOSS_NAMES)
    FIELDS = ("objective", "lm_loss", "scored", "aux_loss", "z_loss", *ROUTER_TERMS, "grad_norm", "micro_steps", "steps")

    def reset(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, self.zeros())

    def add_micro(self, out, sums: torch.Tensor) -> None:
        """`sums`: loss_sums(out)."""
        objective, scored, _ = sums.to(self.objective.dtype)
        self.objective.add_(objective)
        self.lm_loss.add_(out.lm_loss.detach() * scored)
        self.scored.add_(scored)
        for name in ("aux_loss", "z_loss"):
            getattr(self, name).add_(getattr(out, name).detach())
        for name, value in out.aux_terms.items():
            getattr(self, f"router_{name}").add_(value.detach())
        self.micro_steps += 1

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm += grad_norm.detach()
        self.steps += 1

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "scored" in state:  # else saved before the window weighed tokens: this window starts afresh
            super().load_state_dict(state)

    def means(self) -> dict[str, float]:
        """Window means by their names under train/ (tracking.py)."""
        m, s, n = max(float(self.micro_steps), 1.0), max(float(self.steps), 1.0), max(float(self.scored), 1.0)
        out = {k: float(getattr(self, k)) / m for k in ("aux_loss", "z_loss")}
        out["lm_loss"] = float(self.lm_loss) / n
        out["loss"] = float(self.objective) / n + out["aux_loss"] + out["z_loss"]
        out["grad_norm"] = float(self.grad_norm) / s
        if float(self.router_z) != 0.0:  # MoE models: each router loss, unweighted
            out.update({f"router/{k[len('router_'):]}": float(getattr(self, k)) / m for k in self.ROUTER_TERMS})
        return out


def _summed_state(acc: Sums, dp: Dist) -> dict[str, torch.Tensor]:
    """A window's sums over every rank, for the checkpoint (rank 0 carries them on at resume)."""
    sums = [t.clone() for t in acc.tensors()]
    distributed.all_reduce_sum_(sums, dp)
    return {name: t.cpu() for name, t in zip(acc.FIELDS, sums)}


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _seed_rank(seed: int, dp: Dist) -> None:
    """Each rank its own dropout and routing noise (the weights were initialised alike before)."""
    torch.manual_seed(seed + 7919 * (dp.rank + 1))


def _restore_rng(saved, dp: Dist, seed: int) -> None:
    """Each rank's RNG from the checkpoint (one state per rank; older checkpoints hold one)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != dp.world_size:
        console.warn(
            f"the checkpoint was saved by {len(states)} processes and this run has {dp.world_size}: the data order "
            "continues exactly, but dropout and routing noise take fresh random streams"
        )
        _seed_rank(seed, dp)
        return
    torch.set_rng_state(states[dp.rank]["torch"])
    if "cuda" in states[dp.rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states[dp.rank]["cuda"])
