"""The tolerance table of the design note (max abs error divided by max |ref|, unless said otherwise) and the
error measure the kernel tests use. A test that needs a looser bound says why, with the measured error."""
import torch

# fp32 kernels vs x_ref (interpreter or GPU, TF32 off); fp16 inputs with fp32 accumulation; bf16 on a GPU
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LOGITS_ABS = 1e-4          # model logits vs HF, fp32, torch path (absolute)
PIXELS_ABS = 1e-6          # image pixels vs HF processors
LOG_MEL_ABS = 1e-5         # log-mel vs WhisperFeatureExtractor (absolute)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp32 (an all-zero reference counts as 1e-30)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
