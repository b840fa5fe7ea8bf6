"""Weight-only quantisation: symmetric absmax round-to-nearest in groups, packed for storage.

A tensor is flattened and cut into groups of G consecutive values along its last dimension (the
last group of each row padded with zeros). Each group g stores one scale s_g = max|w| / qmax
(fp16) and the integers q = clamp(round(w / s_g), -qmax - 1, qmax), qmax = 2^(bits-1) - 1:
int8 as int8, int4 two to a byte (low nibble first, stored as q + 8). Dequantised, w' = q * s_g.
This is the scheme of llama.cpp's Q8_0 / Q4_0 blocks and of round-to-nearest baselines in the
GPTQ / AWQ papers: no calibration data, no zero point.

`pack` and `unpack` turn a whole state dict into safetensors tensors plus one JSON header entry
(QUANT_KEY) and back; quantised tensors are stored as NAME.qweight and NAME.scales, the others as
they are (bf16 where asked). Tied tensors are stored once, with the other names as aliases.
"""

from __future__ import annotations

import json
from typing import Optional

import torch
from torch import Tensor

QUANT_KEY = "moectl_quantization"  # safetensors metadata entry of a quantised weights file
SCHEME = "absmax-groups-v1"
BITS = {"int8": 8, "int4": 4}


def _rows(w: Tensor, group: int) -> tuple[Tensor, int]:
    """(R, C) rows of the last dimension, padded to whole groups: (R * C' / G, G), and C' - C."""
    last = w.shape[-1] if w.dim() else 1
    rows = w.detach().float().reshape(-1, last)
    pad = -last % group
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, group), pad


def quantize(w: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """(stored integers, fp16 scales (groups,)) of `w`; int4 packed two to a uint8."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: 8 or 4")
    if group < 2 or group % 2:
        raise ValueError(f"group size {group} must be an even number >= 2")
    qmax = 2 ** (bits - 1) - 1
    groups, _ = _rows(w, group)  # (n, G)
    scales = (groups.abs().amax(dim=1) / qmax).to(torch.float16)  # fp16, as stored
    safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[:, None]  # an all-zero group divides by tiny: q = 0
    q = torch.clamp(torch.round(groups / safe), -qmax - 1, qmax).to(torch.int8)  # (n, G)
    if bits == 8:
        return q.reshape(-1), scales
    u = (q + 8).to(torch.uint8).reshape(-1)  # 0..15
    return u[0::2] | (u[1::2] << 4), scales


def dequantize(stored: Tensor, scales: Tensor, bits: int, group: int, shape: list[int]) -> Tensor:
    """The fp32 tensor of `shape` that `quantize` stored."""
    if bits == 4:
        q = torch.stack([(stored & 0xF), (stored >> 4)], dim=1).reshape(-1).to(torch.int8) - 8
    else:
        q = stored.to(torch.int8)
    groups = q.reshape(-1, group).float() * scales.float()[:, None]  # (n, G)
    last = shape[-1] if shape else 1
    rows = groups.reshape(-1, last + (-last % group))[:, :last]
    return rows.reshape(shape)


def fake_quantize(w: Tensor, bits: int, group: int) -> Tensor:
    """What `w` becomes after a round trip through storage (same dtype as `w`)."""
    return dequantize(*quantize(w, bits, group), bits, group, list(w.shape)).to(w.dtype)


def stored_bytes(numel: int, bits: int, group: int, last: int) -> int:
    """Bytes `quantize` stores for a tensor of `numel` values whose last dimension is `last`."""
    padded = numel // last * (last + (-last % group))
    return padded * bits // 8 + padded // group * 2


def ties(state: dict[str, Tensor]) -> dict[str, str]:
    """Names whose tensor is an earlier name's (tied weights), mapped to that first name."""
    first, found = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key in first:
            found[name] = first[key]
        elif key is not None:
            first[key] = name
    return found


def pack(state: dict[str, Tensor], plan: dict[str, Optional[str]], group: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Safetensors tensors and metadata for `state`, each name stored as `plan` says: `int8` or
    `int4` (quantised), `bf16`, or None (as it is). Tensors shared by several names (tied
    weights) are stored under the first and listed as aliases."""
    tensors, entries, aliases = {}, {}, ties(state)
    for name, t in state.items():
        if name in aliases:
            continue
        how = plan.get(name)
        if how in BITS:
            stored, scales = quantize(t, BITS[how], group)
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = stored.contiguous(), scales.contiguous()
            entries[name] = {"bits": BITS[how], "group": group, "shape": list(t.shape)}
        elif how == "bf16":
            tensors[name] = t.detach().to(torch.bfloat16).contiguous().clone()
        else:
            tensors[name] = t.detach().contiguous().clone()
    header = {"scheme": SCHEME, "tensors": entries, "aliases": aliases}
    return tensors, {QUANT_KEY: json.dumps(header), "format": "pt"}


def unpack(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, Tensor]:
    """The state dict `pack` stored (quantised tensors dequantised to fp32, bf16 as bf16)."""
    header = json.loads(metadata[QUANT_KEY])
    if header.get("scheme") != SCHEME:
        raise ValueError(f"quantisation scheme {header.get('scheme')!r} is not {SCHEME!r}: written by another moectl version")
    state = {name: t for name, t in tensors.items() if not name.endswith((".qweight", ".scales"))}
    for name, e in header["tensors"].items():
        state[name] = dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], e["bits"], e["group"], e["shape"])
    for name, target in header["aliases"].items():
        state[name] = state[target]
    return state

