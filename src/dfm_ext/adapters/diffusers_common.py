"""Public pieces shared by the diffusers adapters (DiT, PixArt, SD3, Flux, CogVideoX and the spec families).

Every diffusers DiT family keeps its timestep embedder as ``time_proj`` (a parameter-free
sinusoid, :class:`diffusers.models.embeddings.Timesteps`) followed by an MLP
(:class:`~diffusers.models.embeddings.TimestepEmbedding`). :class:`~dfm_ext.adapters.common.TimeMLP`
(re-exported here) bundles the two so
that :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed` can copy it per stage; the copies'
last linear layer (``linear_2``) is zeroed, so at a pretrained initialisation only stage 0
contributes.

Conventions (paper: ``t = 0`` noise, ``t = 1`` data, velocity ``x - noise``):

==========  ======================  ===========================  =========================
family      time the model reads    what the model predicts      wrapped output
==========  ======================  ===========================  =========================
DiT         ``999 (1 - t)`` (DDPM)  epsilon (+ learned sigma)     raw (re-parameterised)
PixArt      ``999 (1 - t)`` (DDPM)  epsilon (+ learned sigma)     raw (re-parameterised)
SD3         ``1000 (1 - t)``        ``noise - x``                 ``-1 x`` raw
Flux        ``1000 (1 - t)``        ``noise - x``                 ``-1 x`` raw
CogVideoX   ``999 (1 - t)`` (DDPM)  v-prediction                  raw (re-parameterised)
==========  ======================  ===========================  =========================

:class:`DiffusersAdapterBase` holds what every family adapter does the same way (constructor
arguments ``time_convention`` and ``output_scale``, ``config``/``repr``, ``matches`` by diffusers
class name, the install-time grid and stage-0 checks, the multi-scale time embedder, the scaled
output); :class:`PatchEmbedAdapterBase` adds what the families built on diffusers' ``PatchEmbed``
(``pos_embed``: DiT, PixArt, SD3) share. A family module keeps only its own layout, embedder
wiring and forward. Helpers that are not diffusers-specific (conditioning and tensor checks,
``call_block``, ``scaled_output``) live in the public :mod:`dfm_ext.adapters.common`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dfm_ext.process.conventions import check_time_convention
from dfm_ext.specialization import combine_layer_groups
from dfm_ext.wrapping.adapter import multiscale_time_embed, widen_head
from dfm_ext.wrapping.embeddings import MultiScaleHead, MultiScaleTimestepEmbed

from .common import TimeMLP, check_stage0_channels, check_tensor, scaled_output, sincos_positions

__all__ = [
    "DIFFUSERS_LAYER_GROUPS",
    "DiffusersAdapterBase",
    "PatchEmbedAdapterBase",
    "TimeMLP",
    "check_joint_text",
    "diffusers_layer_groups",
    "sincos_positions",
]


def check_joint_text(model: nn.Module, b: int, cond: Any, *, text: str, pooled: str) -> tuple[Tensor, Tensor]:
    """Check an MMDiT's (SD3, Flux) ``cond.encoder_hidden_states`` and ``cond.pooled_projections``.

    ``cond`` is the family's parsed conditioning; ``text`` and ``pooled`` name the encoders in
    the error hints (e.g. ``"T5"``, ``"pooled CLIP"``).

    Shapes:
        ``encoder_hidden_states [B, L, joint_attention_dim]``,
        ``pooled_projections [B, pooled_projection_dim]``; returned unchanged.
    """
    cfg = model.config
    seq = check_tensor(
        cond.encoder_hidden_states,
        "encoder_hidden_states",
        (b, None, int(cfg.joint_attention_dim)),
        hint=f" ({text} embeddings [B, L, {cfg.joint_attention_dim}])",
    )
    vec = check_tensor(
        cond.pooled_projections,
        "pooled_projections",
        (b, int(cfg.pooled_projection_dim)),
        hint=f" ({pooled} embeddings [B, {cfg.pooled_projection_dim}])",
    )
    return seq, vec


#: ``dfm_ext.specialization`` layer groups on the names of diffusers' shared blocks (``attn1.to_q``,
#: ``ff.net``, ``ff_context``, ``norm1.linear``, ``timestep_embedder``, ``pos_embed.proj``,
#: ``proj_out``); each family adapter extends them with its own (``combine_layer_groups``).
DIFFUSERS_LAYER_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cond": (r"(^|\.)timestep_embedder\.",),
        "mod": (r"(^|\.)norm[^.]*\.linear$",),
        "attn": (r"(^|\.)attn\d*\.",),
        "mlp": (r"(^|\.)ff(_context)?\.",),
        "proj": (r"(^|\.)(pos_embed|patch_embed)\.proj(\.proj)?$", r"(^|\.)proj_out$"),
    }
)


def diffusers_layer_groups(family: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    """:data:`DIFFUSERS_LAYER_GROUPS` extended with a family's own module-name patterns (``combine_layer_groups``)."""
    return combine_layer_groups(DIFFUSERS_LAYER_GROUPS, family)


class DiffusersAdapterBase:
    """What the diffusers family adapters (:class:`dfm_ext.wrapping.adapter.DiTAdapter`) share.

    A subclass sets ``name`` (the adapter's registry name), ``model_class`` (the name of the
    diffusers class it handles, looked up in ``diffusers`` only when :meth:`matches` runs, so
    importing an adapter module does not import diffusers) and, for video families,
    ``grid_ndim = 3``; it defines its own ``__init__`` (the public signature and defaults) that
    passes ``time_convention`` and ``output_scale`` here, and extends :meth:`config` with any
    further constructor arguments, in constructor order.

    Args:
        time_convention: how the timestep embedders read time; a name of
            :func:`dfm_ext.process.conventions.time_transform`.
        output_scale: multiplies the head output (``-1`` for a model trained on ``noise - x``).
    """

    name: ClassVar[str]
    model_class: ClassVar[str]
    grid_ndim: ClassVar[int] = 2
    #: the family's ``dfm_ext.specialization`` layer groups (a subclass adds its own names)
    layer_groups: ClassVar[Mapping[str, tuple[str, ...]]] = DIFFUSERS_LAYER_GROUPS

    def __init__(self, time_convention: Any, output_scale: float) -> None:
        self.time_convention = check_time_convention(time_convention)
        self.output_scale = float(output_scale)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this adapter (JSON-serialisable)."""
        return {"time_convention": self.time_convention, "output_scale": self.output_scale}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def matches(self, model: nn.Module) -> bool:
        import diffusers  # noqa: PLC0415

        return isinstance(model, getattr(diffusers, self.model_class))

    def missing(self, model: nn.Module) -> list[str] | None:
        """Nothing beyond the class: ``None`` for another class (not a near miss), else ``[]``."""
        return [] if self.matches(model) else None

    def _check_grid(self, model: nn.Module, grid: tuple[int, ...]) -> None:
        """Install-time check of the packer's token grid (rank ``grid_ndim``); families add limits."""
        if len(grid) != self.grid_ndim:
            kind = "videos" if self.grid_ndim == 3 else "images"
            raise ValueError(f"{type(model).__name__} takes {kind}; got a token grid {grid}")

    def _time_embed(
        self, proj: nn.Module, mlp: nn.Module, hidden: int, packer: Any, *, init: str, stage_embedding: bool
    ) -> MultiScaleTimestepEmbed:
        """The multi-scale embedder replacing the pretrained ``mlp(proj(timestep))``."""
        return multiscale_time_embed(
            TimeMLP(proj, mlp),
            hidden,
            packer.num_stages,
            init=init,
            stage_embedding=stage_embedding,
            time_transform=self.time_convention,
        )

    def _velocity(self, head_out: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Head tokens ``[B, N, C']`` -> packed output ``[B, C', *grid]`` times ``output_scale``."""
        return scaled_output(head_out, grid, self.output_scale)


class PatchEmbedAdapterBase(DiffusersAdapterBase):
    """Families whose ``pos_embed`` is a diffusers ``PatchEmbed`` (a ``Conv2d`` ``proj``, sincos positions).

    Their config has ``in_channels``, ``sample_size`` and ``patch_size``, and their head
    unpatchifies in ``(p, q, c)`` order (channels fastest).
    """

    def default_sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def token_grid(self, model: nn.Module, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        p = int(model.config.patch_size)
        if len(sample_shape) != 3:
            raise ValueError(f"{type(model).__name__} takes images; sample_shape must be (C, H, W), got {sample_shape}")
        if sample_shape[1] % p or sample_shape[2] % p:
            raise ValueError(f"sample_shape {sample_shape} is not divisible by the model's patch size {p}")
        return (sample_shape[1] // p, sample_shape[2] // p)

    def _patch_proj(self, model: nn.Module, packer: Any, init: str) -> nn.Conv2d:
        """The pretrained patch ``Conv2d``, after the install-time checks against ``packer``."""
        proj = model.pos_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f"{type(model).__name__}.pos_embed.proj is not a Conv2d (already wrapped?)")
        self._check_grid(model, packer.grid)
        check_stage0_channels(packer, init, proj.in_channels)
        return proj

    @staticmethod
    def _widen_head(head: nn.Linear, model: nn.Module, packer: Any, init: str) -> MultiScaleHead:
        """The model's output projection widened to every stage (learned-sigma channels dropped)."""
        return widen_head(
            head,
            packer,
            base_patch=int(model.config.patch_size),
            base_channels=int(model.out_channels),
            order="pqc",
            init=init,
        )

    @staticmethod
    def _embed_patches(model: nn.Module, packed: Tensor, grid: tuple[int, int]) -> Tensor:
        """``PatchEmbed.forward`` on packed stages: ``[B, C', Gh, Gw]`` -> tokens ``[B, Gh * Gw, D]`` with positions."""
        pe = model.pos_embed
        x = pe.proj(packed)
        if pe.layer_norm:
            x = pe.norm(x)
        pos = sincos_positions(pe, grid, x.device)
        if pos is not None:
            x = (x + pos).to(x.dtype)
        return x
