"""Decompositions: a sample split into coarse-to-fine stages with an exact inverse.

Every class follows the :class:`Decomposition` protocol (``decompose``, ``recompose``,
``stage_shapes``, ``preview``); :func:`decomposition_from_config` / :func:`decomposition_config`
turn one into a JSON-ready dict and back (the recipes, the CLI and the loader all use them).
"""

from dfm_ext.decompositions.base import Decomposition
from dfm_ext.decompositions.dct import DCTDecomposition
from dfm_ext.decompositions.factory import DECOMPOSITION_KINDS, decomposition_config, decomposition_from_config
from dfm_ext.decompositions.identity import IdentityDecomposition
from dfm_ext.decompositions.laplacian import LaplacianPyramid
from dfm_ext.decompositions.pyramid import ResidualPyramid
from dfm_ext.decompositions.wavelet import WaveletDecomposition

__all__ = [
    "DECOMPOSITION_KINDS",
    "DCTDecomposition",
    "Decomposition",
    "IdentityDecomposition",
    "LaplacianPyramid",
    "ResidualPyramid",
    "WaveletDecomposition",
    "decomposition_config",
    "decomposition_from_config",
]
