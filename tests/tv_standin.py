"""A stand-in for the few ``torchvision.transforms.v2.functional`` calls of HF's torchvision-backend image
processors, so that transformers' own ``Phi4MultimodalImageProcessor`` can run where torchvision is not installed
(our test environment and CI: the CPU torch wheel has no matching torchvision build).

Each function restates torchvision 0.28's rule in plain torch (``resize_image``: same-size input returned as is;
``interpolate(..., align_corners=False, antialias=...)``; uint8 kept native for bicubic, and for bilinear only
on AVX2 / AVX512 / ARM CPUs, else float32 then (clamp for bicubic) round; ``pad`` with a constant fill;
``normalize`` = (x - mean) / std).  The rest of the processor (crop layout, masks, token counts, padding,
normalisation constants, crop order, batching) is transformers' code.  Checked once against the real
torchvision 0.28.0 Python code on this CPU (see the report of issue #20): pixel values identical (max error 0).

`hf_phi4mm_image_processor(monkeypatch)` installs the stand-in for one test and returns HF's processor.
"""
from __future__ import annotations

import enum
import importlib
import importlib.util
import platform
import sys
import types

import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _native_uint8(mode: InterpolationMode) -> bool:
    if mode == InterpolationMode.BILINEAR:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return mode in (InterpolationMode.BICUBIC, InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT)


def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    if max_size is not None or len(size) != 2:
        raise NotImplementedError("stand-in: only an explicit [height, width] size")
    if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        antialias = False
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shape, dtype = image.shape, image.dtype
    x = image.reshape(-1, *shape[-3:])
    cast = dtype not in (torch.float32, torch.float64) and not (dtype == torch.uint8 and _native_uint8(interpolation))
    if cast:
        x = x.to(torch.float32)
    align = False if interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC) else None
    x = F.interpolate(x, size=list(size), mode=interpolation.value, align_corners=align, antialias=antialias)
    if cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            x = x.clamp_(0, 255)
        x = x.round_().to(dtype)
    return x.reshape(*shape[:-2], *size)


def pad(image, padding, fill=None, padding_mode="constant"):
    if padding_mode != "constant":
        raise NotImplementedError("stand-in: constant padding only")
    left, top, right, bottom = padding if len(padding) == 4 else (padding * 4)[:4]
    if isinstance(fill, (list, tuple)):
        if len(set(fill)) != 1:
            raise NotImplementedError("stand-in: one fill value for all channels")
        fill = fill[0]
    return F.pad(image, (left, right, top, bottom), value=0 if fill is None else fill)


def normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(mean).div_(std) if inplace else (image - mean) / std


def grayscale_to_rgb(image):
    return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])


def hf_phi4mm_image_processor(monkeypatch, **kwargs):
    """transformers' Phi4MultimodalImageProcessor, with the real torchvision if it imports, else the stand-in."""
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
        real = True
    except Exception:  # not installed, or a build whose C++ ops cannot load with this torch
        real = False
    if not real:
        import transformers.image_processing_backends as backends
        from transformers.image_utils import PILImageResampling

        fn = types.ModuleType("torchvision.transforms.v2.functional")
        for name in ("InterpolationMode", "resize", "pad", "normalize", "grayscale_to_rgb"):
            setattr(fn, name, globals()[name])
        v2 = types.ModuleType("torchvision.transforms.v2")
        v2.functional = fn
        tr = types.ModuleType("torchvision.transforms")
        tr.v2 = v2
        tv = types.ModuleType("torchvision")
        tv.transforms = tr
        for name, mod in (("torchvision", tv), ("torchvision.transforms", tr), ("torchvision.transforms.v2", v2),
                          ("torchvision.transforms.v2.functional", fn)):
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(backends, "tvF", fn, raising=False)
        mapping = {PILImageResampling.NEAREST: InterpolationMode.NEAREST,
                   PILImageResampling.BILINEAR: InterpolationMode.BILINEAR,
                   PILImageResampling.BICUBIC: InterpolationMode.BICUBIC,
                   PILImageResampling.LANCZOS: InterpolationMode.LANCZOS}
        monkeypatch.setattr(backends, "pil_torch_interpolation_mapping", mapping, raising=False)
        # executed afresh from its spec, registered only for this test: the stand-in-bound module does not
        # outlive it (monkeypatch removes the sys.modules entry again)
        modname = "transformers.models.phi4_multimodal.image_processing_phi4_multimodal"
        spec = importlib.util.find_spec(modname)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, modname, mod)
        spec.loader.exec_module(mod)
    else:
        from transformers.models.phi4_multimodal import image_processing_phi4_multimodal as mod
    return mod.Phi4MultimodalImageProcessor(**kwargs)


def hf_minicpmv4_6_video_processor(monkeypatch, **kwargs):
    """transformers' MiniCPMV4_6VideoProcessor (a torchvision-backend processor), stand-in as above if needed."""
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:
        import transformers.image_processing_backends as backends
        import transformers.video_processing_utils as vpu
        from transformers.image_utils import PILImageResampling

        fn = types.ModuleType("torchvision.transforms.v2.functional")
        for name in ("InterpolationMode", "resize", "pad", "normalize", "grayscale_to_rgb"):
            setattr(fn, name, globals()[name])
        monkeypatch.setattr(backends, "tvF", fn, raising=False)
        monkeypatch.setattr(vpu, "tvF", fn, raising=False)
        monkeypatch.setattr(backends, "pil_torch_interpolation_mapping",
                            {PILImageResampling.BICUBIC: InterpolationMode.BICUBIC,
                             PILImageResampling.BILINEAR: InterpolationMode.BILINEAR}, raising=False)
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    return MiniCPMV4_6VideoProcessor(**kwargs)
