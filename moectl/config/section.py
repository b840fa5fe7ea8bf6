"""`Section`: the pydantic base class every config section (and the root `Config`) derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # coerce_numbers_to_str: `run.name: 2024` is a name, not a type error.
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        validate_assignment=True,
        coerce_numbers_to_str=True,
        allow_inf_nan=False,
    )
