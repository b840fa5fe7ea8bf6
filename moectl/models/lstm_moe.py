"""The LSTM language model with MoE layers of Shazeer et al. 2017 ("Outrageously large
neural networks", Appendix C): embedding -> LSTM -> MoE -> LSTM -> ... -> softmax.

An FFN slot (MoE, or dense in the baseline) sits between each pair of stacked LSTM layers. As
in the paper's Appendix C.1 its output passes through a sigmoid (`sigmoid`) before dropout and
the residual connection; every layer's output gets dropout, and residual connections around
each layer are optional (`residual`).
Shapes: B batch, T sequence length, D model dim (= LSTM units = MoE input/output).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moectl.models.base import LanguageModel
from moectl.models.layers import FFNSlot
from moectl.moe import RoutingRecord


class LSTMMoE(LanguageModel):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        make_ffn: Callable[[int], FFNSlot],
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        residual: bool = True,
        sigmoid: bool = True,
        loss_coefs: Optional[dict[str, float]] = None,
        init_std: float = 0.02,
        **head,
    ):
        super().__init__(vocab_size, d_model, tie_embeddings, loss_coefs, dropout, init_std, **head)
        self.residual, self.sigmoid = residual, sigmoid
        self.lstms = nn.ModuleList(nn.LSTM(d_model, d_model, batch_first=True) for _ in range(n_layers))
        self.ffns = nn.ModuleList(make_ffn(i) for i in range(n_layers - 1))
        self.init_weights()

    def _add(self, h: Tensor, y: Tensor) -> Tensor:
        return h + self.drop(y) if self.residual else self.drop(y)

    def body(
        self, h: Tensor, state: Optional[Tensor] = None, segments: Optional[Tensor] = None, valid: Optional[Tensor] = None
    ) -> tuple[Tensor, list[RoutingRecord], Optional[Tensor]]:
        """`state` (n_layers, 2, B, D): each LSTM's (h, c) to start from, as the previous block of
        the same streams left them (truncated BPTT); None: zero. Returns the state after this block.
        `segments` (B, T): every segment starts from a zero state (packed examples); no state
        is returned then."""
        records, final = [], []
        runs = _segment_runs(segments) if segments is not None else None
        for i, lstm in enumerate(self.lstms):
            if runs is not None:
                y = _lstm_per_segment(lstm, h, *runs)
            else:
                start = None if state is None else (state[i, 0][None].contiguous(), state[i, 1][None].contiguous())
                y, (h_n, c_n) = run_lstm(lstm, h, start)  # (B, T, D), and (1, B, D) twice
                final.append(torch.stack([h_n[0], c_n[0]]))
            h = self._add(h, y)
            if i < len(self.ffns):
                y, record = self.ffns[i](h, valid)
                h = self._add(h, torch.sigmoid(y) if self.sigmoid else y)  # the paper's sigmoid before dropout
                if record is not None:
                    records.append(record)
        return h, records, torch.stack(final) if final else None


def run_lstm(lstm: nn.LSTM, *args):
    """`lstm(*args)`, with its LoRA adapters (models/lora.py) joined to the weights they adapt: the
    recurrence uses each weight whole, so W + s A B is formed once per call."""
    adapters = getattr(lstm, "adapters", None)
    if adapters is None:
        return lstm(*args)
    weights = {name: getattr(lstm, name) + adapter.delta() for name, adapter in adapters.items()}
    return torch.func.functional_call(lstm, weights, args)


def _segment_runs(segments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T) segment ids -> for each position (flattened, N = B*T) its run (a maximal stretch
    of one segment within a row) and its offset in the run, and each run's length."""
    b, t = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = starts.reshape(-1)  # (N,)
    first = starts.nonzero().squeeze(1)  # (R,) flat index where each run starts
    run = starts.long().cumsum(0) - 1  # (N,)
    offset = torch.arange(b * t, device=segments.device) - first[run]
    lengths = torch.diff(first, append=first.new_tensor([b * t]))  # (R,)
    return run, offset, lengths


def _lstm_per_segment(lstm: nn.LSTM, h: Tensor, run: Tensor, offset: Tensor, lengths: Tensor) -> Tensor:
    """Run `lstm` over each run of (B, T, D) `h` from a zero state: the runs become the rows of a
    packed batch, and the outputs go back to their positions."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    b, t, d = h.shape
    lengths_cpu = lengths.cpu()
    rows = h.new_zeros(len(lengths_cpu), int(lengths_cpu.max()), d)  # (R, max run, D)
    rows[run, offset] = h.reshape(b * t, d)
    packed = pack_padded_sequence(rows, lengths_cpu, batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(run_lstm(lstm, packed)[0], batch_first=True, total_length=rows.shape[1])
    return out[run, offset].view(b, t, -1)
