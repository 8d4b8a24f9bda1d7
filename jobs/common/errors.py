"""One base class for every error that is the user's to fix (a config key, a model reference, a
problem file, a dataset folder): the CLI prints its message and exits with code 2. Anything else
is cotd's fault and keeps its traceback."""

from __future__ import annotations


class CotdError(ValueError):
    """A problem with the user's input, already phrased for them (what, where, what to do)."""


class DataError(CotdError):
    """A dataset folder a stage reads is missing, empty, unreadable or of another kind."""
