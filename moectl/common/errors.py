"""User-facing errors.

Everything a user can cause (a bad config, a missing dataset, a corrupt checkpoint, a run
directory in the way) raises a `MoectlError` whose message is one line saying what is wrong
and how to fix it. The CLI prints that line and exits non-zero; anything else is a bug and
keeps its traceback under `--debug`.
"""


class MoectlError(Exception):
    """An error the user can fix; its message is shown without a traceback."""


class ConfigError(MoectlError):
    """The config file or a `--set` override is malformed, unknown or impossible."""


class DataError(MoectlError):
    """The dataset or tokenizer cannot be loaded or is unusable."""


class CheckpointError(MoectlError):
    """A checkpoint or run directory is missing, corrupt or in the way."""


class TrainingError(MoectlError):
    """Training cannot go on (e.g. the loss diverged); the last checkpoint is intact."""


class PeerFailed(MoectlError):
    """Another process of a multi-process run failed and reports its own error; this one stops quietly."""


class DistributedError(MoectlError):
    """A multi-process run lost a process: it failed, was killed, or a collective timed out."""
