"""`moectl quantize`: store a trained model's weights in fewer bits, chosen by what each tensor does.

  experts  the routed experts' stacked matrices, most of an MoE's bytes: --experts int8 or int4
  router   the gates: never below bf16 (they pick the experts; a flipped choice costs a whole
           expert's output): bf16, or fp32 with --rest none
  rest     attention, shared experts, dense FFNs, LSTM matrices, embeddings and the output head:
           --rest bf16, int8, or none (kept fp32)
  vectors  norms, biases and a balancing bias: kept fp32 (a few kilobytes)

The integers are symmetric absmax round-to-nearest in groups of --group-size along each row
(common/quant.py), packed into the bundle's model.safetensors with their fp16 scales; eval,
generate, route-stats and export dequantise them on load. The card and meta.json say what was
done, and the eval loss is measured on the dequantised weights, the numbers the bundle gives.

`--json` keys: out, summary (the one line eval's header shows), eval_loss_before, eval_loss_after
(the same validation batches), bytes_by_role ({role: {before, after}}), file_bytes.

Why the few lines here rather than a library: torchao's and hqq's quantised tensors are tensor
subclasses saved with pickle (a checkpoint moectl loads must never unpickle code), and
optimum-quanto writes its own quantisation map; storing integers and scales as plain safetensors
tensors keeps the bundle ours and readable anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from moectl.commands.evaluate import run as evaluate_run
from moectl.commands.export import check_target, export_bundle
from moectl.common import quant
from moectl.common.errors import ConfigError
from moectl.moe import MoELayer
from moectl.services.loaded_model import LoadedModel

EXPERTS = ("int8", "int4")
REST = ("bf16", "int8", "none")


def roles(model: torch.nn.Module) -> dict[str, str]:
    """Each state-dict name's role: experts, router, vector (1-D or smaller) or rest."""
    prefixes = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            prefixes[f"{name}.experts."] = "experts"
            prefixes[f"{name}.router."] = "router"
    found = {}
    for name, t in model.state_dict().items():
        role = next((r for p, r in prefixes.items() if name.startswith(p)), "rest")
        found[name] = "vector" if t.dim() < 2 or not t.is_floating_point() else role
    return found


def plan(model: torch.nn.Module, experts: str, rest: str) -> dict[str, Optional[str]]:
    """How each tensor is stored: int8, int4, bf16, or None (as it is)."""
    how = {"experts": experts, "rest": None if rest == "none" else rest, "router": None if rest == "none" else "bf16",
           "vector": None}
    return {name: how[role] for name, role in roles(model).items()}


def _bytes(state: dict[str, torch.Tensor], chosen: dict[str, Optional[str]], group: int) -> dict[str, tuple[int, int]]:
    """Stored bytes per role, tied tensors once: before (as trained) and after."""
    out, tied = {}, quant.ties(state)
    for name, t in state.items():
        if name in tied:
            continue
        how = chosen[name]
        after = (quant.stored_bytes(t.numel(), quant.BITS[how], group, t.shape[-1]) if how in quant.BITS
                 else t.numel() * (2 if how == "bf16" else t.element_size()))
        out[name] = (t.numel() * t.element_size(), after)
    return out


def quantize(loaded: LoadedModel, out: Path, experts: str, rest: str = "bf16", group: int = 64,
             overwrite: bool = False) -> tuple[Path, dict]:
    """Write the quantised bundle; returns it and a report: bytes per role before and after, the
    file's bytes, and the eval loss before and after on the same batches."""
    if experts not in EXPERTS:
        raise ConfigError(f"--experts {experts!r}: choose int8 or int4")
    if rest not in REST:
        raise ConfigError(f"--rest {rest!r}: choose bf16, int8 or none")
    if group < 2 or group % 2:
        raise ConfigError(f"--group-size {group}: choose an even number of values per scale, e.g. 32, 64 or 128")
    loaded.refuse_adapters("quantize")
    if any(step.get("kind") == "quantize" for step in loaded.derived):
        raise ConfigError(f"{loaded.checkpoint} is already quantised; quantise the trained run it came from instead")
    if not any(isinstance(m, MoELayer) for m in loaded.model.modules()):
        raise ConfigError(f"{loaded.run_dir} is a dense model: it has no experts to quantise")
    check_target(Path(out), overwrite)  # before any work
    state = loaded.model.state_dict()
    chosen = plan(loaded.model, experts, rest)
    # The model as the bundle will give it back: every tensor through its storage and back.
    restored = {name: quant.fake_quantize(t, quant.BITS[chosen[name]], group) if chosen[name] in quant.BITS
                else t.to(torch.bfloat16).to(t.dtype) if chosen[name] == "bf16" else t for name, t in state.items()}
    model = copy.deepcopy(loaded.model)
    model.load_state_dict(restored)
    sizes = _bytes(state, chosen, group)
    role_of = roles(loaded.model)
    by_role = {}
    for name, (before, after) in sizes.items():
        b = by_role.setdefault(role_of[name], [0, 0])
        b[0], b[1] = b[0] + before, b[1] + after
    step = {"kind": "quantize",
            "summary": f"weights quantised: experts {experts}, router {'fp32' if rest == 'none' else 'bf16'}, rest "
                       f"{'fp32' if rest == 'none' else rest}, groups of {group} (moectl quantize)",
            "scheme": f"{quant.SCHEME}: symmetric absmax round-to-nearest, fp16 scale per group of {group}",
            "bytes_by_role": "; ".join(f"{role} {b[0]:,} -> {b[1]:,}" for role, b in sorted(by_role.items()))}

    def write(path: Path) -> None:
        from safetensors.torch import save_file

        tensors, metadata = quant.pack(state, chosen, group)
        save_file(tensors, str(path), metadata={**metadata, "step": str(loaded.step)})

    before = evaluate_run(loaded).loss
    path = export_bundle(dataclasses.replace(loaded, model=model), out, dtype="quantised", overwrite=overwrite,
                         derived=step, weights=write)
    after = json.loads((path / "meta.json").read_text())["eval_loss"]
    report = {"out": str(path), "summary": step["summary"], "eval_loss_before": before, "eval_loss_after": after,
              "bytes_by_role": {role: {"before": b[0], "after": b[1]} for role, b in sorted(by_role.items())},
              "file_bytes": (path / "model.safetensors").stat().st_size}
    return path, report
