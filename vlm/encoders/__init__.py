"""Vision encoders + projectors of mmproj GGUFs, one file per projector type (registered in vlm.registry).

    from vlm.encoders import load_mmproj
    enc = load_mmproj("mmproj.gguf")
    embs = enc.encode([pixels])      # list of [n_tokens, enc.n_embd_out]
"""
from vlm.encoders.base import (MmprojEncoder, MmprojError, MmprojMismatchError, VisionConfig,  # noqa: F401
                               load_mmproj)

__all__ = ["load_mmproj", "MmprojEncoder", "MmprojError", "MmprojMismatchError", "VisionConfig"]
