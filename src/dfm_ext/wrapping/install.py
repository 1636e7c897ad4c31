"""The three replacements an adapter installs, built from a model's pretrained modules.

:func:`widen_patch_embed`, :func:`widen_head` and the timestep embedders
(:func:`multiscale_time_embed`: one embedder per stage; :func:`stage_input_time_embed`: one shared
time network with a widened input, for large modulation approximators) all start from the
pretrained weights so that stage 0 reproduces the model (``init="pretrained"``). They are public
helpers for writing adapters (:mod:`dfm_ext.wrapping.adapter`, ``docs/guides/adapters.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from dfm_ext.process.conventions import TimeConvention, time_transform as _convention
from dfm_ext.wrapping.embeddings import Init, MultiScaleHead, MultiScalePatchEmbed, MultiScaleTimestepEmbed
from dfm_ext.wrapping.timestep_embed import StageInputTimeEmbed

__all__ = ["as_time_transform", "multiscale_time_embed", "stage_input_time_embed", "widen_head", "widen_patch_embed"]

TimeTransformLike = Callable[..., Tensor] | str | Mapping[str, Any] | TimeConvention | None


def as_time_transform(value: TimeTransformLike) -> Callable[..., Tensor] | None:
    """A time convention (name, ``{"name": ..., **params}`` or :class:`TimeConvention`) as its callable; callables pass through."""
    if value is None or (callable(value) and not isinstance(value, Mapping)):
        return value
    return _convention(value)


def widen_patch_embed(
    layer: nn.Module, packer: Any, *, init: Init = "pretrained", in_order: str = "cpq"
) -> MultiScalePatchEmbed:
    """A :class:`MultiScalePatchEmbed` for ``packer``'s stages from a pretrained conv/linear patch embedding.

    ``init="pretrained"``: stage 0 reuses ``layer``'s kernel (summed over sub-blocks when stage 0's
    patch is smaller), other stages zero. ``in_order`` is the flattened patch order of a ``Linear``
    patch embedding (``"cpq"`` or ``"pqc"``).
    """
    channels = [s[0] for s in packer.stage_shapes]
    return MultiScalePatchEmbed.from_conv(layer, channels, packer.patch_sizes, init=init, in_order=in_order)


def widen_head(
    linear: nn.Linear,
    packer: Any,
    *,
    base_patch: int | Sequence[int],
    base_channels: int | None = None,
    order: str = "pqc",
    init: Init = "pretrained",
) -> MultiScaleHead:
    """A :class:`MultiScaleHead` for ``packer``'s stages from a pretrained output linear.

    Args:
        linear: the model's output projection ``D -> prod(base_patch) * base_channels``.
        packer: the stages' :class:`~dfm_ext.wrapping.packing.ScalePacker`.
        base_patch: the model's own patch size.
        base_channels: output channels of ``linear`` (``2 C`` for ``learn_sigma``); only the first
            ``C_s`` are kept. Default: ``out_features / prod(base_patch)``.
        order: ``"pqc"`` (channels fastest: DiT, SiT, PixArt, SD3) or ``"cpq"`` (Flux, CogVideoX).
        init: ``"pretrained"`` or ``"scratch"`` (all zero).
    """
    channels = [s[0] for s in packer.stage_shapes]
    return MultiScaleHead.from_linear(
        linear, channels, packer.patch_sizes, base_patch=base_patch, base_channels=base_channels, order=order, init=init
    )


def multiscale_time_embed(
    embedder: nn.Module,
    hidden_size: int,
    num_stages: int,
    *,
    init: Init = "pretrained",
    stage_embedding: bool = True,
    time_transform: TimeTransformLike = None,
) -> MultiScaleTimestepEmbed:
    """A :class:`MultiScaleTimestepEmbed` from a pretrained embedder (stage 0 = it; later stages zero-output copies).

    ``time_transform`` maps paper time to the embedder's input: a callable, or a time convention
    (a name, a ``{"name": ..., **params}`` mapping or a
    :class:`~dfm_ext.process.conventions.TimeConvention`). The embedder's output ``[B, *E]`` is
    probed on one time here, so a wrong shape fails when the model is wrapped.
    """
    tf = as_time_transform(time_transform)
    return MultiScaleTimestepEmbed.from_embedder(
        embedder, hidden_size, num_stages, init=init, stage_embedding=stage_embedding, time_transform=tf
    )


def stage_input_time_embed(
    features: Callable[[Tensor], Tensor],
    network: nn.Module,
    input_layer: str,
    num_stages: int,
    *,
    init: Init = "pretrained",
    stage_embedding: bool = True,
    time_transform: TimeTransformLike = None,
) -> StageInputTimeEmbed:
    """A :class:`~dfm_ext.wrapping.timestep_embed.StageInputTimeEmbed`: every stage through one shared time network.

    For time networks too large to copy per stage (Chroma's modulation approximator):
    ``network.<input_layer>`` (its first ``nn.Linear``, features ``F -> H``) is widened to read
    every stage's features ``features(f(t_s))`` and the stage index; the new columns start at zero,
    so stage 0 is the pretrained network exactly.
    """
    return StageInputTimeEmbed(
        features, network, input_layer, num_stages, init=init, stage_embedding=stage_embedding,
        time_transform=as_time_transform(time_transform),
    )  # fmt: skip
