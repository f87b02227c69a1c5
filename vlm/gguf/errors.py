"""Errors raised by :mod:`vlm.gguf`.

Every problem with a GGUF file raises :class:`GGUFError` or a subclass, with a message that names the file and
where the problem is (byte offset, metadata key or tensor name), so a user can tell a truncated download from an
unsupported quant type without a debugger.
"""
from __future__ import annotations


class GGUFError(ValueError):
    """Base class: anything wrong with a GGUF file or a request made of one."""


class GGUFFormatError(GGUFError):
    """The file is malformed: truncated, bad magic, impossible counts, out-of-bounds data, duplicates..."""


class GGUFUnsupportedError(GGUFError):
    """The file is well formed but uses something we do not read (GGUF v1, big-endian byte order...)."""


class GGUFKeyError(GGUFError, KeyError):
    """A metadata key or tensor name that the file does not contain. Also a KeyError, so `except KeyError` works."""

    def __str__(self) -> str:  # KeyError's __str__ would wrap the message in quotes
        return str(self.args[0]) if self.args else ""
