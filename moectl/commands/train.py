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

The loop's parts live in moectl/training/: the model as trained, the optimizer and LR schedule,
the logging window, and the resumable state (`Run.resumable`), whose parts each save and restore
themselves; save and restore here never name a part.

Under torchrun the same loop runs in every process (moectl/services/distributed.py): each rank takes
its slice of every global batch, DDP averages the gradients (skipping the all-reduce on
non-final micro-steps), routing statistics and logged losses are summed over ranks before
they are logged, evaluation is split over ranks, and only rank 0 writes logs and checkpoints.
With train.expert_parallel each rank holds only its share of the experts (moectl/services/expert_parallel.py):
the loop reduces and clips their gradients itself, and checkpoints hold them in the one-process layout.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from moectl import config, data, training
from moectl.commands.evaluate import mean_loss, perplexity
from moectl.common import console, runtime
from moectl.common.console import StopOnInterrupt, TrainProgress
from moectl.common.errors import CheckpointError, DataError, TrainingError
from moectl.common.runtime import Dist
from moectl.config import Config
from moectl.models import LanguageModel, moe_layers, moe_slots
from moectl.services import checkpoint, distributed, expert_parallel
from moectl.services.tracking import Tracker
from moectl.training import LoopState, RunResult

if TYPE_CHECKING:
    from moectl.common.stats import RoutingStats
    from moectl.services.expert_parallel import ExpertParallel


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
    train_blocks: data.Rows
    sampler: data.BatchSampler | data.StreamSampler  # global batches of block ids, the same on every rank
    val_blocks: data.Rows
    val_batches: list  # the validation block ids, in chunks of one micro-batch; each rank scores its share
    data_keys: dict[str, str]  # identify the tokenised data: a resumed run checks they did not change
    micro: int  # sequences per forward pass in this process
    accum: int  # micro-batches per optimizer step in this process
    slots: list[int]  # FFN slot of each routing record (MoE layers, then a mixture head's gate)
    bias_routers: list  # (routing-record index, router) of routers balanced by their expert bias
    count_reduce: Optional[Callable]  # sums the Switch loss's counts over ranks (moe.aux_loss_scope=global)
    window: training.LossWindow
    stats: "RoutingStats"  # the logging window's routing counts
    params: tuple[int, int]  # (total, active per token) of the whole model, however its experts are sharded
    carry: Optional[training.LSTMCarry] = None  # train.lstm_stateful: the LSTM state each micro-batch carries on
    drift: Optional[training.StartRoutes] = None  # train.init_from: the starting model's routes, to measure drift
    ep: Optional["ExpertParallel"] = None  # train.expert_parallel > 1: this rank's experts and its groups
    resumable: Optional[training.TrainState] = None  # what a checkpoint keeps and a resume restores
    weights: Optional[training.CheckpointWeights] = None  # the model's share of a checkpoint (a LoRA run's: adapters)
    ddp_model: Optional[nn.Module] = None  # the model as the loop calls it: DDP-wrapped under torchrun
    tracker: Optional[Tracker] = None
    progress: Optional[TrainProgress] = None


def fit(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train as `cfg` says, in this process or as one rank of a torchrun job."""
    expert_parallel.check_layout(cfg.train.expert_parallel, runtime.torchrun_env().world_size)
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
                           params_total=total, params_active=active,
                           params_trained=sum(p.numel() for p in run.model.parameters() if p.requires_grad)
                           if tr.lora.enabled or tr.freeze != "none" else 0)
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
    tr, run_dir = cfg.train, checkpoint.run_directory(cfg.run)
    if cfg.optim.warmup_steps > tr.max_steps:  # lr_at warms up over the whole run instead
        console.warn(f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than train.max_steps={tr.max_steps}: "
                     f"warming up over all {tr.max_steps} steps")
    micro, accum = distributed.batch_layout(tr, dp.world_size)
    # Rank 0 alone judges the run directory, before anyone writes to it.
    resume_from = distributed.from_main(lambda: checkpoint.check_run_dir(run_dir, cfg, resume, overwrite), dp)
    if device.type == "cpu":
        runtime.keep_freed_memory()  # reuse big blocks across steps instead of re-faulting them in
    # Rank 0 tokenises and fills the caches, then the other ranks read them.
    console.status(f"loading data ({data.describe(cfg.data)})")
    tokenizer = training.tokenizer_file(run_dir, resume_from, tr.init_from)
    corpus = distributed.main_first(lambda: data.prepare(cfg.data, cfg.tokenizer, tokenizer_file=tokenizer), dp)
    data.report_tokens(corpus, cfg.tokenizer, new_tokenizer=not resume_from and not tr.init_from)
    model, params, ep = training.build(cfg.model, cfg.moe, tr, corpus.tokenizer.get_vocab_size(), dp, device,
                                       warm_start=bool(tr.init_from) and not resume_from)
    run = _make_run(cfg, dp, device, run_dir, model, ep, params, corpus, micro, accum)
    run.weights = training.CheckpointWeights(model, tr)
    state = LoopState(collapsed=[False] * len(run.slots))
    run.resumable = _resumable(run, state)
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
        corpus.save(run_dir, tokenizer=resume_from is None)
    run.ddp_model = distributed.wrap(model, dp, device, ignore=expert_parallel.parameter_names(model, ep) if ep else ())
    _open_logs(run, state, purge=state.step + 1 if resume_from else 0 if resume else None)
    return run, state


def _make_run(cfg: Config, dp: Dist, device: torch.device, run_dir: Path, model: LanguageModel,
              ep: Optional["ExpertParallel"], params: tuple[int, int], corpus: data.Corpus, micro: int, accum: int) -> Run:
    """The Run's fixed objects: the data's rows and samplers, the optimizer, the logging window."""
    tr = cfg.train
    train_blocks, val_blocks = (data.blocks(split, cfg.data, corpus.eot_id) for split in (corpus.train, corpus.validation))
    data.report(train_blocks, val_blocks, cfg.data)
    stats = training.routing_window(model, device)
    run = Run(
        cfg=cfg, dp=dp, device=device, amp=runtime.autocast_dtype(device, tr.precision), run_dir=run_dir, model=model,
        optimizer=training.make_optimizer(model, cfg.optim),
        train_blocks=train_blocks,
        sampler=data.StreamSampler(len(train_blocks), tr.batch_size) if tr.lstm_stateful
        else data.BatchSampler(len(train_blocks), tr.batch_size, tr.seed),
        val_blocks=val_blocks,
        val_batches=data.stream_batches(val_blocks, tr.micro_batch, tr.eval_batches) if tr.lstm_stateful
        else data.eval_chunks(data.eval_batches(val_blocks, tr.micro_batch, tr.eval_batches), micro),
        data_keys={"train": corpus.train.key, "validation": corpus.validation.key},
        micro=micro, accum=accum, slots=moe_slots(model),
        bias_routers=[(i, layer.router) for i, layer in enumerate(moe_layers(model))
                      if layer.router.balances_with_bias and tr.lora.routers_train],
        count_reduce=distributed.sum_over_ranks if dp.enabled and cfg.moe.aux_loss_scope == "global" else None,
        window=training.LossWindow(device), stats=stats, params=params, ep=ep,
    )
    if tr.lstm_stateful:
        run.carry = training.LSTMCarry(accum, micro, run.sampler, dp, device)
    if run.slots and tr.init_from and not tr.lstm_stateful:
        run.drift = training.StartRoutes(len(run.slots), dp, device, val_blocks, run.val_batches)
    return run


def _resumable(run: Run, state: LoopState) -> training.TrainState:
    """The parts a checkpoint keeps, by their names in its state.pt (the weights go beside it)."""
    parts = {
        "optimizer": training.OptimizerState(run.optimizer, run.ep),
        "sampler": run.sampler,
        "window": training.RankSums(run.window, run.dp),
        "routing_stats": training.RankSums(run.stats, run.dp),
        "collapsed": training.Flags(state.collapsed),
        "rng": training.RNGStates(run.dp, run.cfg.train.seed),
    }
    if run.carry is not None:
        parts["lstm_state"] = run.carry
    if run.drift is not None:
        parts["routes_at_start"] = run.drift
    return training.TrainState(run.ep, parts, optional=("collapsed", "lstm_state", "routes_at_start"))


def _open_logs(run: Run, state: LoopState, purge: Optional[int]) -> None:
    """TensorBoard (dropping the events after `purge`), the progress bar, and the run's status line."""
    cfg, dp, tr = run.cfg, run.dp, run.cfg.train
    run.tracker = Tracker(run.run_dir, cfg.log.tensorboard and dp.is_main, purge_step=purge)
    run.tracker.config(config.dump(cfg), state.step)
    run.progress = TrainProgress(tr.max_steps, state.step, enabled=dp.is_main)
    total, active = run.params
    processes = f"; {dp.world_size} processes ({run.micro}x{run.accum} sequences each per step)" if dp.enabled else ""
    if run.ep is not None:
        processes += f", experts sharded over groups of {run.ep.size} ({cfg.moe.num_experts // run.ep.size} per process per layer)"
    console.status(
        f"{cfg.model.arch}: {console.human(total)} parameters, {console.human(active)} active per token"
        f"; device {run.device}{' bf16' if run.amp else ''}; {tr.max_steps} steps of {tr.batch_size}x{cfg.data.seq_len} tokens"
        f"{processes}"
    )


def restore(run: Run, state: LoopState, ckpt: Path) -> None:
    """Continue from `ckpt`: the weights and every part of the resumable state, then the counters."""
    meta = checkpoint.read_meta(ckpt)
    with run.resumable.weights(gather=False):  # every rank reads the full checkpoint and keeps its experts
        run.weights.load(ckpt, meta)
    saved = checkpoint.load_state(ckpt)
    try:
        run.resumable.load_state_dict(saved)
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.pt: {exc}") from None
    if meta.get("data", run.data_keys) != run.data_keys:
        raise DataError(
            f"--resume: the training or validation data changed since {ckpt} was saved (its tokens differ), "
            "so the run cannot continue on the same data; start a new run with --run-name"
        )
    state.load_counters(meta)
    state.checkpoint = ckpt
    training.check_schedule(meta.get("lr"), state.step, run.cfg.optim, run.cfg.train.max_steps)
    console.status(f"resuming {run.run_dir} from step {state.step}")


# ------------------------------------------------------------------------------------ the steps


def train_step(run: Run, state: LoopState, stop: StopOnInterrupt) -> float:
    """One optimizer step over this rank's share of the next global batch; returns its LR."""
    tr, dp = run.cfg.train, run.dp
    started = time.perf_counter()
    lr = training.lr_at(state.step, run.cfg.optim, tr.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    step_loss, counts = _forward_backward(run)
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
    state.seconds_trained += seconds
    run.progress.update(state.step, loss, lr)
    return lr


def _forward_backward(run: Run) -> tuple[torch.Tensor, list]:
    """This rank's micro-batches of the next global batch, forward and backward (gradient
    accumulation); returns the step's loss_sums and, per bias-balanced router, its chosen tokens
    per expert."""
    dp = run.dp
    share = slice(dp.rank * run.micro * run.accum, (dp.rank + 1) * run.micro * run.accum)
    if run.carry is not None and run.sampler.fresh:  # the streams start again: a zero state
        run.carry.reset()
    ids = run.sampler.next()[share].reshape(run.accum, run.micro)  # (accum, micro) block ids
    counts = [0] * len(run.bias_routers)  # chosen tokens per expert over this step's micro-batches
    step_loss = torch.zeros(3, dtype=run.window.objective.dtype, device=run.device)  # loss_sums over micro-batches
    batches = [run.train_blocks.batch(micro_ids) for micro_ids in ids]
    shares = training.target_shares([y for _, y in batches], dp, run.device) if run.train_blocks.weighs_targets else None
    for j, micro_ids in enumerate(ids):
        x, y = (t.to(run.device, non_blocking=True) for t in batches[j])
        layout = {k: v.to(run.device) for k, v in run.train_blocks.layout(micro_ids).items()}  # packing, padding
        with distributed.gradient_sync(run.ddp_model, last_micro_step=j == run.accum - 1):
            with runtime.autocast(run.device, run.amp):
                out = run.ddp_model(x, y, count_reduce=run.count_reduce,
                                    state=run.carry.streams[j] if run.carry else None, **layout)
            if shares is None:
                loss = out.loss / run.accum
            else:  # each scored target weighs the same, however they fall over micro-batches and ranks
                loss = out.lm_loss * shares[j] + (out.aux_loss + out.z_loss) / run.accum  # none scored: lm_loss 0
            loss.backward()
        sums = training.loss_sums(out)
        step_loss += sums
        if run.carry is not None:  # truncated BPTT: the next block of these streams starts here
            run.carry.streams[j] = out.state.detach()
        run.window.add_micro(out, sums)
        run.stats.update(out.routing)
        for k, (i, _) in enumerate(run.bias_routers):
            counts[k] = counts[k] + out.routing[i].chosen_per_expert()
    return step_loss, counts


def log_window(run: Run, state: LoopState, lr: float) -> None:
    """The window's means to TensorBoard and the console, its routing statistics and collapse
    warnings. The window's sums are first added up over ranks, so every number covers the whole batch."""
    log = run.cfg.log
    distributed.all_reduce_sum_(run.window.tensors() + run.stats.tensors(), run.dp)
    means = {**run.window.means(), "lr": lr, "tokens_per_sec": state.window_tokens / max(state.window_seconds, 1e-9)}
    run.tracker.train(means, state.step)
    imbalance = None
    if run.slots and not run.stats.empty():
        # The window holds the steps since the last log (or before the resume step: the checkpoint
        # carries the window on); its `steps` now sum over the ranks.
        first = max(state.step - round(float(run.window.steps) / run.dp.world_size) + 1, 1)
        layers, imbalance, changes = training.review(run.stats, state.collapsed, log.collapse_threshold, run.slots,
                                                     first, state.step)
        run.tracker.routing(run.slots, layers, state.step, log.histograms)
        for collapsing, message in changes:
            console.warn(message) if collapsing else run.progress.print(message)
            run.tracker.warning(message, state.step)
    run.progress.update(state.step, means["loss"], lr, means["tokens_per_sec"], imbalance)
    run.progress.window_line(state.step)
    run.window.reset()
    run.stats.reset()
    state.window_seconds, state.window_tokens = 0.0, 0
    run.tracker.flush()


def evaluate(run: Run, state: LoopState) -> float:
    """The validation loss (split over ranks), logged with the routing heatmap, and for a
    fine-tuned MoE the router drift since the starting checkpoint; returns the loss."""
    stats, drift = run.stats.blank(), run.drift
    routes: Optional[list] = [] if drift is not None and (state.step == 0 or drift.start is not None) else None
    loss = mean_loss(run.model, run.val_blocks, run.val_batches, run.device, run.amp, stats, run.dp,
                     stateful=run.carry is not None, lockstep=run.ep is not None, top1=routes)
    run.tracker.evaluation(loss, perplexity(loss), state.step, state.seconds_trained)
    if run.slots:
        run.tracker.heatmap(stats.summary(), state.step, run.slots)
    fractions = drift.observe(routes) if routes is not None else None  # the first evaluation records the start
    changed = ""
    if fractions is not None:
        run.tracker.drift(run.slots, fractions, state.step)
        changed = f", top-1 expert changed since the start for {sum(fractions) / len(fractions):.1%} of tokens"
    run.progress.print(f"step {state.step}: eval loss {loss:.4f}, ppl {perplexity(loss):.2f}{changed}")
    state.eval_loss = loss
    stopping = state.record_eval(loss, run.cfg.train.early_stopping)
    if stopping:
        run.progress.print(stopping)
    return loss


def save(run: Run, state: LoopState) -> None:
    """A checkpoint of this step, in the one-process layout. Every rank takes part (parts of the
    resumable state gather from the ranks, and under expert parallelism so do the weights); rank 0 writes."""
    saved = run.resumable.state_dict()
    with run.resumable.weights(gather=True):
        if run.dp.is_main:
            meta = checkpoint.metadata(
                run.cfg, **state.counters(),
                lr=training.lr_at(state.step - 1, run.cfg.optim, run.cfg.train.max_steps) if state.step else None,
                data=run.data_keys, world_size=run.dp.world_size, expert_parallel=run.ep.size if run.ep is not None else 1,
                tokens_per_sec=state.session_tokens / state.train_seconds if state.train_seconds else None,
                **training.memory_record(run.model, run.optimizer), **run.weights.meta(),
            )
            keep_best = run.cfg.checkpoint.keep_best and state.best_step is not None
            checkpoint.save(run.run_dir, state.step, run.model, saved, meta, run.cfg.checkpoint.keep_last,
                            keep=state.best_step if keep_best else None, adapter=run.weights.adapter())
            if keep_best and checkpoint.step_dir(run.run_dir, state.best_step).is_dir():
                checkpoint.mark_best(run.run_dir, state.best_step)
    state.checkpoint = checkpoint.step_dir(run.run_dir, state.step)
