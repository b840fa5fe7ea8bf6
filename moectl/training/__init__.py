"""The training loop's parts; moectl/commands/train.py is the loop itself and imports them from here.

  model.py   the model as the loop trains it: built, warm-started, frozen, sharded, on its device
  optim.py   AdamW's parameter groups and the LR schedule
  state.py   the resumable state: parts that each save and restore themselves in a checkpoint
  window.py  the logging window (loss sums, routing counts, collapse warnings) and the weight of
             each micro-batch in the step
"""

from moectl.training.model import CheckpointWeights, build, tokenizer_file
from moectl.training.optim import check_schedule, lr_at, make_optimizer, memory_record
from moectl.training.state import (
    Flags,
    LoopState,
    LSTMCarry,
    OptimizerState,
    RankSums,
    RNGStates,
    RunResult,
    StartRoutes,
    TrainState,
    seed_rank,
)
from moectl.training.window import LossWindow, loss_sums, review, routing_window, target_shares

__all__ = ["CheckpointWeights", "Flags", "LoopState", "LSTMCarry", "LossWindow", "OptimizerState", "RNGStates", "RankSums", "RunResult", "StartRoutes", "TrainState",
           "build", "check_schedule", "loss_sums", "lr_at", "make_optimizer", "memory_record", "review", "routing_window", "seed_rank", "target_shares", "tokenizer_file"]
