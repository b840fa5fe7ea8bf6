"""`moectl generate`: sample text from a trained model, optionally showing which expert each
new token was routed to in one MoE layer.

Each step runs the model on the last data.seq_len tokens (the context it was trained on) and
samples the next token from softmax(logits / temperature), restricted to the top-k tokens and
to the smallest set whose probability reaches top-p. Temperature 0 is greedy. A seeded
generator makes sampling reproducible. Generation stops at the end-of-text token and, when it
answers a chat turn, at the chat template's end-of-turn marker (chat.Template.end_of_turn): as a
token when the tokenizer has it as one, else where the text spells it, cut off the answer. `show`
prints the text, each new token coloured by its top-1 expert in the chosen layer. Expert-choice
models are refused: their routing compares a token with later ones, which generation has not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from moectl.common import console
from moectl.common.errors import ConfigError
from moectl.data import chat
from moectl.services.loaded_model import LoadedModel, check_layer


@dataclass
class Generation:
    prompt: str
    pieces: list[str] = field(default_factory=list)  # the text each new token added
    token_ids: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)  # top-1 expert per new token in the shown layer
    expert_calls: int = 0  # with dynamic skipping: the routers' choices for the new tokens, over all MoE layers
    calls_skipped: int = 0  # and how many of them skipping left out

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """(V,) logits with everything outside the top-k and the top-p nucleus set to -inf."""
    out = logits.clone()
    if top_k is not None and top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        out[order[drop]] = float("-inf")
    return out


def token_pieces(tok, ids: list[int]) -> list[str]:
    """The text each token adds, such that the pieces join to decode(ids). A character split over
    several byte-level tokens belongs to the token that completes it."""
    pieces: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1])
        common = len(os.path.commonprefix([prev, cur]))
        excess = len(prev) - common  # a partial character shown as U+FFFD, now completed
        j = len(pieces) - 1
        while excess > 0 and j >= 0:
            cut = min(excess, len(pieces[j]))
            pieces[j] = pieces[j][: len(pieces[j]) - cut]
            excess, j = excess - cut, j - 1
        pieces.append(cur[common:])
        prev = cur
    return pieces


@torch.no_grad()
def check_sampling(loaded: LoadedModel, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse sampling settings out of range, and a model that cannot generate token by token."""
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be >= 0 (0 is greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: must be in (0, 1]")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1")
    if loaded.cfg.model.is_moe and loaded.cfg.moe.router == "expert_choice":
        raise ConfigError(
            "moe.router=expert_choice routes each token by comparing it with the whole batch, later positions "
            "included, so token-by-token generation cannot route as the model was trained; measure it with moectl eval"
        )


def generate(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    show_layer: Optional[int] = None,
    chat_turn: Optional[bool] = None,
) -> Generation:
    """`chat_turn`: send the prompt as a user turn in the run's chat template, which generation
    answers (None: when the run was instruction-tuned, data.task=sft)."""
    check_sampling(loaded, temperature, top_k, top_p)
    loaded.warn_about_lookahead()
    record_index = check_layer(loaded, show_layer) if show_layer is not None else None
    tok, cfg = loaded.tokenizer, loaded.cfg
    eot = tok.token_to_id(cfg.tokenizer.eot_token)
    text, marker = chat_prompt(loaded, prompt, chat_turn)
    marker_id = tok.token_to_id(marker) if marker is not None else None
    spelled = marker if marker is not None and marker_id is None else None  # a marker the model writes in pieces
    ids = tok.encode(text, add_special_tokens=False).ids if text else []
    if not ids:
        if eot is None:
            raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eot]
    start = len(ids)
    gen = torch.Generator().manual_seed(seed)
    result = Generation(prompt=prompt)

    def forward():
        out = loaded.model(torch.tensor([ids[-cfg.data.seq_len :]], device=loaded.device))  # (1, T)
        for r in out.routing:
            if r.skipped is not None:  # the newest token's choices: computed, dropped or skipped
                result.calls_skipped += int(r.skipped[-1].sum())
                result.expert_calls += int((r.chosen[-1] | r.skipped[-1]).sum())
        if record_index is not None and len(ids) > start:
            # The newest token's own routing: the expert with the largest gate weight for it.
            result.experts.append(int(out.routing[record_index].dense_weights()[-1].argmax()))
        return out.logits[0, -1].float().cpu()  # (V,)

    for _ in range(max_new_tokens):
        logits = forward()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == eot or nxt == marker_id:
            break
        ids.append(nxt)
        result.token_ids.append(nxt)
        if spelled and spelled in tok.decode(result.token_ids):  # the text the pieces will join to
            break
    if record_index is not None and len(ids) > start:
        forward()  # route the last new token too
    result.pieces = token_pieces(tok, result.token_ids)
    if spelled:
        cut_at(result, spelled)
    return result


def cut_at(result: Generation, marker: str) -> None:
    """Drop the marker and what follows it from the new text: the tokens after the one where it
    starts, and that token's share of it."""
    at = result.text.find(marker)
    if at < 0:
        return
    start = 0
    for j, piece in enumerate(result.pieces):
        if start + len(piece) > at:
            break
        start += len(piece)
    kept = j + 1 if at > start else j  # the token where the marker starts keeps the text before it
    result.pieces = result.pieces[:kept]
    if at > start:
        result.pieces[-1] = result.pieces[-1][: at - start]
    result.token_ids, result.experts = result.token_ids[:kept], result.experts[:kept]


def chat_prompt(loaded: LoadedModel, prompt: str, chat_turn: Optional[bool]) -> tuple[str, Optional[str]]:
    """(the text the model continues, the marker its answer ends with): the prompt itself and
    None, or the prompt as a user turn rendered in the chat template the run was tuned with (which
    the run directory and an export keep), up to where the assistant's answer begins, and the
    template's end-of-turn marker."""
    path = loaded.run_dir / chat.TEMPLATE_FILE
    if chat_turn is False or (chat_turn is None and not path.is_file()):
        return prompt, None
    if not path.is_file():
        raise ConfigError(f"--chat: {loaded.run_dir} was not instruction-tuned (it has no {chat.TEMPLATE_FILE}); drop --chat")
    if not prompt:
        raise ConfigError("--chat needs a --prompt to answer")
    try:
        template = chat.Template(path.read_text(encoding="utf-8"), loaded.cfg.tokenizer.eot_token, name=str(path))
        return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True), template.end_of_turn()
    except chat.ChatError as exc:
        raise ConfigError(str(exc)) from None


# Distinct colours for experts; beyond the list, xterm-256 colours.
EXPERT_COLOURS = ("red", "green", "blue", "magenta", "cyan", "yellow", "bright_red", "bright_green",
                  "bright_blue", "bright_magenta", "bright_cyan", "orange3", "purple", "turquoise2", "gold1", "deep_pink2")


def expert_colour(expert: int) -> str:
    return EXPERT_COLOURS[expert] if expert < len(EXPERT_COLOURS) else f"color({16 + (expert * 37) % 216})"


def show(result: Generation, loaded: LoadedModel, layer: Optional[int]) -> None:
    """The prompt, then the new text, coloured by expert when asked, and a legend. The text is
    printed as it is, ending in a newline: soft_wrap leaves its lines to the terminal, where rich
    would otherwise break them at the console's width (80 columns when piped)."""
    from rich.text import Text

    text = Text(result.prompt, style="dim")
    if layer is None:
        text.append(result.text)
        console.out.print(text, soft_wrap=True)
        _say_skipped(result)
        return
    for piece, expert in zip(result.pieces, result.experts):
        text.append(piece, style=f"bold {expert_colour(expert)}")
    console.out.print(text, soft_wrap=True)
    _say_skipped(result)
    legend = Text(f"layer {layer:02d}, top-1 expert of each new token: ")
    used = sorted(set(result.experts))
    for e in range(loaded.experts[check_layer(loaded, layer)]):
        legend.append(f" {e} ", style=f"reverse {expert_colour(e)}" if e in used else "dim")
    console.out.print(legend)


def _say_skipped(result: Generation) -> None:
    if result.expert_calls:
        console.status(f"dynamic skipping left out {result.calls_skipped} of {result.expert_calls} expert calls "
                       f"({100 * result.calls_skipped / result.expert_calls:.1f}%) for the new tokens")
