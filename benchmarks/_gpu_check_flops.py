"""Model FLOPs of a DiT training step, counted from its config, and the GPU's peak bf16 rate: the MFU of ``gpu_check.py``.

How the FLOPs are counted (:func:`dit_forward_flops`): only matrix products, 2 FLOPs per multiply-add,
for one forward of the reference DiT (:mod:`dfm_ext.models.dit`) on a batch of ``B`` samples with
``N`` tokens, width ``D``, MLP width ``M = mlp_ratio * D``, depth ``L``, ``S`` stages (1 unwrapped):

* attention, per block: ``qkv`` ``2 N D 3D``, output projection ``2 N D D``, scores ``Q K^T``
  ``2 N N D`` and ``softmax(.) V`` ``2 N N D``;
* MLP, per block: ``fc1`` ``2 N D M`` and ``fc2`` ``2 N M D``;
* adaLN modulation, per block ``2 D 6D`` and in the final layer ``2 D 2D`` (once per sample, not per token);
* embeddings: the patch embedding ``2 N P_in D`` (``P_in`` input features per token: ``C p^2``
  unwrapped; wrapped by :func:`dfm_ext.wrap_dit`, the stages packed side by side on the token grid,
  ``sum_s C_s (H_s / G_h) (W_s / G_w)``), ``S`` timestep embedders ``2 (256 D + D D)`` each
  (sinusoidal features of width 256, then a two-layer MLP); label and stage embeddings are lookups (0);
* the output head ``2 N D P_out`` (``P_out = P_in``: one velocity per input feature).

Norms, activations, softmax, residual adds and the optimiser are not counted (they are not matrix
products). A training step is counted as 3 forwards (the backward of a matrix product costs two
products of the same size), the usual convention of MFU (PaLM, appendix B): activation checkpointing's
recomputed forward and per-stage LoRA's extra products are *not* model FLOPs, so their arms have the
plain model's FLOPs and a lower MFU for the same work. ``tests/test_gpu_check.py`` checks the count
against a hand count and against ``torch.utils.flop_counter.FlopCounterMode`` on the model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PEAK_BF16", "count_forward_flops", "dit_forward_flops", "mfu_record", "peak_bf16_flops", "train_step_flops"]

#: Dense bf16 tensor-core peak (no sparsity), FLOP/s per GPU, from the vendor datasheets; matched in
#: order on the lower-cased ``torch.cuda.get_device_name()`` (every listed substring must occur).
PEAK_BF16: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("h100", "pcie"), 756e12, "H100 PCIe"),
    (("h100", "nvl"), 835e12, "H100 NVL"),
    (("h100",), 989e12, "H100 SXM (HBM3)"),
    (("h200", "nvl"), 835e12, "H200 NVL"),
    (("h200",), 989e12, "H200 SXM / GH200"),
    (("a100",), 312e12, "A100 (SXM and PCIe)"),
)


def peak_bf16_flops(device_name: str | None) -> dict[str, Any]:
    """``{"flops": peak or None, "matched": table entry, "reason": why None}`` for a device name."""
    if not device_name:
        return {"flops": None, "matched": None, "reason": "no CUDA device: MFU needs a GPU's peak rate"}
    name = device_name.lower()
    for keys, flops, label in PEAK_BF16:
        if all(k in name for k in keys):
            return {"flops": flops, "matched": label, "reason": None}
    known = ", ".join(label for _, _, label in PEAK_BF16)
    return {"flops": None, "matched": None, "reason": f"{device_name!r} is not in the peak table ({known}): add its dense bf16 peak"}


def _packed_features(cfg: Any, stage_shapes: Sequence[Sequence[int]] | None) -> tuple[int, int]:
    """(input features per token, number of timestep embedders)."""
    p = cfg.patch_size
    if stage_shapes is None:
        return cfg.in_channels * p * p, 1
    gh, gw = cfg.grid_size
    total = 0
    for c, h, w in stage_shapes:
        if h % gh or w % gw:
            raise ValueError(f"stage shape {(c, h, w)} does not tile the token grid {(gh, gw)}")
        total += c * (h // gh) * (w // gw)
    return total, len(stage_shapes)


def dit_forward_flops(cfg: Any, batch: int, stage_shapes: Sequence[Sequence[int]] | None = None, *, frequency_embedding_size: int = 256) -> dict[str, int]:
    """Matrix-product FLOPs of one forward of the DiT of ``cfg`` (a :class:`dfm_ext.DiTConfig`) on ``batch`` samples.

    ``stage_shapes``: the ``(C, H, W)`` of each stage when the DiT is wrapped by :func:`dfm_ext.wrap_dit`
    (e.g. ``[(4, 16, 16), (4, 32, 32)]`` for ``LaplacianPyramid((2, 1))`` on 32x32x4 latents); ``None``:
    the unwrapped DiT. Returns the parts and their sum ``"forward"`` (see the module docstring).
    """
    if stage_shapes is None and cfg.learn_sigma:
        raise ValueError("learn_sigma is not counted (the recipes train without it)")
    d, layers = cfg.hidden_size, cfg.depth
    m = int(d * cfg.mlp_ratio)
    gh, gw = cfg.grid_size
    n = gh * gw
    p_in, embedders = _packed_features(cfg, stage_shapes)
    p_out = p_in
    f = frequency_embedding_size
    parts = {
        "attention_projections": layers * n * (2 * d * 3 * d + 2 * d * d),
        "attention_scores": layers * 2 * (2 * n * n * d),
        "mlp": layers * n * (2 * d * m + 2 * m * d),
        "adaln": layers * 2 * d * 6 * d + 2 * d * 2 * d,
        "embeddings": 2 * n * p_in * d + embedders * (2 * f * d + 2 * d * d),
        "head": 2 * n * d * p_out,
    }
    out = {k: batch * v for k, v in parts.items()}
    out["forward"] = sum(out.values())
    out["tokens"] = n
    return out


def train_step_flops(cfg: Any, batch: int, stage_shapes: Sequence[Sequence[int]] | None = None) -> int:
    """Model FLOPs of one training step: 3 forwards (forward + backward)."""
    return 3 * dit_forward_flops(cfg, batch, stage_shapes)["forward"]


def _math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # The fused kernel as two explicit products, so that FlopCounterMode counts it on every device.
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("the FLOP check only counts plain attention")
    s = (q.shape[-1] ** -0.5) if scale is None else scale
    return torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1) @ v


@contextlib.contextmanager
def _explicit_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _math_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count_forward_flops(forward: Callable[[], Any]) -> int:
    """FLOPs ``torch.utils.flop_counter.FlopCounterMode`` counts in ``forward()`` (no grad), attention as explicit products."""
    from torch.utils.flop_counter import FlopCounterMode

    with _explicit_attention(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    return int(counter.get_total_flops())


def mfu_record(flops_per_step: int, seconds_per_step: float, peak: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s and MFU (``None`` without a peak) of one timed configuration."""
    achieved = flops_per_step / seconds_per_step
    return {
        "model_flops_per_step": flops_per_step,
        "ms_per_step": round(1000 * seconds_per_step, 3),
        "achieved_tflops": round(achieved / 1e12, 6),
        "mfu": None if peak is None else round(achieved / peak, 4),
    }
