"""`moectl export`: ship a trained model as a directory, in one of two formats.

`--format safetensors`: a self-contained bundle that eval, route-stats, generate and
train.init_from accept as they accept a run:

    DIR/model.safetensors   the weights, in fp32, bf16 or fp16 (a LoRA run's: its base, routers as trained)
    DIR/adapter.safetensors a LoRA run's adapters (unless --merge-lora folds them into the weights)
    DIR/config.yaml         the resolved config
    DIR/tokenizer.json      the tokenizer
    DIR/chat_template.jinja the chat template, for an instruction-tuned run (data.task=sft)
    DIR/meta.json           what it is: format, source checkpoint, step, dtype, eval loss, versions, and for a
                            model derived from the checkpoint (moectl prune) how (`derived`)
    DIR/README.md           a model card: architecture, parameters, data, quality, routing summary

`--format hf`: a Mixtral or Qwen2-MoE directory that transformers' `AutoModelForCausalLM` and
`AutoTokenizer` load as-is (the mapping is moectl/services/hf.py); an instruction-tuned run's chat
template becomes the tokenizer's, for apply_chat_template. A LoRA run's adapters go in
DIR/adapter/, in PEFT's format, for PeftModel.from_pretrained on top (unless --merge-lora folds
them in). Its README.md is the same model card, with transformers' metadata header and how to
load it there. It is loaded in transformers and its
logits are checked against moectl's before it is put in place. moectl's own commands refuse it
(checkpoint.resolve says what to give them instead).

Either is written into a hidden temporary directory beside DIR and renamed into place, so DIR
is complete or absent; an existing DIR is replaced only when it is itself a moectl export and
`overwrite` is set.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from moectl import __version__, config
from moectl.commands.evaluate import run as evaluate_run
from moectl.common import console
from moectl.common.errors import CheckpointError, ConfigError, DataError, MoectlError
from moectl.common.fileio import staged_directory
from moectl.common.stats import COLUMNS, perplexity
from moectl.data import chat
from moectl.models import lora, parameter_counts
from moectl.services import checkpoint, hf
from moectl.services.loaded_model import LoadedModel

FORMATS = checkpoint.BUNDLE_FORMATS  # meta.json "format", by --format
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEFT_DIR = "adapter"  # a LoRA run's adapters in an hf export: apart, so from_pretrained loads the base alone


def is_bundle(path: Path) -> bool:
    """Whether `path` holds a moectl export (of either format): only those are ever replaced."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("format") in FORMATS.values()
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"--out {out} is not empty; choose another directory, or pass --overwrite to replace a bundle")
        if not is_bundle(out):
            raise CheckpointError(f"--overwrite: {out} is not a moectl bundle (no meta.json of one); refusing to replace it")


def _export_meta(loaded: LoadedModel, fmt: str, dtype: str, **measured) -> dict:
    source = checkpoint.read_meta(loaded.checkpoint)
    fields = dict(format=FORMATS[fmt], source_checkpoint=str(loaded.checkpoint), step=loaded.step, dtype=dtype,
                  tokens_seen=source.get("tokens_seen", 0), eval_loss=source.get("eval_loss"))
    return checkpoint.metadata(loaded.cfg, **{**fields, **measured})


def _cast_copy(loaded: LoadedModel, dtype: str) -> torch.nn.Module:
    """The model with its weights rounded to `dtype` (the loaded model itself for fp32)."""
    return loaded.model if dtype == "fp32" else copy.deepcopy(loaded.model).to(DTYPES[dtype])


# ------------------------------------------------------------------------------ safetensors bundle


def model_card(loaded: LoadedModel, meta: dict, eval_summary: Optional[dict], note: Optional[str],
               derived: Optional[list[dict]] = None, fmt: str = "safetensors") -> str:
    """The README.md of an export of either format: what the model is, what it was trained on and
    how well it does, where it came from, and how to use it (`fmt`: with moectl, or transformers)."""
    cfg, m = loaded.cfg, loaded.cfg.model
    total, active = parameter_counts(loaded.model)
    lines = []
    stored = ""
    if fmt == "hf":
        arch = hf.architecture(cfg.moe)
        lines += ["---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [moe, {arch}, moectl]",
                  "---", ""]
        stored = f", stored as a transformers {hf.NAMES[arch]} model (`{hf.CLASSES[arch]}`)"
    lines += [
        f"# {loaded.run_dir.name}",
        "",
        f"A {m.arch} language model trained with {_made_by(loaded)}, exported from `{loaded.checkpoint}` "
        f"(step {loaded.step}){stored}.",
        "",
        "## Architecture",
        "",
        f"- {m.arch}: {m.n_layers} layers, d_model {m.d_model}, activation {m.activation}, vocabulary {loaded.tokenizer.get_vocab_size()}",
        f"- parameters: {total:,} total, {active:,} active per token",
    ]
    if cfg.model.is_moe:
        moe = cfg.moe
        lines.append(
            f"- MoE: {moe.num_experts} experts of hidden {cfg.moe.expert_hidden}, router `{moe.router}`, top-{moe.top_k}, "
            f"every {moe.every} FFN slot(s), {moe.shared_experts} shared expert(s), capacity factor "
            f"{moe.capacity_factor if moe.capacity_factor is not None else 'none (dropless)'}"
        )
    if loaded.adapters:
        trained = sum(t.numel() for t in lora.trained_state(loaded.model, cfg.train.lora.targets or []).values())
        where = ("`adapter/` in PEFT's format" if fmt == "hf" else f"`{checkpoint.ADAPTER}` beside the base's weights")
        lines.append(f"- {loaded.adapters.split(', over the base')[0]}: {trained:,} trained parameters, in {where}")
    lines += _data_section(loaded, meta) + ["", "## Quality", ""]
    if meta.get("eval_loss") is not None:
        loss = meta["eval_loss"]
        lines.append(f"Validation loss: {loss:.4f} nats/token (perplexity {perplexity(loss):.2f}).")
    if eval_summary is not None:
        lines.append(f"Bits per byte on the validation split: {eval_summary['bits_per_byte']:.4f}.")
    if eval_summary is not None and eval_summary["layers"]:
        lines += ["", "## Routing", "", "| layer | " + " | ".join(c.label for c in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for s in eval_summary["layers"]:
            lines.append(f"| {s['slot']} | " + " | ".join(c.format(s[c.name]) for c in COLUMNS) + " |")
    if note:
        lines += ["", note]
    if derived:
        lines += ["", "## How it was derived from the trained model", ""]
        for n, step in enumerate(derived, 1):  # in the order they were done
            lines += [f"{n}. {step['summary']}"]
            lines += [f"   - {key.replace('_', ' ')}: {value}" for key, value in step.items()
                      if key not in ("summary", "kind") and not isinstance(value, list)]
            for key, rows in ((k, v) for k, v in step.items() if isinstance(v, list)):  # per MoE layer
                lines += [f"   - {key.replace('_', ' ')}, per MoE layer:"]
                lines += [f"     - layer {slot}: {row}" for slot, row in zip(loaded.slots, rows)]
    lines += ["", "## Use", ""] + (_use_in_transformers(loaded) if fmt == "hf" else _use_in_moectl())
    return "\n".join(lines + [""])


def _data_section(loaded: LoadedModel, meta: dict) -> list[str]:
    """The card's "Training data": the source, the task, how much was seen, where it started from."""
    d, tr = loaded.cfg.data, loaded.cfg.train
    source = {"hub": f"Hugging Face dataset `{d.name}` ({d.config_name or 'default'})", "files": f"Local files `{d.data_files}`",
              "disk": f"A saved dataset at `{d.path}`", "stdlib": "The Python standard library's sources"}[d.source]
    what = ("instruction-tuned (data.task=sft) on its conversations, the loss on the responses only" if d.task == "sft"
            else f"text column `{d.text_column}`")
    lines = ["", "## Training data", "", f"{source}, {what}, blocks of {d.seq_len} tokens; {loaded.step} steps of "
             f"{tr.batch_size} sequences, {meta.get('tokens_seen', 0):,} tokens seen."]
    if tr.init_from:
        lines += ["", f"Training started from the weights of `{tr.init_from}` (train.init_from)."]
    return lines


def _made_by(loaded: LoadedModel) -> str:
    """`moectl 0.x (commit abc123..., with uncommitted changes)`: the code that trained the
    checkpoint, as its meta.json recorded it."""
    trained = checkpoint.read_meta(loaded.checkpoint)
    source = trained.get("source") if isinstance(trained.get("source"), dict) else {}
    made = f"moectl {source.get('version') or trained.get('moectl_version') or __version__}"
    if source.get("commit"):
        made += f" (commit {source['commit'][:12]}{', with uncommitted changes' if source.get('modified') else ''})"
    return made


def _use_in_moectl() -> list[str]:
    return ["```bash", "moectl eval THIS_DIRECTORY", "moectl route-stats THIS_DIRECTORY",
            'moectl generate THIS_DIRECTORY --prompt "..."', "```"]


def _use_in_transformers(loaded: LoadedModel) -> list[str]:
    chat_tuned = (loaded.run_dir / chat.TEMPLATE_FILE).is_file()
    prompt = (['messages = [{"role": "user", "content": "..."}]',
               "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)"]
              if chat_tuned else ['text = "..."'])
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
        *(['model = PeftModel.from_pretrained(model, "THIS_DIRECTORY/adapter")  # from peft import PeftModel']
          if loaded.adapters else []),
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
        *prompt,
        'ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=50, do_sample=True, temperature=0.8)",
        "print(tokenizer.decode(out[0, ids.shape[1]:]))",
        "```",
        "",
        f"It was trained on blocks of {loaded.cfg.data.seq_len} tokens (max_position_embeddings): keep the prompt and "
        "the new tokens within that." + (" The tokenizer carries the chat template it was tuned with." if chat_tuned else ""),
        "",
        "moectl's own commands (eval, route-stats, generate) read the run this came from, or a safetensors bundle "
        "of it (`moectl export --format safetensors`), not this directory.",
    ]


def export_bundle(loaded: LoadedModel, out: Path, dtype: str = "fp32", overwrite: bool = False,
                  derived: Optional[dict] = None, weights: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the safetensors bundle (see the module docstring); returns its directory. `derived`:
    for a model made from the checkpoint (moectl prune), how: a dict with a one-line `summary`,
    appended to what the loaded model already went through, for meta.json and the card.
    `weights`: writes model.safetensors itself (moectl quantize), instead of `loaded.model` in `dtype`."""
    from safetensors.torch import save_file, save_model

    out = Path(out)
    check_target(out, overwrite)
    derived = loaded.derived + ([derived] if derived else [])  # a bundle keeps its history through re-exports
    try:  # the card's routing summary and bits per byte, from the run's own validation data
        summary, note = evaluate_run(loaded).to_dict(), None
    except DataError as exc:
        summary, note = None, f"(No routing summary: the validation data could not be read at export: {exc})"
    with staged_directory(out) as tmp:
        # A cast copy keeps the source model exact (and its tied weights tied, stored once).
        if weights is not None:
            weights(tmp / "model.safetensors")
        else:
            stored = _cast_copy(loaded, dtype)
            with lora.detached(stored):  # a LoRA run: the base here, its adapters beside it
                save_model(stored, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(loaded.step)})
            if lora.adapted(stored):
                trained = lora.trained_state(stored, loaded.cfg.train.lora.targets or [])
                save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp / checkpoint.ADAPTER))
        config.save(loaded.cfg, tmp / "config.yaml")
        shutil.copyfile(loaded.run_dir / "tokenizer.json", tmp / "tokenizer.json")
        if (loaded.run_dir / chat.TEMPLATE_FILE).is_file():  # an instruction-tuned run's template goes with it
            shutil.copyfile(loaded.run_dir / chat.TEMPLATE_FILE, tmp / chat.TEMPLATE_FILE)
        measured = {"eval_loss": summary["loss"], "bits_per_byte": summary["bits_per_byte"]} if summary else {}
        meta = _export_meta(loaded, "safetensors", dtype, **measured, **({"derived": derived} if derived else {}))
        checkpoint.write_meta(tmp, meta)
        (tmp / "README.md").write_text(model_card(loaded, meta, summary, note, derived))
    return out


def merge_lora(loaded: LoadedModel) -> None:
    """`--merge-lora`: fold a LoRA run's adapters into its weights, in place; the config then trains
    no LoRA and the card says what was merged."""
    lora_cfg = loaded.cfg.train.lora
    if not lora.adapted(loaded.model):
        raise ConfigError(f"--merge-lora: {loaded.checkpoint} holds no LoRA adapters (merged already, or trained "
                          "without train.lora); export it without --merge-lora")
    untie = "head" in (lora_cfg.targets or []) and loaded.cfg.model.tie_embeddings  # the head's adapter unties it
    lora.merge(loaded.model)
    loaded.derived.append({
        "kind": "merge_lora",
        "summary": f"LoRA adapters (rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, on {', '.join(lora_cfg.targets or [])}) "
                   "merged into the weights they adapt",
    })
    untied = {"model.tie_embeddings": False} if untie else {}
    loaded.cfg = config.with_values(loaded.cfg, "--merge-lora", **{"train.lora": {}, **untied})


# ------------------------------------------------------------------------------ transformers


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise MoectlError(
            "--format hf needs Hugging Face transformers: pip install 'moectl[hf]' (or pip install transformers)"
        ) from None
    transformers.utils.logging.set_verbosity_error()  # its load bars and notices; moectl reports the outcome
    transformers.utils.logging.disable_progress_bar()
    return transformers


def export_hf(loaded: LoadedModel, out: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the transformers directory atomically, after checking in transformers that its
    logits equal moectl's (to 1e-4, with the weights as stored)."""
    from safetensors.torch import save_file

    reason = hf.refusal(loaded.cfg.model, loaded.cfg.moe)
    if reason:
        raise ConfigError(f"cannot export to transformers: {reason}")
    transformers = _require_transformers()
    out = Path(out)
    check_target(out, overwrite)
    eot = loaded.tokenizer.token_to_id(loaded.cfg.tokenizer.eot_token)
    with staged_directory(out) as tmp:
        hf_config = hf.hf_config(loaded.cfg.model, loaded.cfg.moe, loaded.tokenizer.get_vocab_size(), eot,
                                 seq_len=loaded.cfg.data.seq_len)
        setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", DTYPES[dtype])
        hf_config.save_pretrained(tmp)
        stored = _cast_copy(loaded, dtype)
        with lora.detached(stored):  # a LoRA run: the base here, its adapters in adapter/
            tensors = hf.to_transformers(loaded.cfg.model, loaded.cfg.moe, stored.state_dict())
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if lora.adapted(stored):
            _write_peft_adapter(loaded, stored, tmp / PEFT_DIR, out)
        eot_token = loaded.cfg.tokenizer.eot_token if eot is not None else None
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer, eos_token=eot_token, pad_token=eot_token)
        if (loaded.run_dir / chat.TEMPLATE_FILE).is_file():  # apply_chat_template renders as the run trained
            fast.chat_template = (loaded.run_dir / chat.TEMPLATE_FILE).read_text(encoding="utf-8")
        fast.save_pretrained(tmp)
        transformers.GenerationConfig(eos_token_id=eot, pad_token_id=eot).save_pretrained(tmp)
        meta = _export_meta(loaded, "hf", dtype)
        checkpoint.write_meta(tmp, meta)
        (tmp / "README.md").write_text(model_card(loaded, meta, None, None, loaded.derived, fmt="hf"))
        with console.progress("checking the export's logits in transformers", None):
            with lora.detached(stored):
                diff = max_logit_difference(loaded, stored.float(), tmp)
            if lora.adapted(stored) and _peft_available():
                diff = max(diff, max_logit_difference(loaded, stored.float(), tmp, adapter=tmp / PEFT_DIR))
        if diff > 1e-4:
            raise MoectlError(
                f"export check failed: transformers' logits differ from moectl's by {diff:.3g}; nothing was written "
                "(please report this as a bug)"
            )
    return out


def _write_peft_adapter(loaded: LoadedModel, stored: torch.nn.Module, directory: Path, out: Path) -> None:
    """A LoRA run's adapters in PEFT's format (adapter_config.json, adapter_model.safetensors), for
    PeftModel.from_pretrained on the exported model (hf.to_peft has the mapping)."""
    from safetensors.torch import save_file

    cfg = loaded.cfg
    tensors, adapter_config = hf.to_peft(cfg.model, cfg.moe, cfg.train.lora,
                                         lora.trained_state(stored, cfg.train.lora.targets or []))
    adapter_config["base_model_name_or_path"] = str(Path(out).resolve())
    directory.mkdir()
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


def _peft_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        console.warn("peft is not installed, so the exported adapter was not checked in PEFT (pip install peft)")
        return False
    return True


@torch.no_grad()
def max_logit_difference(loaded: LoadedModel, model: torch.nn.Module, hf_dir: Path, length: int = 32,
                         adapter: Optional[Path] = None) -> float:
    """Max |logit difference| between `model` (moectl) and the transformers directory (with the PEFT
    `adapter` on it, when given) on one random sequence, both in fp32."""
    from transformers import AutoModelForCausalLM

    theirs_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if adapter is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # PEFT says rank_pattern keys of target_parameters match nothing, then uses them
            warnings.simplefilter("ignore")
            theirs_model = PeftModel.from_pretrained(theirs_model, str(adapter)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.tokenizer.get_vocab_size(), (1, min(length, loaded.cfg.data.seq_len)), generator=g)
    ours = model(ids.to(loaded.device)).logits.float().cpu()
    theirs = theirs_model(ids).logits.float()
    return float((ours - theirs).abs().max())
