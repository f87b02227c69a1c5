"""Oracles and data that a test needs: skip where they are missing on a developer machine, fail in CI.

An HF processor, a real GGUF or a weight package that silently disappears would turn its tests into passes that
check nothing. With ``CI`` set (``CI=true``, as .ci/run and every hosted CI runner set it) a missing oracle is a
failure that names what is missing; elsewhere it is a skip with the same message.
"""
from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str):
    """Skip (developer machine) or fail (CI) because an oracle or a data file is unavailable."""
    if in_ci():
        pytest.fail(f"oracle missing in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(module: str, reason: str = ""):
    """``pytest.importorskip`` for oracles: the imported module, or :func:`missing`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(reason or f"{module} cannot be imported ({e})")
