"""Time the Frechet distance of ``dfm_ext.metrics`` against pytorch-fid's and torchmetrics' on the same statistics.

``python docs/scripts/frechet_timing.py [--dim 2048] [--counts 5000 1000] [--threads 1] [--out FILE.json]``

Two feature sets of ``count`` vectors each (random, correlated, ``dim``-d; the second shifted and
scaled), their means and ``numpy.cov`` covariances in float64, then each implementation on the same
four arrays, one after the other, with ``threads`` BLAS/LAPACK threads:

- ``dfm_ext``: :func:`dfm_ext.metrics.frechet_distance` (symmetric eigendecompositions);
- ``pytorch-fid``: ``pytorch_fid.fid_score.calculate_frechet_distance`` (``scipy.linalg.sqrtm`` of
  ``S1 S2``; the same code as clean-fid's and the ADM suite's), run from its installed source because
  ``pytorch_fid.fid_score`` imports torchvision, which does not import beside the CPU torch here;
- ``torchmetrics``: ``torchmetrics.image.fid._compute_fid`` (``eigvals`` of the non-symmetric
  ``S1 S2``), torchmetrics' only Frechet distance on statistics (private: there is no public functional).

Prints one line per (count, implementation): the value, the relative difference from ``dfm_ext``,
CPU seconds and wall seconds (wall is noisy on a shared machine; CPU time with one thread is the
fairer number). ``count < dim`` is the rank-deficient case (fewer samples than feature dimensions).

``--exact-dim D`` (default 64, 0 skips) then checks accuracy at a size where a 40-digit answer is
affordable: the same float64 inputs (``count`` 24 < D and 200 > D), the Frechet distance computed
with mpmath at 40 digits, and each implementation's relative error from it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Callable


def _pytorch_fid() -> Callable[..., float]:
    import numpy as np
    import scipy.linalg

    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pytorch-fid is not installed: pip install --no-deps pytorch-fid")
    path = Path(next(iter(spec.submodule_search_locations))) / "fid_score.py"
    namespace: dict[str, Any] = {"np": np, "linalg": scipy.linalg}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "calculate_frechet_distance":
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102
            return namespace["calculate_frechet_distance"]
    raise SystemExit(f"{path} defines no calculate_frechet_distance")


def _statistics(rng: Any, dim: int, count: int) -> tuple[Any, Any, Any, Any]:
    """Means and ``numpy.cov`` covariances of two correlated random feature sets (the second shifted and scaled)."""
    import numpy as np

    mix = rng.standard_normal((dim, dim)) / dim**0.5
    real = rng.standard_normal((count, dim)) @ mix
    fake = 1.1 * rng.standard_normal((count, dim)) @ mix + 0.05
    return real.mean(0), fake.mean(0), np.cov(real, rowvar=False), np.cov(fake, rowvar=False)


def _implementations(mu1: Any, s1: Any, mu2: Any, s2: Any) -> dict[str, Callable[[], float]]:
    import torch
    from torchmetrics.image.fid import _compute_fid

    from dfm_ext.metrics import frechet_distance

    pytorch_fid = _pytorch_fid()
    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    return {
        "dfm_ext": lambda: frechet_distance(mu1, s1, mu2, s2),
        "pytorch-fid": lambda: float(pytorch_fid(mu1, s1, mu2, s2)),
        "torchmetrics": lambda: float(_compute_fid(*t)),
    }


def _exact(mu1: Any, s1: Any, mu2: Any, s2: Any) -> float:
    """The Frechet distance of these float64 statistics at 40 digits (mpmath): ``tr`` of the square root from
    the symmetric ``S1^1/2 S2 S1^1/2``, so the eigenvalues that are zero in exact arithmetic stay near 1e-40."""
    import mpmath  # type: ignore[import-untyped]  # (sympy, a torch dependency, brings it)

    mpmath.mp.dps = 40
    a, b = mpmath.matrix(s1.tolist()), mpmath.matrix(s2.tolist())
    values, vectors = mpmath.eigsy(a)
    root = vectors * mpmath.diag([mpmath.sqrt(max(v, 0)) for v in values]) * vectors.T
    middle = root * b * root
    trace_sqrt = sum(mpmath.sqrt(max(v, 0)) for v in mpmath.eigsy((middle + middle.T) / 2, eigvals_only=True))
    mean_term = sum((mpmath.mpf(float(x)) - mpmath.mpf(float(y))) ** 2 for x, y in zip(mu1, mu2))
    n = a.rows
    return float(mean_term + sum(a[i, i] for i in range(n)) + sum(b[i, i] for i in range(n)) - 2 * trace_sqrt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact-dim", type=int, default=64, help="dimension of the 40-digit accuracy check (0: skip)")
    parser.add_argument("--out", help="also write the records as JSON")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy / scipy load their BLAS

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    records: list[dict[str, Any]] = []
    for count in args.counts:
        rng = np.random.default_rng(count)
        mu1, mu2, s1, s2 = _statistics(rng, args.dim, count)
        runs = _implementations(mu1, s1, mu2, s2)
        ours = None
        for name, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            value = run()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            ours = value if ours is None else ours
            record = {"count": count, "dim": args.dim, "threads": args.threads, "implementation": name, "value": value,
                      "relative_difference": abs(value - ours) / abs(ours), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}  # fmt: skip
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.exact_dim:
        for count in (24, 200):
            mu1, mu2, s1, s2 = _statistics(np.random.default_rng(count), args.exact_dim, count)
            exact = _exact(mu1, s1, mu2, s2)
            for name, run in _implementations(mu1, s1, mu2, s2).items():
                record = {"count": count, "dim": args.exact_dim, "implementation": name, "exact": exact,
                          "relative_error": abs(run() - exact) / exact}  # fmt: skip
                records.append(record)
                print(json.dumps(record), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
