"""Chat data for instruction tuning: one example as a list of turns, a chat template that renders
it, and the spans the loss counts.

An example is a list of {"role", "content"} turns (roles system, user, assistant) with at least
one assistant turn. It comes from a `messages` list, or from a prompt/response pair (one user
turn, one assistant turn), or from Alpaca-style instruction/input/output fields (the user turn is
the instruction, then a blank line and the input when there is one).

Templates are Jinja, as Hugging Face chat templates are, rendered in a sandbox with `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`. The built-in template:

    <|system|>\\n{content}<|endoftext|>     (when there is a system turn)
    <|user|>\\n{content}<|endoftext|>
    <|assistant|>\\n{content}<|endoftext|>

with the tokenizer's end-of-text token as eos (tokenizer.eot_token), so the model learns to stop
after an answer. The role markers are special tokens in a BPE that moectl trains; in another
tokenizer they are spelled out as text, which works the same, in more tokens.

What the loss counts: an assistant turn's text is what rendering the conversation up to and
including that turn adds to rendering it up to the turn before, with the generation prompt
(`<|assistant|>\\n` here). So the response is the turn's content and the end-of-text token after
it, and the prompt the model sees at training is exactly the one `moectl generate --chat` gives it.

A template of one's own (ChatML's `<|im_start|>` and `<|im_end|>`, Gemma's `<start_of_turn>` and
`<end_of_turn>`) brings markers of its own, found by rendering it on a probe conversation whose
contents are sentinels (Template.markers, Template.end_of_turn): a BPE that moectl trains for it
reserves them as special tokens, so each is one token, and generation stops at the end-of-turn
marker as it stops at the built-in template's end-of-text token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

TEMPLATE_FILE = "chat_template.jinja"  # in a run directory trained with data.task=sft
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
BUILTIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ALPACA = ("instruction", "input", "output")
# A template's marker: a tag in the text it renders around the contents, `<|...|>` or `<...>` with no
# space inside (`<|im_start|>`, `<end_of_turn>`, `</s>`), or `[...]` in capitals (Mistral's `[INST]`).
MARKER = re.compile(r"<\|[^<>|\s]+\|>|</?[A-Za-z_][^<>\s]*>|\[/?[A-Z_]+\]")


class ChatError(ValueError):
    """An example that cannot become a conversation, or a template that cannot render it; the
    message names the field, or `turn` says which turn (the caller adds the file and line)."""

    def __init__(self, message: str, turn: Optional[int] = None):
        super().__init__(message)
        self.turn = turn


@dataclass(frozen=True)
class Fields:
    """Where an example's parts are (the data.*_field keys)."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"

    def form(self, columns: list[str]) -> str:
        """Which input form a table with these columns holds: `messages`, `pair` or `alpaca`."""
        if self.messages in columns:
            return "messages"
        if self.prompt in columns and self.response in columns:
            return "pair"
        if ALPACA[0] in columns and ALPACA[2] in columns:
            return "alpaca"
        raise ChatError(
            f"the data has none of the instruction-tuning forms: a {self.messages!r} list (data.messages_field), "
            f"{self.prompt!r} and {self.response!r} fields (data.prompt_field, data.response_field), or Alpaca's "
            f"instruction/output; its columns are: {', '.join(columns)}"
        )


def _text(value: Any, field: str, required: bool = True) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ChatError(f"field {field!r} is {'missing' if value is None else 'empty'}")
        return ""
    if not isinstance(value, str):
        raise ChatError(f"field {field!r} holds {type(value).__name__}, not text")
    return value


def to_messages(row: dict, form: str, fields: Fields) -> list[dict[str, str]]:
    """One table row as a conversation; ChatError names the field that is missing or wrong."""
    if form == "pair":
        return [{"role": "user", "content": _text(row.get(fields.prompt), fields.prompt)},
                {"role": "assistant", "content": _text(row.get(fields.response), fields.response)}]
    if form == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = _text(row.get("input"), "input", required=False)
        return [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
                {"role": "assistant", "content": _text(row.get("output"), "output")}]
    turns = row.get(fields.messages)
    if not isinstance(turns, list) or not turns:
        raise ChatError(f"field {fields.messages!r} is {'empty' if isinstance(turns, list) else 'not a list of turns'}")
    out = []
    for i, turn in enumerate(turns):
        where = f"{fields.messages}[{i}]"
        if not isinstance(turn, dict):
            raise ChatError(f"field {where!r} is not a {{role, content}} turn")
        role = turn.get("role")
        if role not in ROLES:
            raise ChatError(f"field {where + '.role'!r} is {role!r}; a role is one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _text(turn.get("content"), f"{where}.content")})
    if not any(t["role"] == "assistant" for t in out):
        raise ChatError(f"field {fields.messages!r} has no assistant turn: there is nothing to learn to answer")
    return out


class Template:
    """A Jinja chat template in Hugging Face's conventions."""

    def __init__(self, source: str, eos_token: str, bos_token: str = "", name: str = "built-in"):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatError(f"the chat template ({name}) does not parse: {exc}") from None
        self.source, self.name = source, name
        self.eos_token, self.bos_token = eos_token, bos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         eos_token=self.eos_token, bos_token=self.bos_token)
        except (TemplateError, TypeError, ValueError) as exc:  # raise_exception, or a template bug
            turn = next((k for k in range(1, len(messages)) if not self._renders(messages[:k])), len(messages)) - 1
            role = f" ({messages[turn]['role']})" if messages else ""
            raise ChatError(f"the chat template ({self.name}) cannot render turn {turn}{role}: {exc}", turn) from None

    def _renders(self, messages: list[dict[str, str]]) -> bool:
        try:
            self._template.render(messages=messages, add_generation_prompt=False, eos_token=self.eos_token,
                                  bos_token=self.bos_token)
            return True
        except Exception:
            return False

    def pieces(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, counts in the loss) pieces: each
        assistant turn (its content and what the template closes it with) counts, the rest not."""
        out, done = [], ""
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ChatError(
                    f"the chat template ({self.name}) renders turn {i} so that the conversation before it is not a "
                    "prefix of the conversation with it; the response tokens cannot be told apart", i
                )
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self.render(messages)[len(done):]
        if rest:
            out.append((rest, False))
        return [(text, counts) for text, counts in out if text]

    def _probe(self, roles: tuple[str, ...], add_generation_prompt: bool = False) -> tuple[str, list[str]]:
        """The template rendered on turns of these roles whose contents are sentinels (words no
        template writes itself, with no space a template might trim), and the sentinels; ("", [])
        when it refuses the conversation (Gemma's refuses a system turn)."""
        contents = [f"moectlProbe{i}{role}" for i, role in enumerate(roles)]
        try:
            text = self.render([{"role": r, "content": c} for r, c in zip(roles, contents)], add_generation_prompt)
        except ChatError:
            return "", []
        return text, contents

    def end_of_turn(self) -> Optional[str]:
        """The marker that closes an assistant turn, which the model learns to write (pieces()
        counts it) and generation stops at. Rule: render a user turn and an assistant turn with
        sentinel contents; what the template writes after the assistant's content, less the
        whitespace around it, is the closing text; the marker is its first tag when it starts with
        one (`<|im_end|>` of `<|im_end|>\\n`, `<|end|>` of `<|end|>\\n<|endoftext|>`), else its first
        line. None when the template closes the turn with nothing but whitespace, or does not
        write the content as given."""
        text, contents = self._probe(("user", "assistant"))
        at = text.rfind(contents[-1]) if contents else -1
        closing = text[at + len(contents[-1]):].strip() if at >= 0 else ""
        if not closing:
            return None
        tag = MARKER.match(closing)
        return tag.group(0) if tag else closing.splitlines()[0].strip()

    def markers(self) -> tuple[str, ...]:
        """Every tag (MARKER) the template writes around the contents of a probe conversation (user
        and assistant turns, twice; a system turn first when the template takes one; the generation
        prompt), its eos and bos among them, in the order they first appear."""
        found: list[str] = []
        for roles, prompt in ((("user", "assistant", "user", "assistant"), False), (("system", "user", "assistant"), False),
                              (("user",), True)):
            text, contents = self._probe(roles, prompt)
            for content in contents:
                text = text.replace(content, "\n")  # a tag never spans a content
            found += MARKER.findall(text)
        return tuple(dict.fromkeys(found))


def turn_field(form: str, fields: Fields, turn: int) -> str:
    """The field a conversation's turn came from (to_messages' inverse)."""
    if form == "messages":
        return f"{fields.messages}[{turn}]"
    if form == "pair":
        return fields.prompt if turn == 0 else fields.response
    return "instruction" if turn == 0 else "output"


def template_source(value: Optional[str], tokenizer_template: Optional[str]) -> tuple[str, str]:
    """(Jinja source, its name) for data.chat_template: null takes the tokenizer's own template
    when it has one, else the built-in; `builtin`; a path to a file; or the template itself."""
    from pathlib import Path

    if value is None:
        return (tokenizer_template, "the tokenizer's") if tokenizer_template else (BUILTIN_TEMPLATE, "built-in")
    if value == "builtin":
        return BUILTIN_TEMPLATE, "built-in"
    if "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ChatError(f"data.chat_template={value!r}: no such file, and not a Jinja template either")
        return path.read_text(encoding="utf-8"), str(path)
    return value, "data.chat_template"
