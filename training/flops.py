"""Model FLOPs for the utilisation figure: both towers (counted once, by torch's FLOP counter) and the logits."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# dense bf16 / fp32(tf32) peak TFLOP/s of one device
_GPU_PEAKS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0), "L40": (181.0, 90.0),
              "A10": (125.0, 62.0), "4090": (165.0, 82.0), "3090": (71.0, 35.0), "V100": (125.0, 15.7)}


def forward_flops_per_sample(model: nn.Module, image_size: int, context_length: int) -> float:
    """Forward FLOPs of one image plus one caption through both towers (read-outs included)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    img = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    txt = torch.zeros(1, context_length, dtype=torch.long, device=p.device)
    txt[0, 0], txt[0, 1] = 49406, 49407
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.encode_image(img, normalize=True)
            model.encode_text(txt, normalize=True)
    finally:
        model.train(was_training)
    return float(fc.get_total_flops())


def logits_flops(local_batch: int, global_batch: int, embed_dim: int, local_loss: bool) -> float:
    """Forward FLOPs of the similarity logits computed on one rank per step (both directions)."""
    if local_loss:
        return 2 * 2.0 * local_batch * global_batch * embed_dim
    return 2.0 * global_batch * global_batch * embed_dim


def peak_tflops(device: torch.device, precision: str, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in _GPU_PEAKS.items():
            if key in name:
                return bf16 if "bf16" in precision or "bfloat16" in precision else fp32
        return None
    return None  # CPUs: no reliable peak to divide by (give --peak-tflops to get an MFU figure)


def train_flops_per_step(fwd_per_sample: float, local_batch: int, accum: int, global_batch: int,
                         embed_dim: int, local_loss: bool) -> float:
    """Model FLOPs of one optimizer step on one rank: 3x forward (forward + backward), recompute not counted."""
    towers = 3.0 * fwd_per_sample * local_batch * accum
    logits = 3.0 * logits_flops(local_batch * accum, global_batch, embed_dim, local_loss)
    return towers + logits

