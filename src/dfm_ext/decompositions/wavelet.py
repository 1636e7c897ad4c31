"""``WaveletDecomposition``: a discrete wavelet transform (pytorch-wavelets), stages in the spatial domain.

A ``J``-level 2-D DWT gives the approximation ``LL_J`` and details ``D_1`` (finest) .. ``D_J``.
Write ``P_j`` for the partial reconstruction at level ``j`` (``P_J = LL_J``,
``P_{j-1} = IDWT(P_j, D_j)``, ``P_0 = x``) and ``A_j = P_j / 2^j``, the image at ``1 / 2^j`` of
the input resolution (for haar, ``A_j`` is exactly the ``2^j x 2^j`` block mean of ``x``). Stage
``s`` sits at level ``r_s`` (``r_0 = J > r_1 > ... > r_{S-1} = 0``)::

    x_0 = A_J                                      (the coarse image)
    x_s = A_{r_s} - up(A_{r_{s-1}})                (details of levels r_{s-1} .. r_s + 1 only)

with ``up`` the inverse DWT with zero details (rescaled), which makes ``x_s`` the inverse DWT of
that stage's bands alone. Recomposition accumulates ``xbar_s = up(xbar_{s-1}) + x_s`` exactly like
a Laplacian pyramid, and ``xbar_{S-1} = x`` because the orthogonal DWT reconstructs perfectly.

For haar the stages have a closed form (``A_j`` is the block mean, ``up`` repeats pixels: the
same stages as ``LaplacianPyramid(down="area", up="nearest")``), which is used because it is
much faster on CPU; every other wavelet runs through pytorch-wavelets' DWT.

pytorch-wavelets' filters are float32 unless built under a float64 default dtype; here they are
rebuilt from PyWavelets' float64 coefficients for every ``(dtype, device)`` used, so float64 is
exact to round-off and gradients check in float64.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import sys
import types
from collections.abc import Sequence
from typing import IO, Any

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

__all__ = ["WaveletDecomposition"]

_MODES = ("periodization", "zero", "symmetric", "reflect", "periodic")


@functools.cache
def _pytorch_wavelets() -> Any:
    """Import ``pytorch_wavelets`` whether or not ``pkg_resources`` (setuptools < 81) exists.

    Its package ``__init__`` imports the DTCWT coefficient loader, which does
    ``from pkg_resources import resource_stream`` at import time. setuptools >= 81 removed
    ``pkg_resources`` (and older versions warn on import), so unless the real module is already
    loaded, a minimal stand-in serves the import and is removed again straight afterwards.
    """
    if "pytorch_wavelets" in sys.modules:
        return sys.modules["pytorch_wavelets"]
    real = sys.modules.get("pkg_resources")
    if real is not None:
        import pytorch_wavelets

        return pytorch_wavelets
    missing = object()
    previous = sys.modules.get("pkg_resources", missing)
    stand_in = types.ModuleType("pkg_resources")
    stand_in.__doc__ = "dfm_ext stand-in: only resource_stream, for pytorch_wavelets' DTCWT loader."

    def resource_stream(package: str, resource: str) -> IO[bytes]:  # the one name the loader uses
        return importlib.resources.files(package).joinpath(resource).open("rb")

    stand_in.resource_stream = resource_stream  # type: ignore[attr-defined]  # a module built at run time
    sys.modules["pkg_resources"] = stand_in
    try:
        import pytorch_wavelets
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            if previous is missing:
                del sys.modules["pkg_resources"]
            else:
                sys.modules["pkg_resources"] = previous  # type: ignore[assignment]
    return pytorch_wavelets


def _check_wave(wave: object) -> str:
    if not isinstance(wave, str):
        raise TypeError(f"wave must be a wavelet name such as 'haar' or 'db2', got {wave!r}")
    if wave != "haar" and not re.fullmatch(r"db([1-9]|[1-3][0-9])", wave):
        raise ValueError(
            f"unknown wavelet {wave!r}: use 'haar' or a Daubechies wavelet 'db1' .. 'db38' "
            "(orthogonal, so the inverse is exact)"
        )
    if wave.startswith("db") and int(wave[2:]) > 38:
        raise ValueError(f"unknown wavelet {wave!r}: PyWavelets defines 'db1' .. 'db38'")
    return wave


class WaveletDecomposition(ResidualPyramid):
    """Wavelet decomposition of images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` (per frame).

    Args:
        wave: ``"haar"`` (default) or a Daubechies wavelet ``"db1"`` .. ``"db38"``.
        levels: DWT levels ``J`` (default 1). Stage 0 is the approximation at ``H / 2^J``.
        num_stages: ``2 .. J + 1`` (default ``J + 1``). Detail levels are grouped: stages
            ``1 .. S-2`` take one level each (coarsest first) and the last stage takes the rest,
            e.g. ``levels=2, num_stages=2`` gives stages at ``H/4`` and ``H``.
        mode: boundary handling, ``"periodization"`` (default). Only modes with correct gradients
            and exact inverses at dyadic sizes are accepted: ``periodization`` for every wavelet;
            for haar (no padding at even sizes) also ``zero``, ``symmetric``, ``reflect``,
            ``periodic``, which are then the same transform.
        factors: instead of ``levels``/``num_stages``: per-stage downsampling factors, powers of
            two, strictly decreasing, ending at 1, e.g. ``(4, 1)`` or ``(8, 2, 1)``.

    Shapes:
        ``decompose``: ``[B, C, H, W]`` -> ``[[B, C, H/f_0, W/f_0], ..., [B, C, H, W]]`` with
        ``f_s = 2^{r_s}`` (see :attr:`factors`); ``H`` and ``W`` divisible by ``2^J``, and at least
        the filter length at every level.

    Example:
        >>> import torch
        >>> dwt = WaveletDecomposition(levels=2)
        >>> dwt
        WaveletDecomposition(wave='haar', levels=2, num_stages=3, mode='periodization', factors=(4, 2, 1))
        >>> x = torch.randn(2, 3, 16, 8)
        >>> stages = dwt.decompose(x)
        >>> [tuple(s.shape) for s in stages]
        [(2, 3, 4, 2), (2, 3, 8, 4), (2, 3, 16, 8)]
        >>> torch.allclose(stages[0], torch.nn.functional.avg_pool2d(x, 4), atol=1e-6)  # haar: block mean
        True
        >>> torch.allclose(dwt.recompose(stages), x, atol=1e-5)
        True
    """

    def __init__(
        self,
        wave: str = "haar",
        levels: int | None = None,
        num_stages: int | None = None,
        mode: str = "periodization",
        *,
        factors: Sequence[int] | None = None,
    ) -> None:
        self.wave = _check_wave(wave)
        if not isinstance(mode, str) or mode not in _MODES:
            raise ValueError(f"unknown boundary mode {mode!r}; use 'periodization'")
        if mode != "periodization" and wave not in ("haar", "db1"):
            raise ValueError(
                f"mode={mode!r} is not supported for wave={wave!r}: pytorch-wavelets' gradients are wrong "
                "for filters longer than 2 in 'symmetric'/'reflect'/'periodic', and 'zero' changes the "
                "coefficient sizes so stages would not sit at H / 2^j; use mode='periodization'"
            )
        self.mode = mode
        if factors is not None:
            if levels is not None or num_stages is not None:
                raise ValueError("give either factors or levels/num_stages, not both")
            self._levels_of_stages = self._levels_from_factors(factors)
        else:
            self._levels_of_stages = self._levels_from_counts(1 if levels is None else levels, num_stages)
        self.levels: int = self._levels_of_stages[0]
        self.factors: tuple[int, ...] = tuple(2**r for r in self._levels_of_stages)
        import pywt

        w = pywt.Wavelet(self.wave)
        self._filters64 = {
            name: torch.tensor(list(getattr(w, name)), dtype=torch.float64)
            for name in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")
        }
        self.filter_length: int = int(w.dec_len)
        # Haar in the spatial domain has a closed form: A_j is the 2^j x 2^j block mean and
        # up(A) = 2 * IDWT(A, 0) repeats each pixel, so the stages equal an area-down /
        # nearest-up Laplacian pyramid. Pooling and repeating run ~10x faster on CPU than
        # pytorch-wavelets' grouped (transposed) convolutions; tests check both paths agree.
        self.closed_form: bool = self.wave in ("haar", "db1")
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Any, tuple[Tensor, ...]]] = {}

    @staticmethod
    def _levels_from_counts(levels: object, num_stages: object) -> tuple[int, ...]:
        if isinstance(levels, bool) or not isinstance(levels, int):
            raise TypeError(f"levels must be an int, got {levels!r}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if num_stages is None:
            num_stages = levels + 1
        if isinstance(num_stages, bool) or not isinstance(num_stages, int):
            raise TypeError(f"num_stages must be an int, got {num_stages!r}")
        if not 2 <= num_stages <= levels + 1:
            raise ValueError(f"num_stages must be in [2, levels + 1] = [2, {levels + 1}], got {num_stages}")
        return tuple(levels - s for s in range(num_stages - 1)) + (0,)

    @staticmethod
    def _levels_from_factors(factors: object) -> tuple[int, ...]:
        if isinstance(factors, int | str) or not isinstance(factors, Sequence):
            raise TypeError(f"factors must be a sequence of ints such as (4, 1), got {factors!r}")
        out = tuple(factors)
        if any(isinstance(f, bool) or not isinstance(f, int) for f in out):
            raise TypeError(f"factors must contain ints, got {out!r}")
        if len(out) < 2 or any(f < 1 or f & (f - 1) for f in out):
            raise ValueError(f"factors must be at least two powers of two, such as (4, 1), got {out}")
        if out[-1] != 1 or any(a <= b for a, b in zip(out, out[1:])):
            raise ValueError(f"factors must be strictly decreasing and end at 1, got {out}")
        return tuple(f.bit_length() - 1 for f in out)

    @property
    def num_stages(self) -> int:
        return len(self._levels_of_stages)

    def _transforms(self, dtype: torch.dtype, device: torch.device) -> tuple[Any, tuple[Tensor, ...]]:
        """pytorch-wavelets' ``DWTForward`` (``J`` levels) and synthesis filters, float64-exact, cast to ``dtype``.

        Synthesis calls ``pytorch_wavelets.dwt.lowlevel.sfb2d`` (plain autograd) rather than
        ``DWTInverse``: the latter's custom backward returns no gradient for the details when the
        low-pass input needs none, which is exactly the case for a detail stage (zero low-pass).
        """
        key = (dtype, device)
        if key not in self._cache:
            pw = _pytorch_wavelets()
            fwd = pw.DWTForward(J=self.levels, wave=self.wave, mode=self.mode)
            f = {k: v.to(dtype=dtype, device=device) for k, v in self._filters64.items()}
            # Same layouts as pytorch_wavelets.dwt.lowlevel.prep_filt_afb2d / prep_filt_sfb2d:
            # analysis filters time-reversed (conv2d correlates), synthesis filters as they are.
            lo, hi = f["dec_lo"].flip(0), f["dec_hi"].flip(0)
            fwd.h0_col, fwd.h1_col = lo.reshape(1, 1, -1, 1), hi.reshape(1, 1, -1, 1)
            fwd.h0_row, fwd.h1_row = lo.reshape(1, 1, 1, -1), hi.reshape(1, 1, 1, -1)
            g0, g1 = f["rec_lo"], f["rec_hi"]
            synth = (g0.reshape(1, 1, -1, 1), g1.reshape(1, 1, -1, 1), g0.reshape(1, 1, 1, -1), g1.reshape(1, 1, 1, -1))
            self._cache[key] = (fwd, synth)
        return self._cache[key]

    def _check(self, shape: tuple[int, ...]) -> None:
        check_divisible(shape, (-2, -1), self.factors[0], f"{self!r}")
        for d in (-2, -1):
            coarsest_input = shape[d] // 2 ** (self.levels - 1)
            if coarsest_input < self.filter_length:
                raise ValueError(
                    f"{self!r}: size {shape[d]} of the sample shape {shape} is too small: the last DWT level "
                    f"sees {coarsest_input} pixels, fewer than the filter length {self.filter_length} of "
                    f"{self.wave!r} (periodization would alias); use fewer levels or a shorter wavelet"
                )

    def _ratio(self, s: int, ndim: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (1, 1), (self.factors[s], self.factors[s])

    def stage_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Full stage shapes (with batch) for a sample of ``shape``.

        Example:
            >>> WaveletDecomposition(levels=2, num_stages=2).stage_shapes((1, 4, 32, 16))
            [(1, 4, 8, 4), (1, 4, 32, 16)]
        """
        shape = check_shape(shape)
        self._check(shape)
        return [shape[:-2] + (shape[-2] // f, shape[-1] // f) for f in self.factors]

    def _synthesize(self, synth: tuple[Tensor, ...], low: Tensor, highs: list[Tensor | None]) -> Tensor:
        """Inverse DWT over ``len(highs)`` levels (``highs`` finest first; ``None`` = zero details)."""
        sfb2d = _pytorch_wavelets().dwt.lowlevel.sfb2d
        x = low
        for h in reversed(highs):
            if h is None:
                h = x.new_zeros(x.shape[0], x.shape[1], 3, x.shape[-2], x.shape[-1])
            x = sfb2d(x, h[:, :, 0], h[:, :, 1], h[:, :, 2], synth, mode=self.mode)
        return x

    def _up(self, synth: tuple[Tensor, ...], a: Tensor, levels: int) -> Tensor:
        """``A_r`` -> its part of ``A_{r - levels}``: inverse DWT with zero details, rescaled."""
        return self._synthesize(synth, a, [None] * levels) * 2.0**levels

    @outside_autocast
    def decompose(self, x: Tensor) -> list[Tensor]:
        """Split ``x`` into ``S`` stages in the spatial domain, coarse to fine (see the module docstring)."""
        x = check_sample(x)
        if x.dtype in HALF_DTYPES:
            return [s.to(x.dtype) for s in self.decompose(x.float())]
        self.stage_shapes(x.shape)
        r = self._levels_of_stages
        if self.closed_form:
            frames = fold_frames(x)
            a = [F.avg_pool2d(frames, 2**j) if j else frames for j in r]
            stages = [a[0]] + [a[s] - _repeat(a[s - 1], 2 ** (r[s - 1] - r[s])) for s in range(1, len(r))]
            return [unfold_frames(st, x.shape) for st in stages]
        fwd, synth = self._transforms(x.dtype, x.device)
        low, highs = fwd(fold_frames(x))
        stages = [low * 2.0 ** -r[0]]
        for s in range(1, self.num_stages):
            band = highs[r[s] : r[s - 1]]
            zero = low.new_zeros(low.shape[0], low.shape[1], *band[-1].shape[-2:])
            stages.append(self._synthesize(synth, zero, list(band)) * 2.0 ** -r[s])
        return [unfold_frames(st, x.shape) for st in stages]

    def _upsample(self, xbar: Tensor, s: int, full: tuple[int, ...]) -> Tensor:
        levels = self._levels_of_stages[s - 1] - self._levels_of_stages[s]
        if self.closed_form:
            return _repeat(xbar, 2**levels)
        _, synth = self._transforms(xbar.dtype, xbar.device)
        return self._up(synth, xbar, levels)

    def __repr__(self) -> str:
        return (
            f"WaveletDecomposition(wave={self.wave!r}, levels={self.levels}, num_stages={self.num_stages}, "
            f"mode={self.mode!r}, factors={self.factors})"
        )


def _repeat(x: Tensor, k: int) -> Tensor:
    """Nearest-neighbour upsampling of ``[N, C, H, W]`` by an integer ``k``."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, k, w, k).reshape(n, c, h * k, w * k)
