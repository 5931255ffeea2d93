"""One small exception hierarchy, built on stdlib types.

Every error premoe raises on purpose says what is wrong (file, tensor, key),
what was expected versus found, and how to fix it. The CLI prints the message
on one line; ``PREMOE_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations


class PremoeError(Exception):
    """Base class: an error caused by the user's input or environment."""


class InputError(PremoeError, ValueError):
    """Bad argument, data file, or option combination."""


class MissingFileError(PremoeError, FileNotFoundError):
    """A file or directory the command needs does not exist."""


class UnsupportedModelError(PremoeError, TypeError):
    """The checkpoint is not a supported Mixture-of-Experts family."""


class CheckpointError(PremoeError, ValueError):
    """The checkpoint on disk is corrupt, incomplete, or not what the artefact expects."""


class PlanError(PremoeError, ValueError):
    """A pruning plan violates an architecture constraint."""


class OutputExistsError(PremoeError, FileExistsError):
    """The output path exists and ``--force`` was not given."""


class DiskSpaceError(PremoeError, OSError):
    """The output would not fit on its file system; checked before anything is written."""
