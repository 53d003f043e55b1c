"""Exceptions shared by the library and the `vlm-tools` command line (a leaf module: it imports nothing)."""

from __future__ import annotations

__all__ = ["UsageError", "OutputDirError"]


class UsageError(ValueError):
    """Bad input to a command-line verb; `vlm-tools` prints it on one line and exits with status 2."""


class OutputDirError(OSError):
    """An output folder cannot be created or written (the message names it and why); the CLI exits with status 2."""
