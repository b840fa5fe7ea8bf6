"""The text a run reads: the `data` section (DataConfig) and the `tokenizer` section
(TokenizerConfig), each with the rules that involve only its own keys."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from .section import Section


class DataConfig(Section):
    """Training text: a Hub dataset, local files, a `save_to_disk` directory, or the built-in corpus."""

    source: Literal["stdlib", "hub", "files", "disk"] = Field(
        "stdlib",
        description="`stdlib`: this Python's own standard-library sources (offline). `hub`: datasets.load_dataset(name). "
        "`files`: local files. `disk`: a save_to_disk directory.",
    )
    name: Optional[str] = Field(None, description="hub: dataset name, e.g. `wikitext` or `user/dataset`.")
    config_name: Optional[str] = Field(None, description="hub: dataset config, e.g. `wikitext-103-raw-v1`.")
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = Field(
        None, description="files: a path or glob, a list of them, or a mapping split -> paths."
    )
    format: Optional[Literal["text", "json", "csv", "parquet"]] = Field(
        None, description="files: the datasets builder. Null: inferred from the file extension."
    )
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "line",
        description="files with format text: one example per line, paragraph or whole file. A carved validation "
        "split holds out examples, so with `line` it shares files with training; prefer `document` for many files.",
    )
    path: Optional[str] = Field(None, description="disk: the directory written by `save_to_disk`.")
    text_column: str = Field("text", description="Column that holds the text.")
    train_split: str = Field("train", description="Split to train on.")
    validation_split: Optional[str] = Field(
        None,
        description="Split to validate on. Null: the dataset's `validation` split if it has one, "
        "else data.validation_fraction of the training documents, carved off with data.split_seed.",
    )
    validation_fraction: float = Field(
        0.05, gt=0, lt=1, description="Fraction of training documents held out when validation_split is null."
    )
    split_seed: int = Field(0, description="Seed of the held-out carve.")
    seq_len: int = Field(256, gt=0, description="Tokens per training sequence (block).")
    task: Literal["lm", "sft"] = Field(
        "lm",
        description="`lm`: language modelling, every token of the text is a target. `sft`: instruction tuning on "
        "conversations (data.messages_field, data.prompt_field / data.response_field, or Alpaca's "
        "instruction / input / output); only response tokens are targets, in training and evaluation. With "
        "data.source=stdlib the examples are the standard library's function signatures and docstrings.",
    )
    prompt_field: str = Field("prompt", description="sft: the field that holds the prompt (the user turn).")
    response_field: str = Field("response", description="sft: the field that holds the response (the assistant turn).")
    messages_field: str = Field(
        "messages", description="sft: the field that holds a list of {role, content} turns (system, user, assistant)."
    )
    chat_template: Optional[str] = Field(
        None,
        description="sft: the Jinja chat template (Hugging Face conventions), as text or a file path; `builtin`: "
        "`<|role|>\\n{content}<|endoftext|>` per turn. Null: the tokenizer's own template when it has one "
        "(a Hub or Mixtral tokenizer), else the built-in.",
    )
    packing: bool = Field(
        False,
        description="sft: put several whole examples in each sequence, attention (and the LSTM's state) confined "
        "to each, instead of one padded example per sequence.",
    )
    num_proc: Optional[int] = Field(None, gt=0, description="Processes for tokenisation (datasets.map). Null: one.")
    cache_dir: Optional[str] = Field(
        None, description="Cache for tokenizers and tokenised data. Null: $MOECTL_CACHE or ~/.cache/moectl."
    )

    # Rules on these keys alone. Config's validator calls them, each at its place in the order of
    # all the checks (see root.py), so a config with several errors keeps reporting the same one.

    def check_validation_split(self) -> None:
        if self.validation_split is not None and self.validation_split == self.train_split:
            raise ValueError(
                f"data.validation_split={self.validation_split!r} is the training split; validate on held-out data"
            )

    def check_sft_options(self) -> None:
        """Options only instruction tuning reads."""
        if self.task != "sft" and (self.packing or self.chat_template is not None):
            key = "packing" if self.packing else "chat_template"
            raise ValueError(f"data.{key} is for instruction tuning; set data.task=sft, or drop data.{key}")

    def check_source(self) -> None:
        """Each data.source has the key it reads, and no key another source reads."""
        needs = {"hub": "name", "files": "data_files", "disk": "path"}
        if self.source in needs and getattr(self, needs[self.source]) in (None, [], {}, ""):
            raise ValueError(f"data.{needs[self.source]} is required when data.source={self.source}")
        for key, source in (("name", "hub"), ("config_name", "hub"), ("data_files", "files"), ("path", "disk")):
            if getattr(self, key) is not None and self.source != source:
                raise ValueError(f"data.{key} is only used with data.source={source}, but data.source={self.source}")


class TokenizerConfig(Section):
    """Train a byte-level BPE on the training split, or load one."""

    path: Optional[str] = Field(None, description="Load this tokenizer.json instead of training one.")
    name: Optional[str] = Field(None, description="Load this Hub tokenizer (e.g. `gpt2`) instead of training one.")
    vocab_size: Union[Annotated[int, Field(ge=260)], Literal["auto"]] = Field(
        4096,
        description="Vocabulary size of a trained BPE, or `auto`: 16384 * (training MB)^(1/4), a multiple of 256 in "
        "[1024, 65536] (1 MB: 16k, 16 MB: 32k, 256 MB: 64k). Larger vocabularies pay off as the corpus grows; small "
        "models on small corpora spend much of their compute on the softmax (docs/quality.md).",
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_chars: Optional[int] = Field(
        None, gt=0, description="Train the BPE on at most this many characters of the training split. Null: all."
    )
    eot_token: str = Field("<|endoftext|>", description="End-of-text token placed between documents.")


    def check_one_source(self) -> None:
        """Config's validator calls it at its place in the order of all the checks (see root.py)."""
        if self.path is not None and self.name is not None:
            raise ValueError("tokenizer.path and tokenizer.name are both set; set at most one")
