"""Multi-scale timestep embedders: every stage's time enters the model's time path, plus a stage-index embedding.

Two designs, both exact at a pretrained initialisation (stage 0 = the base model's embedder,
later stages add nothing at first; see :mod:`dfm_ext.wrapping.embeddings`):

* :class:`MultiScaleTimestepEmbed` (the paper's): one embedder per stage, outputs summed. For the
  usual small timestep MLP (``[B] -> [B, D]``). Embedders may return any trailing shape
  ``[B, *E]`` (e.g. ``[B, M, D]``); the shape is probed when the module is built and checked on
  every call, and the stage embedding ``[D]`` is added along the last axis only.
* :class:`StageInputTimeEmbed`: one *shared* time network whose first linear layer is widened
  to read every stage's time features (and the stage index). For large time networks such as
  Chroma's modulation approximator (~280M parameters at full size), where a copy per stage
  would cost as much again per stage; the widened input costs ``F x H`` per extra stage.

Both read the model's own time through a time convention (:mod:`dfm_ext.process.conventions`);
a convention that depends on the token grid (CogView4's) gets it as ``forward(..., grid=)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

#: How a multi-scale embedding starts: from the base model's weights (stage 0 exact) or freshly initialised.
Init = Literal["pretrained", "scratch"]

__all__ = ["Init", "MultiScaleTimestepEmbed", "StageInputLinear", "StageInputTimeEmbed", "apply_time_convention", "check_init"]


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


def apply_time_convention(
    transform: Callable[..., Tensor] | None, t: Tensor, grid: Sequence[int] | None
) -> Tensor:
    """``transform(t)`` (or ``transform(t, grid)`` for a convention that reads the token grid); ``t`` without one."""
    if transform is None:
        return t
    if getattr(transform, "needs_grid", False):
        if grid is None:
            raise ValueError(f"the time convention {transform!r} depends on the token grid; pass grid= (the adapter's packed grid)")
        return transform(t, grid=tuple(int(g) for g in grid))
    return transform(t)


def _probe_shape(embedder: nn.Module, transform: Callable[..., Tensor] | None) -> tuple[int, ...]:
    """The trailing output shape ``E`` of ``embedder`` on one time (``[1] -> [1, *E]``)."""
    p = next(embedder.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    t = torch.full((1,), 0.5, device=device)
    # A grid-dependent convention maps [1] to [1] like the others; any model time gives the shape.
    x = t if transform is None or getattr(transform, "needs_grid", False) else transform(t)
    with torch.no_grad():
        out = embedder(x)
    if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the timestep embedder {type(embedder).__name__} maps [1] times to {got}, not [1, *E]")
    return tuple(out.shape[1:])


class MultiScaleTimestepEmbed(nn.Module):
    """Per-stage timestep embedders, summed, plus a learned stage-index embedding.

    .. math::  c = \\sum_s E_s(f(t_s)) + e_{stage}

    where ``f`` is ``time_transform`` (the model's own time convention; identity by default).
    Every stage's embedder sees its own time, including masked later stages, which the DFM
    process keeps at ``t = 0`` (as the paper does). The stage embedding starts at zero so a
    pretrained initialisation is exact.

    Args:
        embedders: one module per stage mapping ``[B]`` times to ``[B, *E]`` (usually
            ``E = (D,)``), or a zero-argument factory called ``num_stages`` times.
        hidden_size: ``D``, the last axis of ``E``.
        num_stages: ``S``.
        stage_embedding: add ``nn.Embedding(S, D)`` of the stage index (zero-initialised), along
            the last axis of ``E`` (broadcast over the others, never along another axis).
        time_transform: maps paper time ``t`` (0 = noise, 1 = data) to what the embedders expect,
            e.g. :func:`dfm_ext.process.conventions.time_transform` ``("x1000")``; a convention
            with ``needs_grid`` gets the token grid from ``forward(..., grid=)``.
        embed_shape: ``E``; default ``(D,)``. :meth:`from_embedder` probes it.

    Shapes:
        ``forward(t [B, S], stage [B] long, grid=None) -> [B, *E]``; every stage's output must
        be exactly ``[B, *E]`` (``ValueError`` otherwise: nothing is broadcast).

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
        time_transform: Callable[..., Tensor] | None = None,
        embed_shape: Sequence[int] | None = None,
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
        shape = (self.hidden_size,) if embed_shape is None else tuple(int(v) for v in embed_shape)
        if not shape or shape[-1] != self.hidden_size:
            raise ValueError(
                f"the timestep embedders give [B, *{list(shape)}], whose last axis must be the hidden size "
                f"{self.hidden_size} (the stage embedding is added along it)"
            )
        self.embed_shape = shape
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
        time_transform: Callable[..., Tensor] | None = None,
    ) -> MultiScaleTimestepEmbed:
        """Build from a pretrained single-stage embedder (its output shape ``[B, *E]`` probed on one time).

        ``init="pretrained"``: stage 0 is ``embedder`` itself, later stages are copies whose last
        ``nn.Linear`` is zero (so they add nothing until trained). ``init="scratch"``: every stage
        a fresh copy (DiT init: ``N(0, 0.02)`` linear weights, zero biases).

        Raises:
            ValueError: the embedder's output is not ``[1, *E]`` for one time, or ``E``'s last axis
                is not ``hidden_size``.
        """
        check_init(init)
        shape = _probe_shape(embedder, time_transform)
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
        out = cls(mods, hidden_size, num_stages, stage_embedding=stage_embedding, time_transform=time_transform, embed_shape=shape)
        p = next(embedder.parameters(), None)
        if p is not None and out.stage_embed is not None:
            out.stage_embed.to(device=p.device, dtype=p.dtype)
        return out

    def forward(self, t: Tensor, stage: Tensor | None = None, grid: Sequence[int] | None = None) -> Tensor:
        if t.ndim != 2 or t.shape[1] != self.num_stages:
            raise ValueError(f"t must have shape [B, {self.num_stages}], got {tuple(t.shape)}")
        b = t.shape[0]
        out: Tensor | None = None
        for s, emb in enumerate(self.embedders):
            part = emb(apply_time_convention(self.time_transform, t[:, s], grid))
            if tuple(part.shape) != (b, *self.embed_shape):
                raise ValueError(
                    f"stage {s}'s timestep embedder gave {tuple(part.shape)}, expected [B, *E] = {[b, *self.embed_shape]}"
                )
            out = part if out is None else out + part
        assert out is not None  # num_stages >= 1
        if self.stage_embed is not None:
            if stage is None:
                raise ValueError("stage [B] is required when the stage embedding is enabled")
            if stage.shape != (b,):
                raise ValueError(f"stage must have shape [{b}], got {tuple(stage.shape)}")
            # Along the last axis only: [B, 1, ..., D] against [B, *E] (E = (M, D) must not meet [B, D]).
            out = out + self.stage_embed(stage).view(b, *([1] * (len(self.embed_shape) - 1)), self.hidden_size)
        return out


class StageInputLinear(nn.Module):
    """A pretrained first layer ``Linear(F -> H)`` widened to read more input features, exactly.

    ``forward(x [..., F + extra])`` is ``base(x[..., :F]) + extra(x[..., F:])``; ``extra`` has no
    bias and starts at zero, so at first the output is ``base``'s, bit for bit. Used by
    :class:`StageInputTimeEmbed` for the later stages' time features and the stage index.
    """

    def __init__(self, base: nn.Linear, extra_features: int) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"expected the time network's first nn.Linear, got {type(base).__name__}")
        self.base = base
        self.extra = nn.Linear(int(extra_features), base.out_features, bias=False)
        self.extra.to(device=base.weight.device, dtype=base.weight.dtype)
        nn.init.zeros_(self.extra.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features + self.extra.in_features

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features on its last axis, expected {self.in_features}")
        f = self.base.in_features
        return self.base(x[..., :f]) + self.extra(x[..., f:])


class StageInputTimeEmbed(nn.Module):
    """Every stage's time through one shared time network, whose first linear layer is widened.

    .. math::  c = N\\big(W_0 \\phi(f(t_0)) + \\sum_{s \\ge 1} W_s \\phi(f(t_s)) + e_{stage}\\big)

    ``phi`` (``features``) is the parameter-free featuriser ``[B] -> [B, *M, F]`` and ``N`` the
    shared network after its first layer ``W_0`` (``network.<input_layer>``, a ``Linear(F -> H)``),
    which becomes a :class:`StageInputLinear` reading ``[B, *M, S F + S]``: the stages' features
    side by side and the one-hot stage index (its columns are the stage embedding). The later
    stages' columns and the stage embedding start at zero, so with ``init="pretrained"`` the output
    is the pretrained network's on stage 0, bit for bit. Against one network copy per stage
    (:class:`MultiScaleTimestepEmbed`) this costs ``(F + 1) x H`` parameters per extra stage: for
    Chroma's approximator (``F = 64``, ``H = 5120``, 5 residual layers) 0.33M instead of ~280M.

    Args:
        features: ``[B]`` model times -> ``[B, *M, F]`` (no parameters of its own are trained).
        network: the time network, ``[B, *M, F] -> [B, *M, D]``; modified in place.
        input_layer: dotted name of its first ``nn.Linear`` inside ``network``.
        num_stages: ``S``.
        init: ``"pretrained"`` (above) or ``"scratch"`` (the network's linears and the new columns
            drawn from ``N(0, 0.02)``).
        stage_embedding: include the one-hot stage index (else ``stage`` is ignored).
        time_transform: paper time to the model's time (a time convention).

    Shapes:
        ``forward(t [B, S], stage [B] long, grid=None) -> [B, *M, D]``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> features = lambda t: torch.stack([t.sin(), t.cos()], -1)[:, None].expand(-1, 3, -1)  # [B, 3, 2]
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 4))
        >>> reference = net(features(torch.tensor([0.3, 0.7])))
        >>> emb = StageInputTimeEmbed(features, net, "0", num_stages=2)
        >>> out = emb(torch.tensor([[0.3, 0.1], [0.7, 0.2]]), torch.tensor([0, 1]))
        >>> out.shape, torch.equal(out, reference)
        (torch.Size([2, 3, 4]), True)
    """

    def __init__(
        self,
        features: Callable[[Tensor], Tensor],
        network: nn.Module,
        input_layer: str,
        num_stages: int,
        *,
        init: Init = "pretrained",
        stage_embedding: bool = True,
        time_transform: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_init(init)
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        parent_name, _, leaf = input_layer.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        first = getattr(parent, leaf, None)
        if not isinstance(first, nn.Linear):
            raise TypeError(f"{type(network).__name__}.{input_layer} must be the network's first nn.Linear, got {type(first).__name__}")
        self.num_features = first.in_features
        self.num_stages = num_stages
        self.stage_embedding = bool(stage_embedding)
        widened = StageInputLinear(first, (num_stages - 1) * first.in_features + (num_stages if stage_embedding else 0))
        setattr(parent, leaf, widened)
        if init == "scratch":
            _reinit_linears(network)
        self.features = features
        self.network = network
        self.time_transform = time_transform

    def forward(self, t: Tensor, stage: Tensor | None = None, grid: Sequence[int] | None = None) -> Tensor:
        if t.ndim != 2 or t.shape[1] != self.num_stages:
            raise ValueError(f"t must have shape [B, {self.num_stages}], got {tuple(t.shape)}")
        b = t.shape[0]
        parts = [self.features(apply_time_convention(self.time_transform, t[:, s], grid)) for s in range(self.num_stages)]
        first = parts[0]
        if first.ndim < 2 or first.shape[0] != b or first.shape[-1] != self.num_features:
            raise ValueError(f"the time features are {tuple(first.shape)}, expected [B, *M, F] = [{b}, ..., {self.num_features}]")
        if any(p.shape != first.shape for p in parts):
            raise ValueError(f"every stage's time features must have one shape, got {[tuple(p.shape) for p in parts]}")
        if self.stage_embedding:
            if stage is None or stage.shape != (b,):
                raise ValueError(f"stage must have shape [{b}] when the stage embedding is enabled, got {getattr(stage, 'shape', None)}")
            onehot = nn.functional.one_hot(stage.long(), self.num_stages).to(first.dtype)
            parts.append(onehot.view(b, *([1] * (first.ndim - 2)), self.num_stages).expand(*first.shape[:-1], self.num_stages))
        return self.network(torch.cat(parts, -1))

    def extra_repr(self) -> str:
        return f"num_stages={self.num_stages}, num_features={self.num_features}"
