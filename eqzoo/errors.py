"""The errors eqzoo raises on purpose, in one place.

Every module raises these rather than defining its own, so that the command line can tell a
mistake in what was asked (exit status 2) from a damaged file or a failed upload (exit status 1),
and so that no two modules import each other only to share an exception class.
"""
from __future__ import annotations

__all__ = ["ConfigError", "ModelArgError", "UnknownModelArgError", "HubConfigError", "CheckpointError", "PushError", "TrainingError",
           "DataNotFoundError", "CliError", "USAGE_ERRORS", "FAILURES"]


class ConfigError(ValueError):
    """A run config key is unknown, has the wrong type or a value outside its accepted set."""


class ModelArgError(ValueError):
    """A model argument has the wrong type or is out of range. ``arg`` names it, ``problem`` says
    what is wrong (``str(e)`` is ``"{where}{arg} {problem}"``)."""

    def __init__(self, arg: str, problem: str, where: str = ""):
        self.arg, self.problem, self.where = arg, problem, where
        super().__init__(f"{where}{arg} {problem}")


class UnknownModelArgError(ModelArgError, TypeError):
    """A keyword the model does not take. Also a ``TypeError``, as Python's own for an unexpected
    keyword, which is what timm's model contract and callers that probe a constructor catch."""


class HubConfigError(ValueError):
    """config.json (or a model_args dict) is not one eqzoo can build from."""


class CheckpointError(RuntimeError):
    """A weight file is missing, truncated, corrupt, unsafe or made for other bases."""


class PushError(RuntimeError):
    """Uploading to the Hub failed (the local files are left as they were)."""


class TrainingError(RuntimeError):
    """A run cannot start or continue (existing run directory, nothing to resume, ...)."""


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where the config says; the message says how to get them."""


class CliError(Exception):
    """A usage mistake (a path that does not exist, a name that is no model): one line, exit 2."""


# What the command line reports in one line: mistakes in what was asked (exit 2) and other known
# failures (exit 1).
USAGE_ERRORS = (CliError, ConfigError, HubConfigError, ModelArgError, TrainingError, FileNotFoundError,
                FileExistsError)
FAILURES = (CheckpointError, PushError)
