"""Multi-scale embeddings: per-stage patch embeddings, timestep embedders and output heads.

DFM gives every stage its own patch embedding, timestep embedder and output head (paper
section 3.4). The patch embeddings are summed, which is the same as one linear layer over the
stages packed side by side on the common token grid (see :class:`~dfm_ext.wrapping.packing.ScalePacker`):
stage ``s``'s slice of the widened weight is its ``Conv(kernel=stride=p_s)`` kernel flattened in
``(c, i, j)`` order. The output heads are likewise one widened linear layer whose output unpacks
per stage. All three modules are plain ``nn.Module``\\ s that work on their own; the adapters in
:mod:`dfm_ext.wrapping.adapter` put them inside an existing DiT.

Pretrained initialisation (paper section E) keeps the base model's behaviour on stage 0:

* patch embedding: stage-0 slice = the pretrained kernel. If stage 0's patch ``p`` is smaller
  than the pretrained patch ``P = r * p``, the pretrained kernel summed over its ``r x r``
  sub-blocks, which equals running the pretrained layer on stage 0 nearest-upsampled by ``r``;
* head: stage-0 rows = the pretrained rows, reordered from the model's channel order to the
  packer's ``(c, i, j)``; for a smaller stage-0 patch, the pretrained rows averaged over the
  ``r x r`` sub-blocks, which equals area-downsampling the pretrained output by ``r``;
* timestep embedders: stage 0 = the pretrained embedder, later stages a copy whose last linear
  layer is zero, and a zero stage-index embedding;

and every other stage's slice is zero, so at initialisation the wrapped model's stage-0
prediction equals the base model's prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dfm_ext.wrapping.packing import ScalePacker
# The timestep embedders (and the init choice every embedding takes) live in timestep_embed; re-exported.
from dfm_ext.wrapping.timestep_embed import Init, MultiScaleTimestepEmbed, check_init

PatchLike = int | Sequence[int]

__all__ = ["Init", "MultiScalePatchEmbed", "MultiScaleTimestepEmbed", "MultiScaleHead"]


def _norm_patches(patch_sizes: Sequence[PatchLike], num_stages: int) -> list[tuple[int, ...]]:
    if isinstance(patch_sizes, (str, bytes)) or not isinstance(patch_sizes, Sequence):
        raise TypeError(f"patch_sizes must be a sequence of {num_stages} patch sizes (one per stage), got {patch_sizes!r}")
    if len(patch_sizes) != num_stages:
        raise ValueError(f"expected {num_stages} patch sizes (one per stage), got {patch_sizes!r}")
    out = []
    for p in patch_sizes:
        if isinstance(p, (bool, str, bytes)) or not isinstance(p, (int, Sequence)):
            raise TypeError(f"patch size must be an int or a tuple of ints, got {p!r} in patch_sizes={patch_sizes!r}")
        q = (int(p), int(p)) if isinstance(p, int) else tuple(int(v) for v in p)
        if not q or any(v < 1 for v in q):
            raise ValueError(f"patch size {p!r} must be positive")
        out.append(q)
    if len({len(q) for q in out}) != 1:
        raise ValueError(f"patch sizes must all have the same rank, got {out}")
    return out


def _to_channel_major(weight: Tensor, channels: int, patch: tuple[int, ...], order: str, axis: int) -> Tensor:
    """Reshape a flat patch axis of ``weight`` into ``(C, *patch)`` channel-major order.

    ``order="cpq"``: the flat axis is already ``(c, i, j)`` (Conv weights, Flux, CogVideoX).
    ``order="pqc"``: channels fastest, ``(i, j, c)`` (DiT/SiT/PixArt/SD3 heads).
    """
    if order not in ("cpq", "pqc"):
        raise ValueError(f"channel order must be 'cpq' or 'pqc', got {order!r}")
    n = channels * math.prod(patch)
    if weight.shape[axis] != n:
        raise ValueError(
            f"weight axis {axis} has size {weight.shape[axis]}, expected channels x patch = "
            f"{channels} x {'x'.join(map(str, patch))} = {n}"
        )
    w = weight.movedim(axis, 0)
    rest = w.shape[1:]
    if order == "cpq":
        w = w.reshape(channels, *patch, *rest)
    else:
        w = w.reshape(*patch, channels, *rest)
        k = len(patch)
        w = w.permute(k, *range(k), *range(k + 1, w.ndim))
    return w  # [C, *patch, *rest]


def _fold_subblocks(w: Tensor, patch: tuple[int, ...], base_patch: tuple[int, ...], reduce: str) -> Tensor:
    """``w`` is ``[C, *base_patch, *rest]``; fold each ``r``-sized sub-block of the patch axes.

    Returns ``[C, *patch, *rest]`` with ``base_patch = r * patch`` per axis.
    """
    if len(patch) != len(base_patch):
        raise ValueError(f"stage patch {patch} and pretrained patch {base_patch} have different ranks")
    ratios = []
    for p, bp in zip(patch, base_patch):
        if bp % p:
            raise ValueError(
                f"stage-0 patch {patch} cannot take the pretrained patch {base_patch}: the pretrained patch "
                "must be a whole multiple of the stage-0 patch (choose stage shapes / patch_sizes so that "
                "stage 0 uses the pretrained patch or a divisor of it)"
            )
        ratios.append(bp // p)
    if all(r == 1 for r in ratios):
        return w
    k = len(patch)
    split = [w.shape[0]]
    for p, r in zip(patch, ratios):
        split += [p, r]
    w = w.reshape(*split, *w.shape[1 + k :])
    dims = [2 + 2 * i for i in range(k)]
    return w.sum(dims) if reduce == "sum" else w.mean(dims)


class MultiScalePatchEmbed(nn.Module):
    """Sum of per-stage patch embeddings, computed as one linear layer over packed stages.

    ``forward(pack(stages)) == sum_s Conv_s(stages[s])`` flattened to tokens, where ``Conv_s``
    has kernel = stride = ``p_s`` and weight :meth:`stage_weight` ``(s)``.

    Args:
        stage_channels: channels ``C_s`` of each stage.
        patch_sizes: patch of each stage, an int or ``(ph, pw)`` (``(pt, ph, pw)`` for video).
        hidden_size: token width ``D``.
        bias: whether the layer has a bias (the summed per-stage biases).

    Shapes:
        input: packed stages ``[B, sum_s C_s * prod(p_s), *grid]``; output: tokens ``[B, N, D]``
        with ``N = prod(grid)`` in row-major grid order (like ``Conv2d(...).flatten(2).transpose(1, 2)``).

    Example:
        >>> import torch
        >>> from dfm_ext.wrapping.packing import ScalePacker
        >>> packer = ScalePacker([(4, 8, 8), (4, 16, 16)], [1, 2])
        >>> embed = MultiScalePatchEmbed.from_packer(packer, hidden_size=32)
        >>> stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16)]
        >>> tokens = embed(packer.pack(stages))
        >>> tokens.shape
        torch.Size([2, 64, 32])
        >>> conv1 = torch.nn.functional.conv2d(stages[1], embed.stage_weight(1), stride=2)
        >>> conv0 = torch.nn.functional.conv2d(stages[0], embed.stage_weight(0), embed.proj.bias)
        >>> torch.allclose(tokens, (conv0 + conv1).flatten(2).transpose(1, 2), atol=1e-5)
        True
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        patch_sizes: Sequence[PatchLike],
        hidden_size: int,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.stage_channels = [int(c) for c in stage_channels]
        if not self.stage_channels or any(c < 1 for c in self.stage_channels):
            raise ValueError(f"stage_channels must be positive ints, got {stage_channels!r}")
        self.patch_sizes = _norm_patches(patch_sizes, len(self.stage_channels))
        self.hidden_size = int(hidden_size)
        widths = [c * math.prod(p) for c, p in zip(self.stage_channels, self.patch_sizes)]
        self._offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
        self.proj = nn.Linear(self._offsets[-1], self.hidden_size, bias=bias)

    @classmethod
    def from_packer(cls, packer: ScalePacker, hidden_size: int, *, bias: bool = True) -> MultiScalePatchEmbed:
        """Build for the stages of a :class:`~dfm_ext.wrapping.packing.ScalePacker`."""
        return cls([s[0] for s in packer.stage_shapes], packer.patch_sizes, hidden_size, bias=bias)

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    @property
    def in_features(self) -> int:
        return self._offsets[-1]

    def stage_slice(self, s: int) -> slice:
        """Columns of ``proj.weight`` that belong to stage ``s``."""
        return slice(self._offsets[s], self._offsets[s + 1])

    def stage_weight(self, s: int) -> Tensor:
        """Stage ``s``'s kernel as a view ``[D, C_s, *p_s]`` (a ``Conv`` weight) of ``proj.weight``."""
        w = self.proj.weight[:, self.stage_slice(s)]
        return w.view(self.hidden_size, self.stage_channels[s], *self.patch_sizes[s])

    @torch.no_grad()
    def load_stage_kernel_(self, s: int, kernel: Tensor) -> None:
        """Set stage ``s``'s slice from a patch-embed kernel ``[D, C_s, *P]``.

        A kernel with a larger patch ``P = r * p_s`` is summed over its ``r``-sized sub-blocks:
        applying the result to ``x`` equals applying ``kernel`` to ``x`` nearest-upsampled by ``r``.
        """
        c, p = self.stage_channels[s], self.patch_sizes[s]
        if kernel.ndim != 2 + len(p) or kernel.shape[0] != self.hidden_size or kernel.shape[1] != c:
            raise ValueError(
                f"kernel of shape {tuple(kernel.shape)} does not fit stage {s}: expected "
                f"[{self.hidden_size}, {c}, {', '.join('P' for _ in p)}]"
            )
        w = _fold_subblocks(kernel.movedim(0, -1), p, tuple(kernel.shape[2:]), "sum").movedim(-1, 0)
        self.stage_weight(s).copy_(w)

    @torch.no_grad()
    def reset_parameters_(self, init: Init = "scratch") -> None:
        """``"scratch"``: DiT-style init (Xavier-uniform per stage kernel, zero bias); ``"pretrained"``: zeros."""
        check_init(init)
        self.proj.weight.zero_()
        if self.proj.bias is not None:
            self.proj.bias.zero_()
        if init == "scratch":
            for s in range(self.num_stages):
                fan_in = self._offsets[s + 1] - self._offsets[s]
                bound = math.sqrt(6.0 / (fan_in + self.hidden_size))
                self.proj.weight[:, self.stage_slice(s)].uniform_(-bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        stage_channels: Sequence[int],
        patch_sizes: Sequence[PatchLike],
        *,
        init: Init = "pretrained",
        in_order: str = "cpq",
    ) -> MultiScalePatchEmbed:
        """Widen a pretrained patch embedding (``Conv2d``/``Conv3d`` with kernel = stride, or a ``Linear``).

        Args:
            conv: the pretrained layer. A ``Linear`` over flattened patches needs ``in_order``
                (``"cpq"`` channel-major like a conv weight, ``"pqc"`` channels fastest); its
                patch is taken as stage 0's patch scaled to the layer's input width.
            stage_channels, patch_sizes: as in the constructor.
            init: ``"pretrained"``: stage 0 from ``conv`` (sub-block sums for a smaller stage-0
                patch), other stages zero; ``"scratch"``: every stage fresh (DiT init).
            in_order: flattened input order of a ``Linear`` patch embedding.

        Example:
            >>> import torch
            >>> conv = torch.nn.Conv2d(4, 16, kernel_size=2, stride=2)
            >>> embed = MultiScalePatchEmbed.from_conv(conv, [4, 4], [1, 2])
            >>> x = torch.randn(1, 4, 8, 8)
            >>> up = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
            >>> ref = conv(up).flatten(2).transpose(1, 2)
            >>> packed = torch.cat([x, torch.zeros(1, 16, 8, 8)], 1)
            >>> torch.allclose(embed(packed), ref, atol=1e-5)
            True
        """
        check_init(init)
        embed_bias = getattr(conv, "bias", None) is not None
        if isinstance(conv, nn.modules.conv._ConvNd):
            kernel = conv.weight
            if tuple(conv.kernel_size) != tuple(conv.stride):
                raise ValueError(f"patch-embed conv must have kernel == stride, got {conv.kernel_size} vs {conv.stride}")
            hidden = conv.out_channels
        elif isinstance(conv, nn.Linear):
            hidden = conv.out_features
            c0 = int(stage_channels[0])
            p0 = _norm_patches(patch_sizes, len(stage_channels))[0]
            area = conv.in_features // c0
            ratio = area / math.prod(p0)
            r = round(ratio ** (1.0 / len(p0)))
            if conv.in_features % c0 or r ** len(p0) * math.prod(p0) != area:
                raise ValueError(
                    f"Linear patch embedding with {conv.in_features} inputs does not fit stage 0 "
                    f"({c0} channels, patch {p0})"
                )
            base_patch = tuple(r * p for p in p0)
            kernel = _to_channel_major(conv.weight, c0, base_patch, in_order, axis=1).movedim(-1, 0)
        else:
            raise TypeError(f"expected a Conv2d/Conv3d/Linear patch embedding, got {type(conv).__name__}")
        embed = cls(stage_channels, patch_sizes, hidden, bias=embed_bias)
        embed.to(device=kernel.device, dtype=kernel.dtype)
        embed.reset_parameters_(init)
        if init == "pretrained":
            embed.load_stage_kernel_(0, kernel.detach())
            if conv.bias is not None and embed.proj.bias is not None:  # both or neither: bias=embed_bias
                with torch.no_grad():
                    embed.proj.bias.copy_(conv.bias)
        return embed

    def forward(self, packed: Tensor) -> Tensor:
        if packed.ndim < 3 or packed.shape[1] != self.in_features:
            raise ValueError(
                f"packed input has shape {tuple(packed.shape)}, expected [B, {self.in_features}, *grid]"
            )
        return self.proj(packed.flatten(2).transpose(1, 2))

    def extra_repr(self) -> str:
        return f"stage_channels={self.stage_channels}, patch_sizes={self.patch_sizes}, hidden_size={self.hidden_size}"


class MultiScaleHead(nn.Linear):
    """Per-stage output heads as one widened ``nn.Linear`` whose output unpacks per stage.

    Output features are ordered stage by stage, each ``(c, *patch)`` channel-major, which is the
    packed layout of :class:`~dfm_ext.wrapping.packing.ScalePacker`; :meth:`to_grid` turns ``[B, N, C']``
    tokens into the packed ``[B, C', *grid]`` tensor that ``ScalePacker.unpack`` splits into stages.
    It subclasses ``nn.Linear`` so that code which finds linear layers by type or name (LoRA,
    :func:`dfm_ext.specialize`) treats it like the layer it replaced.

    Args:
        hidden_size: input width ``D``.
        stage_channels: output channels ``C_s`` per stage.
        patch_sizes: patch per stage.

    Example:
        >>> import torch
        >>> head = MultiScaleHead(32, [4, 4], [1, 2])
        >>> head.out_features, tuple(head.stage_weight(1).shape)
        (20, (4, 2, 2, 32))
        >>> MultiScaleHead.to_grid(head(torch.randn(2, 64, 32)), (8, 8)).shape
        torch.Size([2, 20, 8, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        stage_channels: Sequence[int],
        patch_sizes: Sequence[PatchLike],
        *,
        bias: bool = True,
    ) -> None:
        channels = [int(c) for c in stage_channels]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"stage_channels must be positive ints, got {stage_channels!r}")
        patches = _norm_patches(patch_sizes, len(channels))
        widths = [c * math.prod(p) for c, p in zip(channels, patches)]
        super().__init__(int(hidden_size), sum(widths), bias=bias)
        self.stage_channels = channels
        self.patch_sizes = patches
        self._offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]

    @classmethod
    def from_packer(cls, hidden_size: int, packer: ScalePacker, *, bias: bool = True) -> MultiScaleHead:
        """Build for the stages of a :class:`~dfm_ext.wrapping.packing.ScalePacker`."""
        return cls(hidden_size, [s[0] for s in packer.stage_shapes], packer.patch_sizes, bias=bias)

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    def stage_slice(self, s: int) -> slice:
        """Output rows of stage ``s``."""
        return slice(self._offsets[s], self._offsets[s + 1])

    def stage_weight(self, s: int) -> Tensor:
        """Stage ``s``'s rows as a view ``[C_s, *p_s, D]``."""
        return self.weight[self.stage_slice(s)].view(self.stage_channels[s], *self.patch_sizes[s], self.in_features)

    def stage_bias(self, s: int) -> Tensor | None:
        """Stage ``s``'s bias as a view ``[C_s, *p_s]``."""
        if self.bias is None:
            return None
        return self.bias[self.stage_slice(s)].view(self.stage_channels[s], *self.patch_sizes[s])

    @staticmethod
    def to_grid(out: Tensor, grid: Sequence[int]) -> Tensor:
        """Tokens ``[B, N, C']`` (row-major grid order) -> packed ``[B, C', *grid]``."""
        grid = tuple(int(g) for g in grid)
        if out.ndim != 3 or out.shape[1] != math.prod(grid):
            raise ValueError(f"head output has shape {tuple(out.shape)}, expected [B, {math.prod(grid)}, C]")
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], *grid)

    @torch.no_grad()
    def load_stage_linear_(
        self,
        s: int,
        weight: Tensor,
        bias: Tensor | None,
        *,
        base_patch: PatchLike,
        base_channels: int,
        order: str = "pqc",
    ) -> None:
        """Set stage ``s``'s rows from a pretrained output linear ``[prod(P) * C_base, D]``.

        Rows are reordered from ``order`` (``"pqc"``: DiT's ``(p, q, c)`` unpatchify, channels
        fastest; ``"cpq"``: channel-major) to ``(c, p, q)``. Only the first ``C_s`` of the
        ``C_base`` channels are kept (``learn_sigma`` models output ``[velocity, sigma]``). For a
        pretrained patch ``P = r * p_s`` the rows are averaged over ``r``-sized sub-blocks, which
        equals area-downsampling the pretrained output by ``r``.
        """
        bp = _norm_patches([base_patch], 1)[0]
        c = self.stage_channels[s]
        if base_channels < c:
            raise ValueError(f"the pretrained head has {base_channels} channels, stage {s} needs {c}")
        if weight.ndim != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"pretrained head weight has shape {tuple(weight.shape)}, expected [*, {self.in_features}]")
        w = _to_channel_major(weight, base_channels, bp, order, axis=0)[:c]
        self.stage_weight(s).copy_(_fold_subblocks(w, self.patch_sizes[s], bp, "mean"))
        stage_bias = self.stage_bias(s)
        if stage_bias is not None:
            if bias is None:
                stage_bias.zero_()
            else:
                b = _to_channel_major(bias, base_channels, bp, order, axis=0)[:c]
                stage_bias.copy_(_fold_subblocks(b, self.patch_sizes[s], bp, "mean"))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        stage_channels: Sequence[int],
        patch_sizes: Sequence[PatchLike],
        *,
        base_patch: PatchLike,
        base_channels: int | None = None,
        order: str = "pqc",
        init: Init = "pretrained",
    ) -> MultiScaleHead:
        """Widen a pretrained output linear ``D -> prod(P) * C_base``.

        ``init="pretrained"``: stage 0 from ``linear`` (see :meth:`load_stage_linear_`), others
        zero; ``init="scratch"``: all zero (DiT zero-initialises its output layer).

        Example:
            >>> import torch
            >>> base = torch.nn.Linear(16, 2 * 2 * 3)  # DiT head: patch 2, 3 channels, (p, q, c)
            >>> head = MultiScaleHead.from_linear(base, [3, 3], [2, 4], base_patch=2)
            >>> tokens = torch.randn(1, 4, 16)
            >>> ref = base(tokens).view(1, 4, 2, 2, 3).permute(0, 1, 4, 2, 3)  # -> (c, p, q)
            >>> torch.allclose(head(tokens)[..., :12], ref.reshape(1, 4, 12), atol=1e-6)
            True
        """
        check_init(init)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear output projection, got {type(linear).__name__}")
        bp = _norm_patches([base_patch], 1)[0]
        if base_channels is None:
            if linear.out_features % math.prod(bp):
                raise ValueError(f"output linear with {linear.out_features} outputs does not fit patch {bp}")
            base_channels = linear.out_features // math.prod(bp)
        head = cls(linear.in_features, stage_channels, patch_sizes, bias=linear.bias is not None)
        head.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
        if init == "pretrained":
            head.load_stage_linear_(
                0, linear.weight, linear.bias, base_patch=bp, base_channels=base_channels, order=order
            )
        return head

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stage_channels={self.stage_channels}, patch_sizes={self.patch_sizes}"
