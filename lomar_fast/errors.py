"""The project's own input errors.

An :class:`InputError` is a mistake the user can fix: a flag, a file or a combination of them that
cannot work. Its message names the input and the fix. The command-line entry points print such an
error as one line and exit 2; every other exception keeps its traceback.
"""
from __future__ import annotations


class InputError(Exception):
    """Bad input the user can fix; the message names the input and the fix."""


class ConfigError(InputError, ValueError):
    """A setting, file or combination of them that cannot work; the message names it and the fix."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite on some rank; every rank raises it at the same read-back."""


class CompileFailed(RuntimeError):
    """torch.compile could not compile the model; raised from the compiler's own error, whose traceback is kept,
    with the way to run without it (--compile off)."""
