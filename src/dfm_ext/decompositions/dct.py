"""``DCTDecomposition``: block DCT, frequency bands as stages, each stage back in the spatial domain.

The sample is cut into ``b x b`` blocks with the orthonormal 2-D DCT-II per block
(``Y = D^T X D``; ``D`` is torch-dct's matrix). Band boundaries ``k_0 < k_1 < ... < k_{S-1} = b``
split the coefficients by ``max(u, v)``: stage ``s`` holds those with ``k_{s-1} <= max(u, v) < k_s``.

Band ``s`` only uses the top-left ``k_s x k_s`` coefficients of each block, so it is stored as an
image of ``k_s / b`` of the input resolution: the inverse ``k_s``-point DCT of those coefficients,
scaled by ``k_s / b`` (``sqrt(k_s / b)`` per axis). With ``k_0 = 1`` stage 0 is the DC term per
block divided by ``b``, i.e. the block mean: an ``H/b x W/b`` image. The last stage (``k = b``) is
a full-resolution image.

Keeping the corner ``u, v < k`` and inverting at ``k`` points is one ``[k, b]`` matrix per axis
(``down``); zero-padding coefficients from ``k`` to ``K`` is one ``[K, k]`` matrix (``up``). Since a
band is "corner ``k_s`` minus corner ``k_{s-1}``", ``x_s = down_s(x) - up(down_{s-1}(x))`` and
``xbar_s = up(xbar_{s-1}) + x_s``: the Laplacian-pyramid structure, with DCT resamplers. The maps
are products of torch-dct matrices built in float64, applied as matrix products (faster than an
FFT at these sizes, valid in any dtype), so ``recompose`` is exact to round-off and
``preview(stages, s)`` is the sample band-limited to ``k_s``, at ``k_s / b`` of the resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dfm_ext.decompositions.resample import (
    HALF_DTYPES,
    check_divisible,
    check_shape,
    fold_frames,
    unfold_frames,
)
from dfm_ext.decompositions.base import check_sample, outside_autocast
from dfm_ext.decompositions.pyramid import ResidualPyramid

__all__ = ["DCTDecomposition", "dct_matrix"]


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` of torch-dct: ``torch_dct.dct(x, norm="ortho") == x @ D``.

    Built in float64 and then cast, so lower precisions get correctly rounded entries.

    Example:
        >>> D = dct_matrix(4)
        >>> torch.allclose(D @ D.T, torch.eye(4, dtype=torch.float64))
        True
    """
    import torch_dct

    d = torch_dct.dct(torch.eye(n, dtype=torch.float64), norm="ortho")
    return d.to(dtype=dtype, device=device)


class DCTDecomposition(ResidualPyramid):
    """Block-DCT frequency bands of images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` (per frame).

    Args:
        block_size: DCT block ``b`` (default 4; the paper tried 4 and 8). ``H`` and ``W`` must be
            divisible by ``b``.
        bands: upper band boundaries ``k_0 < ... < k_{S-2}`` in ``[1, b)`` (the last stage ends at
            ``b``). Default ``(1,)``: stage 0 = the block DC terms (the ``H/b x W/b`` block-mean
            image), stage 1 = everything else at full resolution. ``block_size=8, bands=(1, 4)``
            gives three stages at ``H/8``, ``H/2`` and ``H``.

    Shapes:
        ``decompose``: ``[B, C, H, W]`` -> stage ``s`` ``[B, C, H k_s / b, W k_s / b]``.

    Example:
        >>> import torch
        >>> dct = DCTDecomposition(block_size=4)
        >>> x = torch.randn(2, 3, 8, 12)
        >>> stages = dct.decompose(x)
        >>> [tuple(s.shape) for s in stages]
        [(2, 3, 2, 3), (2, 3, 8, 12)]
        >>> torch.allclose(stages[0], torch.nn.functional.avg_pool2d(x, 4), atol=1e-6)  # block means
        True
        >>> torch.allclose(dct.recompose(stages), x, atol=1e-5)
        True
    """

    def __init__(self, block_size: int = 4, bands: Sequence[int] = (1,)) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {block_size!r}")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (two stages need two frequencies), got {block_size}")
        if isinstance(bands, int | str) or not isinstance(bands, Sequence):
            raise TypeError(f"bands must be a sequence of ints such as (1,), got {bands!r}")
        bands = tuple(bands)
        if any(isinstance(k, bool) or not isinstance(k, int) for k in bands):
            raise TypeError(f"bands must contain ints, got {bands!r}")
        if not bands:
            raise ValueError("bands must name at least one boundary, such as (1,)")
        if any(not 1 <= k < block_size for k in bands) or any(a >= b for a, b in zip(bands, bands[1:])):
            raise ValueError(
                f"bands must be strictly increasing boundaries in [1, block_size) = [1, {block_size}), got {bands}"
            )
        self.block_size = block_size
        self.bands: tuple[int, ...] = bands
        self._sizes: tuple[int, ...] = (*bands, block_size)  # k_s: stage s keeps k_s x k_s coefficients
        self._matrices: dict[tuple[str, int, int, torch.dtype, torch.device], Tensor] = {}

    @property
    def num_stages(self) -> int:
        return len(self._sizes)

    def _matrix(self, kind: str, n_out: int, n_in: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Per-axis block maps ``[n_out, n_in]``, built in float64 and cached per dtype and device.

        ``down`` (``b -> k``): keep the first ``k`` DCT coefficients, inverse ``k``-point DCT:
        ``sqrt(k / b) D_k D_b[:, :k]^T``. ``up`` (``k -> K``): zero-pad the ``k`` coefficients to
        ``K``: ``sqrt(K / k) D_K[:, :k] D_k^T``. (``D_n``: torch-dct's matrix, ``dct(x) = x @ D_n``,
        so coefficients are ``D_n^T x`` and the inverse is ``D_n c``.)
        """
        key = (kind, n_out, n_in, dtype, device)
        if key not in self._matrices:
            if kind == "down":
                m = (n_out / n_in) ** 0.5 * dct_matrix(n_out) @ dct_matrix(n_in)[:, :n_out].T
            else:
                m = (n_out / n_in) ** 0.5 * dct_matrix(n_out)[:, :n_in] @ dct_matrix(n_in).T
            self._matrices[key] = m.to(dtype=dtype, device=device)
        return self._matrices[key]

    @staticmethod
    def _blockwise(x: Tensor, m: Tensor) -> Tensor:
        """Apply ``m`` ``[n_out, n_in]`` to every ``n_in``-block of both spatial axes of ``[N, C, H, W]``.

        One matmul per axis on the pixel layout (no block transposes); separable, so the 2-D
        coefficient corner ``u, v < k`` is exactly what the two 1-D maps keep.
        """
        n_out, n_in = m.shape
        nb, c, h, w = x.shape
        y = x.reshape(nb, c, h, w // n_in, n_in) @ m.T  # along W
        y = m @ y.reshape(nb, c, h // n_in, n_in, w // n_in * n_out)  # along H
        return y.reshape(nb, c, h // n_in * n_out, w // n_in * n_out)

    def _down(self, x: Tensor, k: int) -> Tensor:
        """The sample band-limited to ``max(u, v) < k``, as an image at ``k / b`` resolution."""
        b = self.block_size
        if k == b:
            return x
        if k == 1:
            return F.avg_pool2d(x, b)  # the DC term over b is the block mean; pooling is faster
        return self._blockwise(x, self._matrix("down", k, b, x.dtype, x.device))

    def _up(self, x: Tensor, k: int, k_to: int) -> Tensor:
        """DCT-domain zero padding from ``k`` to ``k_to`` coefficients per block."""
        if k == 1:
            # A lone DC coefficient inverts to a constant block: nearest-neighbour repeat.
            nb, c, h, w = x.shape
            return x[:, :, :, None, :, None].expand(nb, c, h, k_to, w, k_to).reshape(nb, c, h * k_to, w * k_to)
        return self._blockwise(x, self._matrix("up", k_to, k, x.dtype, x.device))

    def _check(self, shape: tuple[int, ...]) -> None:
        check_divisible(shape, (-2, -1), self.block_size, f"{self!r}")

    def _ratio(self, s: int, ndim: int) -> tuple[tuple[int, int], tuple[int, int]]:
        k = self._sizes[s]
        return (k, k), (self.block_size, self.block_size)

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Full stage shapes (with batch) for a sample of ``shape``.

        Example:
            >>> DCTDecomposition(block_size=8, bands=(1, 4)).stage_shapes((2, 4, 32, 16))
            [(2, 4, 4, 2), (2, 4, 16, 8), (2, 4, 32, 16)]
        """
        shape = check_shape(shape)
        self._check(shape)
        b = self.block_size
        return [shape[:-2] + (shape[-2] // b * k, shape[-1] // b * k) for k in self._sizes]

    @outside_autocast
    def decompose(self, x: Tensor) -> list[Tensor]:
        """Split ``x`` into ``S`` frequency bands, each an image at its stage's resolution."""
        x = check_sample(x)
        if x.dtype in HALF_DTYPES:
            return [s.to(x.dtype) for s in self.decompose(x.float())]
        self.stage_shapes(x.shape)
        frames = fold_frames(x)
        # Band s = corner k_s minus corner k_{s-1}, i.e. d_s - up(d_{s-1}) with d_s the
        # band-limited image: the same telescoping structure as a Laplacian pyramid.
        d = [self._down(frames, k) for k in self._sizes]
        k = self._sizes
        stages = [d[0]] + [d[s] - self._up(d[s - 1], k[s - 1], k[s]) for s in range(1, len(d))]
        return [unfold_frames(st, x.shape) for st in stages]

    def _upsample(self, xbar: Tensor, s: int, full: tuple[int, ...]) -> Tensor:
        return self._up(xbar, self._sizes[s - 1], self._sizes[s])

    def __repr__(self) -> str:
        return f"DCTDecomposition(block_size={self.block_size}, bands={self.bands})"
