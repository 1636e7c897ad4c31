"""Multi-scale timestep embedders: one embedder per stage, summed, plus a stage-index embedding.

See :mod:`dfm_ext.wrapping.embeddings` for the pretrained initialisation every multi-scale
embedding follows (stage 0 = the base model's, later stages add nothing at first).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

#: How a multi-scale embedding starts: from the base model's weights (stage 0 exact) or freshly initialised.
Init = Literal["pretrained", "scratch"]

__all__ = ["Init", "MultiScaleTimestepEmbed", "check_init"]


def check_init(init: str) -> None:
    """Refuse an ``init`` that is not one of :data:`Init` (``"pretrained"``, ``"scratch"``), naming it."""
    if init not in ("pretrained", "scratch"):
        raise ValueError(f"init must be 'pretrained' or 'scratch', got {init!r}")


def _last_linear(module: nn.Module) -> nn.Linear:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(module).__name__} has no nn.Linear to zero-initialise")
    return last


@torch.no_grad()
def _reinit_linears(module: nn.Module) -> None:
    # DiT initialises its timestep-embedder MLP with N(0, 0.02) weights and zero biases.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MultiScaleTimestepEmbed(nn.Module):
    """Per-stage timestep embedders, summed, plus a learned stage-index embedding.

    .. math::  c = \\sum_s E_s(f(t_s)) + e_{stage}

    where ``f`` is ``time_transform`` (the model's own time convention; identity by default).
    Every stage's embedder sees its own time, including masked later stages, which the DFM
    process keeps at ``t = 0`` (as the paper does). The stage embedding starts at zero so a
    pretrained initialisation is exact.

    Args:
        embedders: one module per stage mapping ``[B]`` times to ``[B, D]``, or a zero-argument
            factory called ``num_stages`` times.
        hidden_size: ``D``.
        num_stages: ``S``.
        stage_embedding: add ``nn.Embedding(S, D)`` of the stage index (zero-initialised).
        time_transform: maps paper time ``t`` (0 = noise, 1 = data) to what the embedders expect,
            e.g. ``lambda t: 1000 * t`` for DiT's sinusoidal embedder.

    Shapes:
        ``forward(t [B, S], stage [B] long) -> [B, D]``.

    Example:
        >>> import torch
        >>> emb = MultiScaleTimestepEmbed(lambda: torch.nn.Linear(1, 8), 8, 2,
        ...                               time_transform=lambda t: t[:, None])
        >>> emb(torch.rand(3, 2), torch.tensor([0, 1, 1])).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        embedders: Sequence[nn.Module] | Callable[[], nn.Module],
        hidden_size: int,
        num_stages: int,
        *,
        stage_embedding: bool = True,
        time_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        if callable(embedders) and not isinstance(embedders, nn.Module):
            mods = [embedders() for _ in range(num_stages)]
        else:
            mods = list(embedders)  # type: ignore[arg-type]
        if len(mods) != num_stages or not all(isinstance(m, nn.Module) for m in mods):
            raise ValueError(f"expected {num_stages} embedder modules, got {len(mods)}")
        self.embedders = nn.ModuleList(mods)
        self.hidden_size = int(hidden_size)
        self.num_stages = num_stages
        self.time_transform = time_transform
        self.stage_embed = nn.Embedding(num_stages, self.hidden_size) if stage_embedding else None
        if self.stage_embed is not None:
            nn.init.zeros_(self.stage_embed.weight)

    @classmethod
    def from_embedder(
        cls,
        embedder: nn.Module,
        hidden_size: int,
        num_stages: int,
        *,
        init: Init = "pretrained",
        stage_embedding: bool = True,
        time_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> MultiScaleTimestepEmbed:
        """Build from a pretrained single-stage embedder.

        ``init="pretrained"``: stage 0 is ``embedder`` itself, later stages are copies whose last
        ``nn.Linear`` is zero (so they add nothing until trained). ``init="scratch"``: every stage
        a fresh copy (DiT init: ``N(0, 0.02)`` linear weights, zero biases).
        """
        check_init(init)
        mods = []
        for s in range(num_stages):
            if init == "pretrained" and s == 0:
                mods.append(embedder)
                continue
            m = copy.deepcopy(embedder)
            if init == "scratch":
                _reinit_linears(m)
            else:
                last = _last_linear(m)
                with torch.no_grad():
                    last.weight.zero_()
                    if last.bias is not None:
                        last.bias.zero_()
            mods.append(m)
        out = cls(mods, hidden_size, num_stages, stage_embedding=stage_embedding, time_transform=time_transform)
        p = next(embedder.parameters(), None)
        if p is not None and out.stage_embed is not None:
            out.stage_embed.to(device=p.device, dtype=p.dtype)
        return out

    def forward(self, t: Tensor, stage: Tensor | None = None) -> Tensor:
        if t.ndim != 2 or t.shape[1] != self.num_stages:
            raise ValueError(f"t must have shape [B, {self.num_stages}], got {tuple(t.shape)}")
        parts = []
        for s, emb in enumerate(self.embedders):
            ts = t[:, s]
            parts.append(emb(self.time_transform(ts) if self.time_transform is not None else ts))
        out = parts[0]
        for e in parts[1:]:
            out = out + e
        if self.stage_embed is not None:
            if stage is None:
                raise ValueError("stage [B] is required when the stage embedding is enabled")
            if stage.shape != (t.shape[0],):
                raise ValueError(f"stage must have shape [{t.shape[0]}], got {tuple(stage.shape)}")
            out = out + self.stage_embed(stage)
        return out
