"""mkdocs hook: the results pages are generated from ``benchmarks/results/*.json`` as the site builds.

No measured number is typed into a results page by hand. A page under ``docs/results/`` (and the
home page and the "choosing" guide) writes ``{{ expression }}``; the hook evaluates it with the functions and JSON records
below and puts the text in its place, so a page always shows what the JSON files hold now (the
background study keeps rewriting ``study.json``). An expression that fails stops the build,
naming the page and the expression. The benchmark plots are copied into the site under
``results/img/``.

``python docs/hooks/results.py --headline`` prints the README's "Measured so far" lines from the
same functions; ``tests/test_docs.py`` checks that README.md holds them.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ("quality.png", "study.png", "study_p0.png", "study_allocation.png", "study_grid_*.png")


# ---- records ------------------------------------------------------------------------------------


@cache
def record(name: str) -> dict[str, Any]:
    """``benchmarks/results/<name>.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def command(name: str) -> str:
    """The command that wrote ``<name>.json``, as the JSON records it."""
    r = record(name)
    return r.get("command") or r.get("meta", {}).get("command") or f"python benchmarks/{name}.py"


def num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def pct(ratio: float) -> str:
    """``0.82`` -> ``-18 %``."""
    return f"{(ratio - 1) * 100:+.0f} %"


def _pm(m: float | None, s: float | None, digits: int) -> str:
    return "n/a" if m is None else (f"{m:.{digits}f} ± {s:.{digits}f}" if s else f"{m:.{digits}f}")


# ---- quality.json: FM vs DFM ---------------------------------------------------------------------


def q(arm: str, step: int, key: str = "swd") -> float:
    """Mean over seeds at ``step``: ``key`` in ``swd``, ``fd``, ``swd_std``, ``fd_std``."""
    row = next(r for r in record("quality")["summary"][arm]["curve"] if r["step"] == step)
    return row[{"swd": "swd_mean", "fd": "fd_effnet", "swd_std": "swd_std", "fd_std": "fd_effnet_std"}[key]]


def q_ratio(step: int, key: str = "swd") -> float:
    return q("DFM", step, key) / q("FM", step, key)


def q_level(arm: str, level: str, step: int | None = None) -> float:
    curve = record("quality")["summary"][arm]["curve"]
    row = curve[-1] if step is None else next(r for r in curve if r["step"] == step)
    return row["swd_per_level"][level]


def q_steps() -> list[int]:
    return [r["step"] for r in record("quality")["summary"]["FM"]["curve"]]


def q_seconds_per_step(arm: str) -> float:
    return record("quality")["summary"][arm]["seconds_per_step"]


def quality_table() -> str:
    lines = ["| step | FM SWD x1e3 | DFM SWD x1e3 | DFM/FM | FM FD-EffNet | DFM FD-EffNet | DFM/FM |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for step in q_steps():
        cells = [str(step)]
        for key, digits in (("swd", 2), ("fd", 0)):
            fm, dfm = q("FM", step, key), q("DFM", step, key)
            a, b = _pm(fm, q("FM", step, key + "_std"), digits), _pm(dfm, q("DFM", step, key + "_std"), digits)
            cells += [f"**{a}**" if fm < dfm else a, f"**{b}**" if dfm < fm else b, f"{dfm / fm:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_levels() -> str:
    last = q_steps()[-1]
    levels = list(record("quality")["summary"]["FM"]["curve"][-1]["swd_per_level"])
    lines = [f"| arm | s / training step | " + " | ".join(f"SWD {lv} @{last}" for lv in levels) + " |",
             "|---" * (2 + len(levels)) + "|"]  # fmt: skip
    for arm in record("quality")["summary"]:
        lines.append(f"| {arm} | {q_seconds_per_step(arm):.3f} | "
                     + " | ".join(num(q_level(arm, lv)) for lv in levels) + " |")  # fmt: skip
    return "\n".join(lines)


# ---- ablations.json ----------------------------------------------------------------------------


def ab(variant: str, key: str = "swd") -> float:
    """``key`` in ``swd`` (mean), ``fd``, or a level name such as ``32x32``."""
    v = record("ablations")["variants"][variant]
    if key == "swd":
        return v["swd"]["mean"]
    if key == "fd":
        return v["fd_effnet"]
    return v["swd"]["per_level"][key]


def ab_ratio(variant: str, key: str = "swd") -> float:
    return ab(variant, key) / ab("baseline", key)


def ablation_table() -> str:
    lines = ["| variant | SWD x1e3 | SWD per level | FD-EffNet | paper | reproduces here |", "|---|---|---|---|---|---|"]
    for name, v in record("ablations")["variants"].items():
        levels = " / ".join(f"{x:.1f}" for x in v["swd"]["per_level"].values())
        fd = "n/a" if v["fd_effnet"] is None else f"{v['fd_effnet']:.1f}"
        lines.append(f"| {name} | {v['swd']['mean']:.2f} | {levels} | {fd} | {v['expected']} | {v['reproduces']} |")
    return "\n".join(lines)


# ---- overhead*.json ----------------------------------------------------------------------------


def ov(size: str, kind: str, field: str = "ratio_median", name: str = "overhead") -> float:
    """``kind`` in ``train``, ``sample``, ``train_compiled``, ``sample_compiled``."""
    return record(name)["results"][size][kind][field]


def overhead_table(name: str = "overhead") -> str:
    lines = ["| model | tokens | batch | step | mode | base (s) | wrapped (s) | wrapped / base min / median / max |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for size, e in record(name)["results"].items():
        for kind in ("train", "sample"):
            for mode, key in (("eager", kind), ("compiled", f"{kind}_compiled")):
                if key in e:
                    r = e[key]
                    lines.append(f"| {size} | {e['tokens']} | {e['batch']} | {kind} | {mode} | {r['base_median_s']:.4f} | "
                                 f"{r['wrapped_median_s']:.4f} | {r['ratio_min']:.3f} / {r['ratio_median']:.3f} / "
                                 f"{r['ratio_max']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def overhead_meta(name: str = "overhead") -> str:
    m = record(name)["meta"]
    return f"torch {m['torch']}, {m['device']}, {m['threads']} thread(s), {m['machine']}"


# ---- decompositions.json -----------------------------------------------------------------------


def _g(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def decompositions_table() -> str:
    lines = ["| input `[B, C, H, W]` float32 | decomposition | decompose + recompose / `x.clone()` (median [min, max]) "
             "| median ms | clone ms |", "|---|---|---|---|---|"]  # fmt: skip
    for r in record("decompositions")["rows"]:
        lines.append(f"| {r['shape']} | `{r['decomposition']}` | {_g(r['ratio_median'])}x [{_g(r['ratio_min'])}, "
                     f"{_g(r['ratio_max'])}] | {_g(r['ms_median'])} | {_g(r['clone_ms_median'])} |")  # fmt: skip
    return "\n".join(lines)


# ---- specialize.json ---------------------------------------------------------------------------


def sp(config: str, field: str = "cpu_relative_median", name: str = "specialize") -> float:
    return record(name)["results"][config][field]


def sp_repeats(config: str, name: str = "specialize") -> str:
    """Each repeat's CPU / none (paired), e.g. ``1.07, 1.10, 1.09`` (``-`` for a single run)."""
    reps = record(name)["results"][config].get("cpu_paired_ratio_per_repeat", [])
    return ", ".join(f"{r:.3f}" for r in reps) if len(reps) > 1 else "-"


def specialize_table() -> str:
    lines = ["| configuration | median s | CPU s | wall / none | CPU / none | CPU / none, paired | paired, each repeat "
             "| stage parameters |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in record("specialize")["results"].items():
        params = "0" if not r["stage_parameters"] else f"{r['stage_parameters'] / 1e6:.2f} M ({r['stage_parameters_relative']:.2f}x model)"
        paired = r.get("cpu_paired_ratio_median")
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['cpu_median_s']:.3f} | {r['relative_median']:.2f} | "
                     f"{r['cpu_relative_median']:.2f} | {'-' if paired is None else f'{paired:.3f}'} | "
                     f"{sp_repeats(name)} | {params} |")  # fmt: skip
    return "\n".join(lines)


def specialize_model() -> str:
    r = record("specialize")
    m = r["model"]
    return (f"hidden {m['hidden_size']}, depth {m['depth']}, {m['num_heads']} heads, {m['input_size']}x{m['input_size']} "
            f"latents with patch {m['patch_size']}; batch {r['batch']}, {r['steps']} timed steps"
            + (f" in each of {r['repeats']} repeats" if r.get("repeats", 1) > 1 else ""))  # fmt: skip


# ---- study.json --------------------------------------------------------------------------------


def st(ds: str, arm: str, step: int, key: str = "swd", seed: int = 0) -> float:
    """One run's evaluation: ``key`` in ``swd``, ``fd`` or a level such as ``32x32``."""
    e = record("study")["runs"][f"{ds}|{arm}|{seed}"]["evals"][str(step)]
    return e["swd"]["mean"] if key == "swd" else e["fd_effnet"] if key == "fd" else e["swd"]["per_level"][key]


def st_mean(ds: str, arm: str, step: int, key: str = "swd") -> float:
    """:func:`st` averaged over the seeds the arm has."""
    runs = record("study")["runs"]
    seeds = [int(k.rsplit("|", 1)[1]) for k, r in runs.items() if k.startswith(f"{ds}|{arm}|") and str(step) in r["evals"]]
    return statistics.fmean(st(ds, arm, step, key, seed) for seed in seeds)  # no seed at step: StatisticsError


def st_mratio(ds: str, arm: str, step: int, key: str = "swd") -> str:
    """``arm``/FM at ``step``, each the mean over its seeds, two decimals."""
    return f"{st_mean(ds, arm, step, key) / st_mean(ds, 'FM', step, key):.2f}"


def st_ratio(ds: str, arm: str, step: int, key: str = "swd", seed: int = 0) -> str:
    """``arm``/FM at ``step`` (same seed), two decimals."""
    return f"{st(ds, arm, step, key, seed) / st(ds, 'FM', step, key, seed):.2f}"


def ft(arm: str, step: int, key: str = "swd") -> float:
    """The finetuning experiment: ``key`` in ``swd``, ``fd`` or a level such as ``64x64``."""
    e = record("study")["finetune"]["runs"][arm]["evals"][str(step)]
    return e["swd"]["mean"] if key == "swd" else e["fd_effnet"] if key == "fd" else e["swd"]["per_level"][key]


def signal(ds: str, field: str, stage: int) -> float:
    return record("study")["signal_levels"][ds][field][stage]


def study_tables() -> str:
    """The study's own report (``benchmarks/study.py``), headings moved under this page's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import study  # noqa: PLC0415  (imports torch: only when the page asks for it)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    text, _ = study.report_markdown(record("study"))
    lines = text.splitlines()[2:]  # its title; this page has its own
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def study_grids() -> str:
    """One image per ``study_grid_<dataset>_<step>.png`` the study has written."""
    return "\n\n".join(f"![{p.stem}](img/{p.name})" for p in sorted(RESULTS.glob("study_grid_*.png")))


def study_budgets() -> list[int]:
    return sorted({int(s) for r in record("study")["runs"].values() for s in r["evals"]})


# Issue 28's macros degrade to a plain "not run yet" where a cell is missing: its pages are written
# before the long runs and must build (and say so) while the queue is still on its way.
NOT_RUN = "(not run yet)"


def _seeds(ds: str, arm: str, step: int) -> list[int]:
    runs = record("study")["runs"]
    return sorted(int(k.rsplit("|", 1)[1]) for k, r in runs.items() if k.startswith(f"{ds}|{arm}|") and str(step) in r["evals"])


def st_or(ds: str, arm: str, step: int, key: str = "swd", digits: int = 1) -> str:
    """:func:`st_mean` with ``digits`` decimals and the number of seeds, or ``(not run yet)``."""
    seeds = _seeds(ds, arm, step)
    if not seeds:
        return NOT_RUN
    return f"{st_mean(ds, arm, step, key):.{digits}f} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"


def st_mratio_or(ds: str, arm: str, step: int, key: str = "swd") -> str:
    """:func:`st_mratio` with the seeds behind it, or ``(not run yet)`` when either arm lacks ``step``."""
    n = min(len(_seeds(ds, arm, step)), len(_seeds(ds, "FM", step)))
    return f"{st_mratio(ds, arm, step, key)} ({n} seed{'s' if n > 1 else ''})" if n else NOT_RUN


def study_runs_of(arms: tuple[str, ...] = ("DFM reducible", "DFM eq4 p0=0.7")) -> str:
    """Which runs of ``arms`` and of the issue-28 datasets exist: ``dataset arm seed @last`` items."""
    runs = record("study")["runs"]
    items = [f"{r['dataset']} {r['arm']} seed {r['seed']} to {max(map(int, r['evals']))}" for r in runs.values()
             if r["evals"] and (r["arm"] in arms or r["dataset"] in ("opencv-digits", "video-frames"))]  # fmt: skip
    return "; ".join(sorted(items)) if items else "none yet"


def alloc_choice(ds: str, step: int, seed: int = 0, arm: str = "DFM reducible") -> str:
    """What the new allocation had chosen at ``step``: stage probabilities and the fine stage's
    time-bin probabilities, or ``(not run yet)``."""
    run = record("study")["runs"].get(f"{ds}|{arm}|{seed}", {})
    at = {e["step"]: e for e in run.get("allocation_trace", [])}
    if step not in at:
        return NOT_RUN
    return f"p = {at[step]['p']}, fine-stage time bins {at[step]['time_weights'][-1]}"


def probe(ds: str, arm: str, steps: str, threshold: float, key: str = "fd_effnet", seed: int = 0) -> float:
    """One cell of ``study_sampler_probe.json``: ``steps`` like ``"20+20"``; ``key`` ``swd``, ``fd_effnet``
    or a level (``"32x32"``)."""
    cell = next(c for k, c in record("study_sampler_probe")["cells"].items()
                if k.startswith(f"{ds}|{arm}|{seed}|") and k.endswith(f"|{steps}|{threshold}"))  # fmt: skip
    return cell["per_level"][key] if key in cell["per_level"] else cell[key]


def probe_range(ds: str, arm: str, key: str = "fd_effnet", seed: int = 0, digits: int = 0) -> str:
    """``low to high`` of ``key`` over the probe's settings for one run."""
    v = [c["per_level"][key] if key in c["per_level"] else c[key] for k, c in record("study_sampler_probe")["cells"].items()
         if k.startswith(f"{ds}|{arm}|{seed}|")]  # fmt: skip
    return f"{min(v):.{digits}f} to {max(v):.{digits}f} over {len(v)} settings"


def sampler_probe_table() -> str:
    """``study_sampler_probe.json``: each re-sampled run per step split and threshold, against the
    study's own evaluation of it and FM at the same step (SWD mean, 32x32 level, FD-EffNet)."""
    rows = ["| dataset | arm (step) | steps | threshold | SWD | SWD 32x32 | FD-EffNet | the study's SWD / FD | FM's SWD / 32x32 / FD |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in record("study_sampler_probe")["cells"].values():
        study, fm = c["study"] or {}, c["fm"] or {}
        rows.append(f"| {c['dataset']} | {c['arm']} ({c['step']}) | {c['steps'][0]} + {c['steps'][1]} | {c['threshold']} "
                    f"| {c['swd']:.1f} | {c['per_level']['32x32']:.1f} | {c['fd_effnet']:.0f} "
                    f"| {study.get('swd', float('nan')):.1f} / {study.get('fd_effnet', float('nan')):.0f} "
                    f"| {fm.get('swd', float('nan')):.1f} / {fm.get('per_level', {}).get('32x32', float('nan')):.1f} "
                    f"/ {fm.get('fd_effnet', float('nan')):.0f} |")  # fmt: skip
    return "\n".join(rows)


def study_image(name: str, alt: str) -> str:
    """``![alt](img/name)`` when the study has written that picture, else a note that it has not."""
    return f"![{alt}](img/{name})" if (RESULTS / name).is_file() else f"*({name}: {NOT_RUN[1:-1]})*"


# ---- the API index ------------------------------------------------------------------------------


def api_summary() -> str:
    """Every name of ``dfm_ext.__all__``: the first line of its docstring and the page documenting it."""
    import importlib  # noqa: PLC0415

    import dfm_ext  # noqa: PLC0415

    where: dict[str, str] = {}
    for sub in ("decompositions", "process", "specialization", "models", "wrapping"):
        for name in importlib.import_module(f"dfm_ext.{sub}").__all__:
            where.setdefault(name, sub)
    lines = ["| name | what | documented in |", "|---|---|---|"]
    for name in dfm_ext.__all__:
        sub = where[name]
        doc = ((getattr(dfm_ext, name).__doc__ or "").strip().split("\n")[0]).rstrip(".").replace("``", "`")
        doc = doc.replace("|", "\\|")  # inside a table cell
        lines.append(f"| [`{name}`][dfm_ext.{sub}.{name}] | {doc} | [`dfm_ext.{sub}`]({sub}.md) |")
    return "\n".join(lines)


# ---- the README's headline ----------------------------------------------------------------------


def headline() -> str:
    """The measured headline the README shows (a test keeps README.md equal to it)."""
    first, last = q_steps()[0], q_steps()[-1]
    return (
        f"`wrap_dit` costs nothing measurable (train step {ov('S/2', 'train'):.2f}x, sampling step "
        f"{ov('S/2', 'sample'):.2f}x the unwrapped DiT-S/2 on CPU);\n"
        f"on 32x32 Fashion-MNIST with a 1.3 M-parameter DiT, DFM is ahead of Flow Matching early in training\n"
        f"(step {first}: SWD {pct(q_ratio(first))}, FD-EffNet {pct(q_ratio(first, 'fd'))}) but behind on FD-EffNet "
        f"by step {last} ({pct(q_ratio(last, 'fd'))}),\n"
        f"because p0 = 0.9 leaves the fine stage undertrained in so short a run (p0 = 0.7: SWD "
        f"{pct(ab_ratio('p0 = 0.7'))}, FD-EffNet {pct(ab_ratio('p0 = 0.7', 'fd'))});\n"
        f"input masking and independent per-stage times help, as in the paper (without masking: FD-EffNet "
        f"{pct(ab_ratio('no input masking', 'fd'))}; tied times: {pct(ab_ratio('tied timesteps', 'fd'))})."
    )


# ---- training.md: host work per step, the compile matrix, FSDP2 accumulation (issue 26) ----------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def fsdp_acc(mode: str) -> str:
    """Gradient bytes one rank holds between micro-batches under ``train.fsdp_accumulation=mode``."""
    r = record("fsdp_accumulation")["results"][mode]
    return _mb(r["sharded_grad_bytes"] + r["unsharded_grad_bytes"])


def host_overhead_table() -> str:
    r = record("host_overhead")
    lines = ["| dataset items | before: median ms / step | after: median ms / step | after: mean incl. the epoch draw | one epoch draw (ms) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for n, v in r["results"].items():
        b, a = v["before"], v["after"]
        lines.append(f"| {int(n):,} | {b['median_ms']:.2f} | {a['median_ms']:.3f} | {a['mean_ms']:.3f} | {a['epoch_draw_ms']:.1f} |")
    return "\n".join(lines)


def host_overhead_meta() -> str:
    m = record("host_overhead")["meta"]
    return f"global batch {m['global_batch']} over {m['world_size']} processes ({m['per_rank_batch']} per process), torch {m['torch']}, numpy {m['numpy']}, {m['threads']} thread"


def compile_matrix_table(name: str = "compile_matrix") -> str:
    lines = ["| parallelism | model | specialize | checkpointing | precision | graphs | graph breaks | losses = eager | buckets reuse | eager s/step | compiled / eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in record(name)["results"]:
        lines.append(f"| {r['parallel'].upper()} | {'FLUX (3 buckets)' if r['family'] == 'flux' else 'DiT'} | {r['specialize']} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {r['dtype']} | {r['graphs']} | {r['graph_breaks']} | "
                     f"{'yes' if r['losses_match'] else 'NO'} | {'yes' if r['reused_after_buckets'] else 'NO'} | "
                     f"{r['eager_step_s']:.4f} | {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def compile_matrix_meta(name: str = "compile_matrix") -> str:
    m = record(name)["meta"]
    return f"backend `{m['backend']}`, torch {m['torch']}, {m['threads']} thread per process, median of {m['time_steps']} steps after compiling"


# ---- mkdocs events ------------------------------------------------------------------------------

_EXPR = re.compile(r"\{\{\s*(.+?)\s*\}\}")
NAMESPACE = {k: v for k, v in globals().items() if callable(v) and not k.startswith("_")} | {"statistics": statistics}


def render(markdown: str, where: str) -> str:
    """Replace every ``{{ expression }}`` of ``markdown`` by its value."""

    def one(m: re.Match[str]) -> str:
        try:
            return str(eval(m.group(1), dict(NAMESPACE)))  # noqa: S307  (our own pages)
        except Exception as exc:  # the build must stop and say where
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{where}: {{{{ {m.group(1)} }}}} failed: {type(exc).__name__}: {exc}") from exc

    return _EXPR.sub(one, markdown)


def on_pre_build(config: Any, **kwargs: Any) -> None:
    record.cache_clear()  # `mkdocs serve` rebuilds: read the JSON again


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    for pattern in IMAGES:
        for path in sorted(RESULTS.glob(pattern)):
            files.append(File.generated(config, f"results/img/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    uri = page.file.src_uri
    if uri.startswith("results/") or uri in ("index.md", "guides/choosing.md", "api/index.md"):
        return render(markdown, uri)
    return markdown


if __name__ == "__main__":
    if sys.argv[1:] == ["--headline"]:
        print(headline())
    else:
        raise SystemExit("usage: python docs/hooks/results.py --headline")
