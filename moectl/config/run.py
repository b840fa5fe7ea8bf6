"""The run's own sections: where it lives (RunConfig), what it logs (LogConfig), and its
checkpoints (CheckpointConfig)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from .section import Section


class RunConfig(Section):
    """Where the run lives."""

    name: Optional[str] = Field(
        None, description="Run name; outputs go to `<run.dir>/<run.name>`. Defaults to the config file's stem."
    )
    dir: str = Field("runs", description="Parent directory of all run directories.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            raise ValueError("must be a plain directory name (no '/', not '.' or '..')")
        return name


class LogConfig(Section):
    """Console and TensorBoard logging."""

    every: int = Field(10, gt=0, description="Log scalars and routing statistics every this many steps (the window).")
    tensorboard: bool = Field(True, description="Write TensorBoard events to the run directory.")
    histograms: bool = Field(True, description="Log per-layer expert-assignment histograms.")
    collapse_threshold: float = Field(
        3.0, gt=1, description="Warn when a layer's max/mean expert load over a whole window exceeds this."
    )


class CheckpointConfig(Section):
    """Checkpoints in `<run>/checkpoints/step_NNNNNN/`."""

    every: int = Field(500, gt=0, description="Save every this many steps (and at the end, and on Ctrl-C).")
    keep_last: int = Field(3, gt=0, description="Keep only the newest this many checkpoints.")
    keep_best: bool = Field(
        False,
        description="Also save at each evaluation that lowers the best eval loss so far, keep that checkpoint whatever "
        "keep_last says, and point `checkpoints/best` at it (give it to eval, generate, export).",
    )
