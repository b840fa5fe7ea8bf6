"""Starting a run from existing weights (`train.init_from`) and freezing parts of it (`train.freeze`).

Three sources:
- a moectl run, checkpoint or export bundle of the same model: every tensor is loaded (fine-tuning,
  e.g. on other data);
- a dense moectl model of the same backbone, into an MoE model: sparse upcycling (Komatsuzaki et al.
  2022). Everything outside the FFNs is copied; every expert of an MoE slot starts as a copy of that
  slot's dense FFN (plus optional Gaussian noise of `train.upcycle_noise` times the weight's std);
  routers keep their fresh init, and the experts' last matrix is divided by the layer's routed
  scale (moe.routed_scaling). With renormalised top-k weights (K > 1) the upcycled model
  computes exactly the dense model before training;
- a Hugging Face Mixtral directory (a transformers checkpoint, or what `moectl export --format hf`
  wrote for a Mixtral-shaped model): its config must describe the model the moectl config builds,
  and its tensors are mapped by moectl/services/hf.py.

The run uses the source's tokenizer, so token ids keep their meaning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from moectl import config
from moectl.common.errors import ConfigError
from moectl.config import ModelConfig, MoEConfig, TrainConfig
from moectl.models import build_model, is_router
from moectl.models.layers import FFNSlot
from moectl.services import checkpoint, hf


def _source(init_from: str) -> Path:
    path = Path(init_from)
    if not path.exists():
        raise ConfigError(f"train.init_from={init_from!r}: no such directory")
    return path


def source_tokenizer(init_from: Optional[str]) -> Optional[Path]:
    """The tokenizer.json of `init_from` (train.init_from; None when there is none)."""
    if not init_from:
        return None
    path = _source(init_from)
    tok = path / "tokenizer.json" if _mixtral_config(path) else checkpoint.resolve(path)[1] / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"train.init_from={init_from!r}: {tok} is missing; the source's tokenizer is needed")
    return tok


def initialize(model: nn.Module, model_cfg: ModelConfig, moe: MoEConfig, train: TrainConfig) -> str:
    """Load `train.init_from` into `model`, which the `model_cfg` and `moe` sections built; returns
    what was done, for the console. With train.lora it is the frozen base the adapters adapt."""
    path = _source(train.init_from)
    mixtral = _mixtral_config(path)
    if mixtral is not None:
        mismatch = hf.mixtral_mismatch(mixtral, model_cfg, moe)
        if mismatch:
            raise ConfigError(f"train.init_from={str(path)!r}: {mismatch}")
        _load_exactly(model, hf.from_mixtral(_load_safetensors(path), model_cfg, moe), path)
        return f"initialised from the Mixtral model in {path}"
    ckpt, run_dir = checkpoint.resolve(path)
    if checkpoint.holds_adapter(ckpt):
        raise ConfigError(
            f"train.init_from={str(path)!r} is a LoRA run, whose checkpoints hold adapters alone: merge them into "
            f"its base first (moectl export {path} --merge-lora --out DIR) and start from DIR"
        )
    source_cfg = config.load(run_dir / "config.yaml", saved=True)
    if source_cfg.model.backbone != model_cfg.backbone:
        raise ConfigError(
            f"train.init_from={str(path)!r} is a {source_cfg.model.arch} model and this run a {model_cfg.arch}: "
            "the backbones must match"
        )
    if model_cfg.is_moe and not source_cfg.model.is_moe:
        if train.lora.enabled:
            raise ConfigError(
                f"train.init_from={str(path)!r} is a dense model and this run an MoE: sparse upcycling makes new "
                "experts and routers, which train in full; set train.lora.rank=null, or adapt an MoE model"
            )
        return upcycle(model, model_cfg, moe, train, source_cfg.model, source_cfg.moe, ckpt)
    checkpoint.load_model(ckpt, model)
    return f"initialised from {ckpt}"


def base_reference(init_from: str) -> dict[str, str]:
    """What a LoRA run's checkpoints record of their base: the weights train.init_from resolves to
    (a checkpoint directory, or a transformers directory) and the sha256 of their files."""
    path = _source(init_from)
    mixtral = _mixtral_config(path) is not None
    where = path if mixtral else checkpoint.resolve(path)[0]
    files = sorted(path.glob("*.safetensors")) if mixtral else [where / "model.safetensors"]
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return {"path": str(where.resolve()), "sha256": digest.hexdigest()}


def _mixtral_config(path: Path) -> Optional[dict[str, Any]]:
    """The config.json of a transformers Mixtral directory (None for anything else)."""
    try:
        hc = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return hc if isinstance(hc, dict) and hc.get("model_type") == "mixtral" else None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory (one or more safetensors files), by name."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"train.init_from={str(path)!r}: no .safetensors weights in the Mixtral directory")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor], source: Path, skip: tuple[str, ...] = ()) -> None:
    """Load `state`: every tensor of `model` but those under `skip` must be there, with its shape."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:160])
        raise ConfigError(f"train.init_from={str(source)!r} does not fit this model: {detail}") from None
    missing = [k for k in missing if not k.startswith(skip) and not k.endswith("lm_head.weight")]  # lm_head: tied
    if missing or unexpected:
        raise ConfigError(f"train.init_from={str(source)!r} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")


@torch.no_grad()
def upcycle(model: nn.Module, model_cfg: ModelConfig, moe: MoEConfig, train: TrainConfig,
            dense_model: ModelConfig, dense_moe: MoEConfig, ckpt: Path) -> str:
    """Sparse upcycling (see the module docstring) of the dense model at `ckpt`, which the
    `dense_model` and `dense_moe` sections of its run's config build, into `model`."""
    if moe.shared_experts:
        raise ConfigError("train.init_from: upcycling a dense model into one with moe.shared_experts is not supported")
    if moe.expert_hidden != dense_model.ffn_hidden or model_cfg.activation != dense_model.activation:
        raise ConfigError(
            f"train.init_from: upcycling copies the dense FFN into every expert, so moe.expert_hidden "
            f"({moe.expert_hidden}) and model.activation ({model_cfg.activation}) must equal the dense model's "
            f"model.ffn_hidden ({dense_model.ffn_hidden}) and model.activation ({dense_model.activation})"
        )
    vocab = model.embed.weight.shape[0]
    dense = build_model(dense_model, dense_moe, vocab)  # only its weights are used, so its train.objective is moot
    checkpoint.load_model(ckpt, dense)
    ffn_prefixes = tuple(name + "." for name, m in model.named_modules() if isinstance(m, FFNSlot))
    outside = {k: v for k, v in dense.state_dict().items() if not k.startswith(ffn_prefixes)}
    _load_exactly(model, outside, ckpt, skip=ffn_prefixes)
    gen = torch.Generator().manual_seed(train.seed)
    copied = 0
    ours = [m for m in model.modules() if isinstance(m, FFNSlot)]
    theirs = [m for m in dense.modules() if isinstance(m, FFNSlot)]
    for slot, source in zip(ours, theirs):
        if not slot.is_moe:
            slot.inner.load_state_dict(source.inner.state_dict())
            continue
        experts = slot.inner.experts
        for name in ("w_up", "w_gate", "w_down"):
            w = getattr(source.inner, name)
            if w is None:
                continue
            target = getattr(experts, name)  # (E, in, out)
            if name == "w_down":  # the layer multiplies the routed output by routed_scale: undo it
                w = w / slot.inner.routed_scale
            target.copy_(w.unsqueeze(0).expand_as(target))
            if train.upcycle_noise:
                target.add_(torch.randn(target.shape, generator=gen).to(target.device) * train.upcycle_noise * w.std())
        copied += 1
    return f"upcycled the dense model {ckpt} into {copied} MoE layers of {moe.num_experts} experts each"


def parameter_kind(name: str) -> str:
    """`router` (an MoE layer's router, or the mixture head's gate), `experts` (routed experts) or
    `other`, by parameter name."""
    if is_router(name):
        return "router"
    return "experts" if ".experts." in name else "other"


def freeze(model: nn.Module, mode: str) -> int:
    """Stop gradients to the routers, the routed experts, or everything but the routed experts;
    returns the frozen count."""
    if mode == "none":
        return 0
    frozen = 0
    for name, p in model.named_parameters():
        kind = parameter_kind(name)
        if mode == kind or (mode == "all_but_experts" and kind != "experts"):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
