"""Errors raised by the converters."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or disagrees with its config.

    The message names the file, the tensor (HF key or leaf) and, for shape problems, both shapes.
    """
