"""Errors shared across layers of the engine (re-exported where users meet them, e.g. :mod:`vlm.mtmd`).

They live here, below both the encoders and the media API, so that an encoder can refuse a media request (a
video for an encoder without video positions, audio too short for a window) without importing the media API.
"""
from __future__ import annotations


class MediaError(ValueError):
    """A media request this engine cannot serve (message names the problem)."""


class MarkerMismatchError(MediaError):
    """The number of media markers in the text differs from the number of bitmaps."""


__all__ = ["MediaError", "MarkerMismatchError"]
