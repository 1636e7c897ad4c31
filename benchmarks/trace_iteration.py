"""Which project source files one training iteration, and a checkpoint save + resume, enter.

Runs a recipe's ``tiny`` config in this process under ``sys.setprofile`` and records every
project file a Python call enters:

* one iteration: between two ``torch.optim`` post-step hooks (the end of optimiser step 3 to the
  end of step 4; no checkpoint, log or evaluation falls in between with the settings below);
* save: inside the trainer's call that writes a checkpoint (``--save-functions``);
* resume: inside the calls a resumed run makes to find, check and load its checkpoint
  (``--resume-functions``).

Files are reported relative to the source root and grouped as library, adapters and recipes.
The function names differ between versions of the engine, so they are arguments; the defaults
are this version's. Usage (the tiny ImageNet assets from ``python -m dfm_ext.recipes.imagenet.assets DIR``)::

    python benchmarks/trace_iteration.py --assets DIR --out benchmarks/results/trace_iteration.json
"""

from __future__ import annotations

import argparse
import json
import importlib
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOTS = {"src/dfm_ext/adapters": "adapters", "src/dfm_ext/recipes": "recipes", "src/dfm_ext": "library", "adapters": "adapters",
         "recipes": "recipes"}  # fmt: skip  (the last two: the layout before the one source tree)


def _kind(path: str, repo: Path) -> tuple[str, str] | None:
    try:
        rel = Path(path).resolve().relative_to(repo).as_posix()
    except ValueError:
        return None
    for prefix, kind in ROOTS.items():
        if rel.startswith(prefix + "/"):
            return kind, rel
    return None


class Tracer:
    """Project files entered while :attr:`window` is open, and inside named functions."""

    def __init__(self, repo: Path, save: set[str], resume: set[str]) -> None:
        self.repo, self.save, self.resume = repo, save, resume
        self.steps = 0
        self.files: dict[str, set[str]] = defaultdict(set)
        self.depth: dict[str, int] = {"save": 0, "resume": 0}
        self.cache: dict[str, tuple[str, str] | None] = {}

    def hook(self, *args: object) -> None:
        self.steps += 1

    def profile(self, frame, event, arg) -> None:  # noqa: ANN001
        if event not in ("call", "return"):
            return
        code = frame.f_code
        for name, funcs in (("save", self.save), ("resume", self.resume)):
            if code.co_name in funcs and _kind(code.co_filename, self.repo):
                self.depth[name] += 1 if event == "call" else -1
        if event != "call":
            return
        kind = self.cache.get(code.co_filename, ...)
        if kind is ...:
            kind = self.cache[code.co_filename] = _kind(code.co_filename, self.repo)
        if kind is None:
            return
        if self.steps == 3:
            self.files["iteration"].add(kind[1])
        for name in ("save", "resume"):
            if self.depth[name] > 0:
                self.files[name].add(kind[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, required=True, help="tiny ImageNet assets (images/ and vae/)")
    parser.add_argument("--module", default="dfm_ext.recipes.imagenet")
    parser.add_argument("--save-functions", default="save", help="comma-separated names of the calls that write a checkpoint")
    parser.add_argument("--resume-functions", default="_resume_path,check_resume_config,tidy_checkpoints,load")
    parser.add_argument("--out", type=Path, default=None)
    command = " ".join(["python benchmarks/trace_iteration.py", *sys.argv[1:]])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import dfm_ext

    repo = Path(dfm_ext.__file__).resolve().parents[2]
    tracer = Tracer(repo, set(args.save_functions.split(",")), set(args.resume_functions.split(",")))
    register_optimizer_step_post_hook(tracer.hook)
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--config", "tiny", f"data.root={args.assets / 'images'}", f"vae.path={args.assets}", f"train.output_dir={tmp}/run",
                "train.checkpoint_every=2", "train.log_every=2", "train.sample_every=0", "train.progress=false", "train.trackers=[]"]  # fmt: skip
        for steps in (4, 6):  # the second run resumes the first at step 4
            tracer.steps = 0
            recipe = importlib.import_module(args.module)
            sys.setprofile(tracer.profile)
            try:
                status = recipe.main([*base, f"train.steps={steps}"])
            finally:
                sys.setprofile(None)
            assert status == 0, f"the run failed: exit {status}"
    groups = {}
    for window, files in tracer.files.items():
        by_kind: dict[str, list[str]] = defaultdict(list)
        for f in sorted(files):
            by_kind[next(k for p, k in ROOTS.items() if f.startswith(p + "/"))].append(f)
        groups[window] = {k: {"count": len(v), "files": v} for k, v in sorted(by_kind.items())}
    result = {"command": command, "module": args.module, "repo": str(repo), "windows": groups}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
