"""A compact, class-conditional reference DiT (Peebles & Xie, 2023) predicting flow velocities.

The structure and module names follow the original DiT so that code written against it (and
:func:`dfm_ext.specialize`, which targets layers by name) works unchanged: ``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``pos_embed``, ``blocks[i].{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2, adaLN_modulation}``, ``final_layer.{norm_final, linear,
adaLN_modulation}``. Differences from the original: time is the paper's flow time ``t`` in
``[0, 1]`` (``t = 1`` is data; the sinusoidal embedder sees ``1000 t``), the output is a velocity,
attention is fused (``F.scaled_dot_product_attention``), the input may be non-square, and
``rope=True`` replaces the fixed 2-D sin-cos positions by 2-D rotary embeddings (paper A.1).

Label dropout for classifier-free guidance happens in ``y_embedder`` in training mode with
probability ``class_dropout_prob`` (0 disables it); pass ``force_drop_ids`` or a ``generator``
to ``forward`` for reproducible dropout. The null class is ``num_classes``. Labels outside
``[0, num_classes]`` raise a ``ValueError`` when they are on the CPU (eager); on an accelerator
or under ``torch.compile`` the check is a device-side assert that does not sync
(:mod:`dfm_ext.validation`), so ``forward`` compiles with ``fullgraph=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from collections.abc import Iterable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from dfm_ext.models.dit_layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    as_linear,
    rope_2d,
    sincos_pos_embed_2d,
)
from dfm_ext.specialization import checkpoint

# The layers live in dit_layers; the ones users build DiT variants from are re-exported here.
__all__ = [
    "DiTConfigBase", "DiTConfig", "DiT", "DiTBlock", "TimestepEmbedder", "LabelEmbedder", "PatchEmbed", "FinalLayer",
    "rope_2d", "sincos_pos_embed_2d",
]  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "S/4": dict(hidden_size=384, depth=12, num_heads=6, patch_size=4),
    "S/8": dict(hidden_size=384, depth=12, num_heads=6, patch_size=8),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "B/4": dict(hidden_size=768, depth=12, num_heads=12, patch_size=4),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "L/4": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=4),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
    "XL/4": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=4),
}


_Config = TypeVar("_Config", bound="DiTConfigBase")


@dataclass(frozen=True)
class DiTConfigBase:
    """The fields and checks :class:`DiTConfig` and :class:`~dfm_ext.models.video_dit.VideoDiTConfig` share.

    Args:
        input_size: the latent size (each subclass says its form; ``__post_init__`` normalises it).
        patch_size: spatial patch ``p``.
        in_channels: latent channels ``C``.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        num_classes: number of classes; label ``num_classes`` is the null (unconditional) class.
        class_dropout_prob: label dropout probability in training (0 disables it).
        learn_sigma: output ``2 C`` channels (the first ``C`` are the velocity), as in DiT.

    A subclass supplies the three hooks on the input size (``_normalised_input_size``,
    ``_check_divisible``, ``_check_head_dim``); the checks run in ``__post_init__``.
    """

    input_size: Any = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", self._normalised_input_size(self.input_size))
        for name in ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._check_divisible()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        self._check_head_dim(self.hidden_size // self.num_heads)
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    def _normalised_input_size(self, size: Any) -> Any:
        raise NotImplementedError

    def _check_divisible(self) -> None:
        raise NotImplementedError

    def _check_head_dim(self, head_dim: int) -> None:
        raise NotImplementedError

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @classmethod
    def _preset_fields(cls, name: str) -> dict[str, Any]:
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[name])

    @classmethod
    def preset(cls: type[_Config], name: str, **overrides: Any) -> _Config:
        """A named size: ``"tiny"``, ``"S/2"``, ``"S/4"``, ``"S/8"``, ``"B/2"``, ``"B/4"``, ``"L/2"``, ``"L/4"``, ``"XL/2"``, ``"XL/4"``."""
        base = cls._preset_fields(name)
        return replace(cls(**base), **overrides) if overrides else cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        d = asdict(self)
        if isinstance(d["input_size"], tuple):
            d["input_size"] = list(d["input_size"])
        return d

    @classmethod
    def from_dict(cls: type[_Config], d: dict[str, Any]) -> _Config:
        """The config :meth:`to_dict` wrote; unknown keys are refused."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class DiTConfig(DiTConfigBase):
    """Configuration of :class:`DiT`: the transformer fields of :class:`DiTConfigBase` and

    Args:
        input_size: latent size ``H`` (square) or ``(H, W)``; the token grid is ``(H / p, W / p)``.
        rope: 2-D rotary position embeddings instead of the fixed sin-cos table.
        num_frames: reserved for video; must be ``None`` for now.

    Example:
        >>> cfg = DiTConfig.preset("S/2", in_channels=4)
        >>> cfg.hidden_size, cfg.depth, cfg.grid_size
        (384, 12, (16, 16))
    """

    input_size: int | tuple[int, int] = 32
    rope: bool = False
    num_frames: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames is not None:
            raise NotImplementedError("video DiT (num_frames) is not implemented yet; leave num_frames=None")

    def _normalised_input_size(self, size: Any) -> int | tuple[int, int]:
        if isinstance(size, (list, tuple)):
            hw = tuple(int(s) for s in size)
            if len(hw) != 2:
                raise ValueError(f"input_size must be an int or (H, W), got {size!r}")
            return hw
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"input_size must be an int or (H, W), got {size!r} ({type(size).__name__})")
        return size

    def _check_divisible(self) -> None:
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")

    def _check_head_dim(self, head_dim: int) -> None:
        if self.rope and head_dim % 4:
            raise ValueError(f"rope needs a head dim divisible by 4, got {head_dim}")

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.input_size
        return (s, s) if isinstance(s, int) else tuple(s)  # type: ignore[return-value]

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return (h // self.patch_size, w // self.patch_size)


class DiT(nn.Module):
    """Class-conditional DiT velocity predictor.

    ``forward(x [B, C, H, W], t [B] in [0, 1] (t = 1 data), y [B] long) -> v [B, C_out, H, W]``.

    Activation checkpointing (``model.enable_gradient_checkpointing()``, as in diffusers; the
    ``gradient_checkpointing`` attribute, off by default, is not part of the config): in training
    each block's activations are freed after the forward and recomputed in backward, which saves
    memory for about one extra forward of compute; gradients are unchanged.

    Example:
        >>> import torch
        >>> model = DiT(DiTConfig.preset("tiny", input_size=(8, 16), num_classes=3))
        >>> x, t, y = torch.randn(2, 4, 8, 16), torch.rand(2), torch.tensor([0, 2])
        >>> model(x, t, y).shape
        torch.Size([2, 4, 8, 16])
    """

    config_class: type = DiTConfig
    #: How ``forward`` reads time, declared for :func:`dfm_ext.wrap_dit` (a name of
    #: :func:`dfm_ext.process.conventions.time_transform`): the embedder sees ``1000 t`` with ``t = 1`` data,
    #: and the output is the velocity ``x - noise``. Models that only share DiT's module names
    #: declare nothing, and ``wrap_dit`` then asks for ``time_convention=``.
    dfm_time_convention: str = "x1000"

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.x_embedder = self._patch_embed(config)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        pos = self._fixed_pos_embed(config)
        if pos is None:
            self.pos_embed = None
        else:
            self.register_buffer("pos_embed", pos, persistent=True)
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, p, config.out_channels)
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.gradient_checkpointing = False
        self.initialize_weights()

    def enable_gradient_checkpointing(self) -> None:
        """Run the blocks under activation checkpointing when gradients are needed (diffusers' name)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        """Run the blocks plainly (the default)."""
        self.gradient_checkpointing = False

    # The four hooks below (and unpatchify) are what a DiT variant changes; see video_models.VideoDiT.
    def _patch_embed(self, config: Any) -> nn.Module:
        return PatchEmbed(config.image_size, config.patch_size, config.in_channels, config.hidden_size)

    def _fixed_pos_embed(self, config: Any) -> Tensor | None:
        """``[1, N, D]`` sin-cos table, or ``None`` when positions come from RoPE."""
        return None if config.rope else sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None]

    def _rope(self, head_dim: int, grid: tuple[int, ...], device: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        return rope_2d(head_dim, grid, device=device, dtype=dtype) if self.config.rope else None

    def _token_grid(self, x: Tensor) -> tuple[int, ...]:
        """Check ``x`` against the config and return its token grid ``(Gh, Gw)``."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        if not cfg.rope and tuple(x.shape[2:]) != cfg.image_size:
            raise ValueError(f"x has spatial size {tuple(x.shape[2:])}, the model was built for {cfg.image_size}")
        if x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
            raise ValueError(f"x spatial size {tuple(x.shape[2:])} is not divisible by patch {cfg.patch_size}")
        return (x.shape[2] // cfg.patch_size, x.shape[3] // cfg.patch_size)

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The original DiT initialisation: Xavier linears, adaLN-Zero, zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The patch projection is a Conv2d here and a Conv3d in VideoDiT (see _patch_embed).
        proj = cast("nn.Conv2d | nn.Conv3d", self.x_embedder.get_submodule("proj"))
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(as_linear(self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(as_linear(self.t_embedder.mlp[2]).weight, std=0.02)
        modulated: list[DiTBlock | FinalLayer] = [*cast("Iterable[DiTBlock]", self.blocks), self.final_layer]
        for layer in modulated:
            nn.init.zeros_(as_linear(layer.adaLN_modulation[-1]).weight)
            nn.init.zeros_(as_linear(layer.adaLN_modulation[-1]).bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def rope_for_grid(
        self, grid: tuple[int, ...], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor] | None:
        """RoPE cosines/sines for a token grid (cached), or ``None`` without RoPE."""
        key = (tuple(grid), str(device), dtype)
        if key not in self._rope_cache:
            head_dim = self.config.hidden_size // self.config.num_heads
            rope = self._rope(head_dim, tuple(grid), device, dtype)
            if rope is None:
                return None
            self._rope_cache[key] = rope
        return self._rope_cache[key]

    def unpatchify(self, x: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Tokens ``[B, N, p * p * C]`` in ``(p, q, c)`` order -> ``[B, C, Gh * p, Gw * p]``."""
        p, c = self.config.patch_size, self.config.out_channels
        gh, gw = grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        force_drop_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        grid = self._token_grid(x)
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"t must have shape [{b}], got {tuple(t.shape)}")
        if y.shape != (b,) or y.dtype != torch.long:
            raise ValueError(f"y must be a long tensor of shape [{b}], got {tuple(y.shape)} {y.dtype}")
        h = self.x_embedder(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embedder(t * 1000) + self.y_embedder(y, self.training, force_drop_ids, generator)
        rope = self.rope_for_grid(grid, x.device, h.dtype)
        for block in self.blocks:
            h = checkpoint(block, h, c, rope) if self.gradient_checkpointing and torch.is_grad_enabled() else block(h, c, rope)
        return self.unpatchify(self.final_layer(h, c), grid)
