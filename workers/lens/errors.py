"""One error base class for the analysis core; the service maps each subclass to an HTTP code."""

from __future__ import annotations


class LensError(Exception):
    """Base of every error the analysis core raises on purpose."""


class InvalidParameter(LensError, ValueError):
    """A job parameter is invalid for this model or these data (an HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotAdaptable(LensError):
    """A loaded model lacks a part the analyses need (its blocks, heads, norms…)."""


class ContextTooLong(InvalidParameter):
    """An input is longer than the model's context window."""


class Cancelled(LensError):
    """The job was cancelled; raised from a progress callback to stop at the next step."""
