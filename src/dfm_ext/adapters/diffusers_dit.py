"""Adapter for diffusers ``DiTTransformer2DModel`` (class-conditional DiT, e.g. ``facebook/DiT-XL-2-256``).

What ``install`` changes (the trunk, attention and positions stay as they are):

* ``pos_embed.proj`` (the patch ``Conv2d``) -> :class:`~dfm_ext.wrapping.embeddings.MultiScalePatchEmbed`;
  the sincos positions of ``pos_embed`` are still added for the token grid;
* every block's ``norm1.emb`` (a ``CombinedTimestepLabelEmbeddings``: each block of the diffusers
  DiT owns its own timestep and label embedder) -> :class:`MultiScaleTimestepLabelEmbed`, whose
  timestep part is a :class:`~dfm_ext.wrapping.embeddings.MultiScaleTimestepEmbed` (per-stage embedders
  summed, plus a stage embedding) and whose label part is the block's own label table. The final
  layer keeps reading ``transformer_blocks[0].norm1.emb``, as in diffusers;
* ``proj_out_2`` -> a widened :class:`~dfm_ext.wrapping.embeddings.MultiScaleHead` (diffusers unpatchifies
  as ``(p, q, c)``, channels fastest; learned-sigma checkpoints keep only the first ``C``
  channels).

Label dropout: diffusers drops labels independently in every block in train mode (so the blocks
of one sample disagree about its class). ``install`` turns that off and ``forward`` drops a
label once per sample with probability ``label_dropout`` (default 0.1, the paper's) to the null
class ``num_classes``, in training only. ``force_drop_ids`` (``[B]``, 1 = drop) and
``generator`` may be passed as conditioning for reproducible dropout.

Time and output: DiT checkpoints are DDPM models (integer timesteps, 999 = noise, epsilon
prediction). The embedders read ``999 (1 - t)`` (``time_convention="discrete"``); the head
output negated is returned as the velocity (``output_scale=-1``: ``-epsilon`` is what an epsilon
prediction is closest to as ``x - noise``), and DFM finetuning re-parameterises the model from
epsilon to velocity. At a pretrained initialisation the stage-0 output is therefore minus the
pretrained epsilon prediction, bit for bit (tested). ``benchmarks/epsilon_init.py`` measured the
choice on a DiT pretrained with its own DDPM objective: DFM loss 1.31 at the start and 0.318 after
500 finetuning steps with ``-epsilon``, against 3.00 and 0.564 with the raw epsilon
(``output_scale=1``, the default before); an exact epsilon-to-velocity conversion starts at 0.35
but is level with ``-epsilon`` by 500 steps and divides by ``t`` near noise.

Conditioning: ``class_labels`` (long ``[B]``; ``y`` is accepted as an alias).

Unlike the diffusers forward, which unpatchifies with ``sqrt(num_tokens)`` and so fails on
non-square inputs, the wrapped model unpatchifies through the packer and accepts non-square
token grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_ext.validation import check_value
from dfm_ext.wrapping.adapter import widen_patch_embed
from dfm_ext.wrapping.embeddings import MultiScaleTimestepEmbed

from .diffusers_common import PatchEmbedAdapterBase, diffusers_layer_groups
from .common import call_block, check_installed, check_tensor, parse_conditioning

__all__ = ["DiffusersDiTConditioning", "DiffusersDiTAdapter", "MultiScaleTimestepLabelEmbed", "StageTime", "ADAPTER"]


class DiffusersDiTConditioning(NamedTuple):
    """The conditioning keywords :meth:`DiffusersDiTAdapter.forward` takes.

    ``class_labels`` (long ``[B]``; ``y`` is its alias, pass one of them); ``force_drop_ids``
    (``[B]``, 1 = drop to the null class) or a ``generator`` make label dropout reproducible.
    """

    class_labels: Tensor | None = None
    y: Tensor | None = None
    force_drop_ids: Tensor | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class StageTime:
    """Per-stage times and the stage index, passed through the diffusers blocks as their ``timestep``.

    The blocks hand ``timestep`` to ``norm1.emb`` untouched, so this is how each block's
    multi-scale embedder receives ``t [B, S]`` and ``stage [B]`` without changing block code.
    """

    t: Tensor
    stage: Tensor


class MultiScaleTimestepLabelEmbed(nn.Module):
    """Replacement for a block's ``CombinedTimestepLabelEmbeddings``: ``sum_s E_s(t_s) + e_stage + label``.

    Args:
        timestep_embedder: the multi-scale timestep embedder.
        class_embedder: the block's pretrained ``LabelEmbedding`` (its own dropout is disabled).

    Shapes:
        ``forward(StageTime(t [B, S], stage [B]), class_labels [B]) -> [B, D]``.
    """

    def __init__(self, timestep_embedder: MultiScaleTimestepEmbed, class_embedder: nn.Module) -> None:
        super().__init__()
        self.timestep_embedder = timestep_embedder
        self.class_embedder = class_embedder

    def forward(self, timestep: StageTime, class_labels: Tensor, hidden_dtype: torch.dtype | None = None) -> Tensor:
        if not isinstance(timestep, StageTime):
            raise TypeError(
                "this DiTTransformer2DModel was converted by dfm_ext.wrap_dit; call the DFMTransformer "
                f"(stages, t [B, S], stage [B], ...) instead of the base model (got a {type(timestep).__name__} timestep)"
            )
        emb = self.timestep_embedder(timestep.t, timestep.stage)
        if hidden_dtype is not None:
            emb = emb.to(hidden_dtype)
        return emb + self.class_embedder(class_labels)


class DiffusersDiTAdapter(PatchEmbedAdapterBase):
    """:class:`dfm_ext.wrapping.adapter.DiTAdapter` for diffusers ``DiTTransformer2DModel``.

    Args:
        time_convention: how the timestep embedders read time; ``"discrete"`` (``999 (1 - t)``,
            DiT's DDPM timesteps) by default. Any name of :func:`dfm_ext.process.conventions.time_transform`.
        label_dropout: probability of replacing a label by the null class in training (once per
            sample, for classifier-free guidance).
        output_scale: multiplies the head output: ``-1`` (default) takes the epsilon prediction as
            ``-epsilon``; ``1`` the raw output (e.g. after finetuning into a flow model).

    Example (tiny model; the real checkpoint is loaded with ``from_pretrained``):
        >>> import torch
        >>> from diffusers import DiTTransformer2DModel
        >>> from dfm_ext import LaplacianPyramid, wrap_dit
        >>> base = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=8, num_layers=1, sample_size=8, num_embeds_ada_norm=10)
        >>> model = wrap_dit(base, LaplacianPyramid(factors=(2, 1)))
        >>> model.packer.patch_sizes
        [(1, 1), (2, 2)]
        >>> v = model([torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)], torch.rand(2, 2),
        ...           torch.tensor([0, 1]), class_labels=torch.tensor([3, 7]))
        >>> [tuple(x.shape) for x in v]
        [(2, 4, 4, 4), (2, 4, 8, 8)]
    """

    name = "diffusers_dit"
    model_class = "DiTTransformer2DModel"
    #: ``dfm_ext.specialization`` layer groups: diffusers' shared names and ``norm1.emb.class_embedder``,
    #: ``proj_out_1`` (modulation), ``proj_out_2`` (output)
    layer_groups = diffusers_layer_groups(
        {"cond": (r"(^|\.)class_embedder\.",), "mod": (r"(^|\.)proj_out_1$",), "proj": (r"(^|\.)proj_out_2$",)}
    )

    def __init__(self, time_convention: Any = "discrete", label_dropout: float = 0.1, output_scale: float = -1.0):
        super().__init__(time_convention, output_scale)
        if not 0.0 <= float(label_dropout) < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout!r}")
        self.label_dropout = float(label_dropout)

    def config(self) -> dict[str, Any]:
        return {
            "time_convention": self.time_convention,
            "label_dropout": self.label_dropout,
            "output_scale": self.output_scale,
        }

    def install(self, model: nn.Module, packer: Any, *, init: str, stage_embedding: bool) -> None:
        proj = self._patch_proj(model, packer, init)
        hidden = proj.out_channels
        table_rows = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        if self.label_dropout > 0 and table_rows <= int(model.config.num_embeds_ada_norm):
            raise ValueError(
                f"label_dropout={self.label_dropout} needs a null class, but {type(model).__name__} has no "
                "null-class embedding (built without label dropout); use label_dropout=0"
            )
        model.pos_embed.proj = widen_patch_embed(proj, packer, init=init)
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            emb.class_embedder.dropout_prob = 0.0  # dropout happens once, in forward
            time = self._time_embed(
                emb.time_proj, emb.timestep_embedder, hidden, packer, init=init, stage_embedding=stage_embedding
            )
            block.norm1.emb = MultiScaleTimestepLabelEmbed(time, emb.class_embedder)
        model.proj_out_2 = self._widen_head(model.proj_out_2, model, packer, init)

    def _labels(
        self,
        model: nn.Module,
        labels: Tensor,
        force_drop_ids: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        null = int(model.config.num_embeds_ada_norm)
        if force_drop_ids is not None:
            check_tensor(force_drop_ids, "force_drop_ids", (labels.shape[0],), floating=False)
            return torch.where(force_drop_ids.to(labels.device) == 1, null, labels)
        if model.training and self.label_dropout > 0:
            u = torch.rand(labels.shape[0], generator=generator, device=generator.device if generator is not None else labels.device)
            return torch.where(u.to(labels.device) < self.label_dropout, null, labels)
        return labels

    def forward(self, model: nn.Module, packed: Tensor, t: Tensor, stage: Tensor, **cond: Any) -> Tensor:
        """Conditioning: the keywords of :class:`DiffusersDiTConditioning`."""
        c = parse_conditioning(model, DiffusersDiTConditioning, cond)
        if c.class_labels is not None and c.y is not None:
            raise TypeError("pass class labels once, as class_labels= (or its alias y=), not both")
        labels = c.class_labels if c.class_labels is not None else c.y
        if labels is None:
            raise TypeError(f"{type(model).__name__} needs class labels: pass class_labels=LongTensor[B]")
        check_installed(model.pos_embed.proj)
        b, grid = packed.shape[0], tuple(packed.shape[2:])
        check_tensor(labels, "class_labels", (b,), floating=False)
        num_classes = int(model.config.num_embeds_ada_norm)
        if labels.numel():  # host check on CPU, device-side assert otherwise (no sync, no graph break)
            check_value(
                ((labels >= 0) & (labels <= num_classes)).all(),
                f"class_labels must be in [0, {num_classes}] ({num_classes} = null)",
                labels.tolist,
            )
        labels = self._labels(model, labels, c.force_drop_ids, c.generator)

        x = self._embed_patches(model, packed, grid)
        time = StageTime(t, stage)
        for block in model.transformer_blocks:
            # BasicTransformerBlock(hidden, mask, text, text_mask, timestep, cross_attention_kwargs, class_labels)
            x = call_block(model, block, x, None, None, None, time, None, labels)
        c = model.transformer_blocks[0].norm1.emb(time, labels, hidden_dtype=x.dtype)
        shift, scale = model.proj_out_1(F.silu(c)).chunk(2, dim=1)
        x = model.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self._velocity(model.proj_out_2(x), grid)

    def null_condition(self, model: nn.Module, **cond: Any) -> dict[str, Any]:
        """``class_labels`` (or ``y``) replaced by the null class ``num_classes``."""
        key = "class_labels" if "class_labels" in cond else "y"
        labels = cond.get(key)
        if labels is None:
            raise TypeError("null_condition needs the conditional class_labels to know the batch size")
        out = dict(cond)
        out[key] = torch.full_like(labels, int(model.config.num_embeds_ada_norm))
        return out


ADAPTER = DiffusersDiTAdapter()
