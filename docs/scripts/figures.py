"""Draw the Concepts figures from the library itself: ``python docs/scripts/figures.py [--out docs/assets]``.

* ``schedule.png``: ``StageScheduler(...).timesteps()``, the ``[N + 1, S]`` table of per-stage times,
  for the default two-stage schedule (30 + 10 steps, tau 0.9) and a three-stage one.
* ``progressive.png``: ``DFMSampler`` run on a real photo (scikit-image's astronaut, 64x64) with an
  *oracle* model, the exact flow-matching velocity towards that one image, ``v_s = (x_s - x_{s,t}) /
  (1 - t_s)``. Top row: the state while sampling (stage 0 alone while stage 1 is still pure noise,
  then both recomposed); bottom row: the previews the sampler returns when each stage is done.
* ``stages.png``: the two Laplacian stages of the same photo and their exact recomposition.

The PNGs are committed under ``docs/assets/``; ``make docs-figures`` redraws them, and
``tests/test_docs.py`` runs this script into a temporary folder (the figures must still draw from
the current library).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dfm_ext import DFMSampler, LaplacianPyramid, StageScheduler

OUT = Path(__file__).resolve().parents[1] / "assets"


def schedule_tables() -> dict[str, torch.Tensor]:
    """The schedules the figure shows: title -> ``[N + 1, S]`` times."""
    return {
        "2 stages: steps (30, 10), thresholds (0.9,)": StageScheduler(steps=(30, 10), thresholds=(0.9,)).timesteps(),
        "3 stages: steps (20, 10, 10), thresholds (0.8, 0.9)": StageScheduler(
            steps=(20, 10, 10), thresholds=(0.8, 0.9)
        ).timesteps(),
    }


def photo(size: int = 64) -> torch.Tensor:
    """scikit-image's astronaut as ``[1, 3, size, size]`` in ``[-1, 1]`` (area-downsampled)."""
    from skimage import data

    x = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 127.5 - 1
    return torch.nn.functional.adaptive_avg_pool2d(x, size)


class Oracle(torch.nn.Module):
    """The exact flow-matching velocity towards one image, per stage (masked stages: zero)."""

    def __init__(self, target: list[torch.Tensor]) -> None:
        super().__init__()
        self.target = target

    def forward(self, stages, t, stage, mask=None, **cond):
        return [(x1 - x) / (1 - t[:, s, None, None, None]).clamp(min=1e-3)
                for s, (x, x1) in enumerate(zip(stages, self.target))]  # fmt: skip


def _image(ax, x: torch.Tensor, title: str) -> None:
    ax.imshow(((x[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=12)
    ax.axis("off")


def draw(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    # the [N + 1, S] schedule
    tables = schedule_tables()
    fig, axes = plt.subplots(1, len(tables), figsize=(10, 3.4), dpi=110)
    for ax, (title, table) in zip(axes, tables.items()):
        for s in range(table.shape[1]):
            ax.plot(range(table.shape[0]), table[:, s].numpy(), marker=".", markersize=3, label=f"stage {s}")
        ax.set_xlabel("sampling step i (row of the [N + 1, S] table)")
        ax.set_ylabel("t_s (0 = noise, 1 = data)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    written.append(out / "schedule.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # stages of a real photo
    pyramid = LaplacianPyramid(factors=(2, 1))
    x = photo()
    stages = pyramid.decompose(x)
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.6), dpi=110)
    _image(axes[0], x, "x [1, 3, 64, 64]")
    _image(axes[1], stages[0], "stage 0: down(x), 32x32")
    _image(axes[2], stages[1] * 2, "stage 1: x - up(down(x)) (x2)")
    _image(axes[3], pyramid.recompose(stages), "recompose(stages) == x")
    fig.tight_layout()
    written.append(out / "stages.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # sampling with previews
    scheduler = StageScheduler(steps=(30, 10), thresholds=(0.9,))
    sampler = DFMSampler(pyramid, scheduler)
    table = scheduler.timesteps()
    show = [0, 20, 29, 33, 39]
    states: dict[int, torch.Tensor] = {}

    def keep(step: int, t: torch.Tensor, current: list[torch.Tensor]) -> None:
        # while stage 1 is still pure noise (t_1 = 0), show stage 0 alone, as a preview would
        if step in show:
            current = [c.clone() for c in current]
            states[step] = pyramid.preview(current[:1], 0) if t[1] == 0 else pyramid.recompose(current)

    result = sampler.sample(Oracle(stages), x.shape, generator=torch.Generator().manual_seed(0), callback=keep)
    fig, axes = plt.subplots(2, len(show), figsize=(2.2 * len(show), 5.6), dpi=110, layout="constrained")
    for ax, step in zip(axes[0], show):
        t = table[step + 1]
        what = "stage 0" if t[1] == 0 else "stages 0 + 1"
        _image(ax, states[step], f"step {step + 1}: {what}\nt = ({t[0]:.2f}, {t[1]:.2f})")
    for ax in axes[1]:
        ax.axis("off")
    _image(axes[1][show.index(29)], result.previews[0], "previews[0]\n32x32, stage 0 done")
    _image(axes[1][-1], result.previews[1], "previews[1]\n= the sample x")
    fig.suptitle("DFMSampler: Euler 30 + 10 steps, tau 0.9", fontsize=13)
    written.append(out / "progressive.png")
    fig.savefig(written[-1])
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for path in draw(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
