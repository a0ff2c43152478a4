"""Quality against time on a real network: every fixed-step solver, the shipped tuned grids and
diffusers' schedulers sampling the shipped digits model, measured in the digits feature space.

    scoresde bench --only real [--quick] [--threads 1]

Rows. At each NFE budget (5, 10, 20, 50; the final denoising call counted), every fixed-step
solver of `scoresde.SOLVERS` on its default grid at the step count `quality.fixed_steps` gives it;
a solver whose steps cannot make exactly that many model calls (heun at NFE 10: 9) has no row
there. Tuned rows ("unipc (tuned)"): the grids shipped with the model (`Pretrained.tuned_grids`),
each at its own NFE, beside its solver on the default grid at the same NFE. diffusers' schedulers
(those `speed.py` drives: DDPM, DDIM, DPMSolverMultistep, UniPC, Euler, Heun) drive the same
network through `speed.diffusers_loop` (timestep n -> t = (n + 1)/1000: the shipped model's linear
VP-SDE is Ho et al.'s chain), at the same budgets (Heun: odd budgets only); when diffusers cannot
be imported they are skipped, and the suite says so.

Every row starts from the same x_T: one generator per row, seeded alike, draws x_T and then the
row's own noise. Its samples are clipped to the data's range, as `scoresde sample` writes them,
then measured by `scoresde.evaluate`: Fréchet distance to the training split's features (over all
n, and over the first 360 = the held-out count, comparable to the floor), k-NN precision and
recall, class coverage and class distance, and the replication share. Wall time per sample: the
sampling call alone (not the evaluation), over n. The floor row is `evaluate.floor`: the 360 real
held-out digits, measured the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import torch

import scoresde as sd

from .quality import fixed_steps
from .report import fmt, table, timed
from .speed import DIFFUSERS_LOOPS, diffusers_calls, diffusers_loop, diffusers_scheduler

SEED = 0
METRICS = ("frechet", "frechet_matched", "precision", "recall", "coverage", "class_distance", "replication_share")


@dataclass(frozen=True)
class RealOptions:
    nfe: tuple[int, ...] = (5, 10, 20, 50)
    n: int = 1000  # samples per row, one batch
    solvers: tuple[str, ...] | None = None  # our fixed-step solvers (None: every one)
    tuned_nfe: tuple[int, ...] | None = None  # the shipped tuned grids at these NFE (None: every one)
    diffusers: tuple[str, ...] = DIFFUSERS_LOOPS  # diffusers' scheduler classes
    seed: int = SEED


def options(profile: str, env) -> RealOptions:
    if profile == "tiny":
        return RealOptions((5,), 40, solvers=("ddim", "unipc"), tuned_nfe=(5,),
                           diffusers=("DPMSolverMultistepScheduler",))
    if profile == "quick":
        return RealOptions((5, 10, 20), 360, diffusers=("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"))
    return RealOptions()


def fixed_solvers(opts: RealOptions) -> list[str]:
    return [name for name, spec in sd.SOLVERS.items()
            if not spec.adaptive and (opts.solvers is None or name in opts.solvers)]


def exact_steps(solver: str, nfe: int) -> int:
    """`quality.fixed_steps`'s step count if it makes exactly `nfe` model calls, the final
    denoising call included; else 0 (no row)."""
    spec = sd.SOLVERS[solver]
    steps = fixed_steps(spec, nfe)
    return steps if steps >= 1 and spec.calls(steps, {}) + 1 == nfe else 0


# ---- the model, the reference and the rows ---------------------------------------------------------
class _Digits:
    """The shipped model, the digits reference and its floor, built on first use."""

    def __init__(self, opts: RealOptions, device: torch.device):
        self.opts, self.device, self._warm = opts, device, False

    @cached_property
    def model(self):
        return sd.load_model(None, device=self.device)

    def warm_up(self):
        """A forward at the rows' batch before the first timed row: first-call allocations."""
        if not self._warm:
            with torch.no_grad():
                self.model.denoiser.eps(torch.zeros((self.opts.n, *self.model.sample_shape), device=self.device), 0.5)
            self._warm = True

    @cached_property
    def ref(self):
        from .. import evaluate

        return evaluate.reference("digits")

    @cached_property
    def tuned(self) -> list:
        """(file name, TunedGrid) of the shipped grids the options keep, by NFE."""
        grids = [(path.name, sd.TunedGrid.load(path)) for path in self.model.tuned_grids()]
        keep = [(name, g) for name, g in grids if self.opts.tuned_nfe is None or g.nfe in self.opts.tuned_nfe]
        return sorted(keep, key=lambda item: item[1].nfe)

    def start(self):
        """A row's x_T and the generator that goes on to draw its noise (seeded alike every row)."""
        generator = torch.Generator(self.device).manual_seed(self.opts.seed)
        shape = (self.opts.n, *self.model.sample_shape)
        return torch.randn(shape, generator=generator, device=self.device), generator

    def measure(self, x: torch.Tensor) -> dict:
        """The metrics of samples in model units, clipped to the data's range first."""
        from .. import evaluate

        x = x.detach().float().cpu()
        if not torch.isfinite(x).all():
            return {**dict.fromkeys(METRICS), "outside_range": None, "error": "non-finite samples"}
        outside = float((x.abs() > 1).double().mean())
        result = evaluate.evaluate(self.model.to_data_units(x, clip=True), self.ref, units="data")
        return {**_numbers(result), "outside_range": outside}


def _numbers(result) -> dict:
    """An Evaluation's metrics, NaN (a count too small for the matched distance) as None."""
    return {k: None if isinstance(v := getattr(result, k), float) and math.isnan(v) else v for k in METRICS}


def _floor_rows(digits: _Digits):
    from .. import evaluate

    floor = evaluate.floor(digits.ref)
    return [{"sampler": "floor (held-out real digits)", "library": "real", "kind": "floor", "nfe": None,
             "n": floor.n, **_numbers(floor), "class_share": floor.class_share,
             "threshold": digits.ref.threshold, "quantile": digits.ref.quantile,
             "train_count": len(digits.ref.train_x), "held_count": len(digits.ref.held_x)}]


def _row(digits: _Digits, label: str, library: str, kind: str, nfe: int, run) -> list[dict]:
    digits.warm_up()
    x_T, generator = digits.start()
    try:
        with torch.no_grad():
            (x, calls, extra), wall, cpu = timed(partial(run, x_T, generator), digits.device)
    except FloatingPointError as err:  # the network returned NaN or inf: a row that says so
        return [{"sampler": label, "library": library, "kind": kind, "nfe_budget": nfe, "nfe": None,
                 "n": digits.opts.n, **dict.fromkeys(METRICS), "error": str(err)}]
    return [{"sampler": label, "library": library, "kind": kind, "nfe_budget": nfe, "nfe": calls,
             "n": digits.opts.n, "seconds": wall, "cpu_seconds": cpu, "ms_per_sample": 1e3 * wall / digits.opts.n,
             **extra, **digits.measure(x)}]


def _ours(digits: _Digits, solver: str, steps: int, x_T, generator):
    model = digits.model
    x, info = sd.sample(model.denoiser, model.sde, x_T=x_T, solver=solver, steps=steps, generator=generator,
                        return_info=True)
    return x, info.nfe, {"solver": solver, "grid": sd.SOLVERS[solver].grid, "steps": info.steps}


def _ours_tuned(digits: _Digits, file: str, grid, x_T, generator):
    model = digits.model
    x, info = sd.sample(model.denoiser, model.sde, x_T=x_T, solver=grid.solver, grid=grid, generator=generator,
                        return_info=True, **grid.options)
    return x, info.nfe, {"solver": grid.solver, "grid": file, "steps": info.steps, "times": info.times.tolist()}


def _theirs(digits: _Digits, diffusers, cls: str, nfe: int, x_T, generator):
    x, calls = diffusers_loop(digits.model.denoiser, x_T, diffusers_scheduler(diffusers, cls), nfe, generator)
    return x, calls, {"solver": cls, "grid": "diffusers' own"}


def units(opts: RealOptions, env):
    """(label, run) pairs: the floor, then per NFE our solvers, the tuned grids at that NFE and
    diffusers' schedulers; a tuned grid at an NFE outside opts.nfe brings its solver's fixed-grid row."""
    digits = _Digits(opts, env.device)
    out = [("real: floor (held-out digits)", partial(_floor_rows, digits))]
    diffusers = env.peers.get("diffusers")
    tuned_nfe = sorted({g.nfe for _, g in digits.tuned})
    for nfe in sorted({*opts.nfe, *tuned_nfe}):
        extra = nfe not in opts.nfe  # only the tuned grids' solvers run here
        solvers = {g.solver for _, g in digits.tuned if g.nfe == nfe} if extra else fixed_solvers(opts)
        for name in [s for s in sd.SOLVERS if s in solvers]:
            steps = exact_steps(name, nfe)
            if steps:
                out.append((f"real NFE {nfe}: {name}", partial(_row, digits, name, "scoresde", "fixed", nfe,
                                                                partial(_ours, digits, name, steps))))
        for file, grid in digits.tuned:
            if grid.nfe == nfe:
                out.append((f"real NFE {nfe}: {grid.solver} (tuned)",
                            partial(_row, digits, f"{grid.solver} (tuned)", "scoresde", "tuned", nfe,
                                    partial(_ours_tuned, digits, file, grid))))
        if diffusers and not extra:
            for cls in opts.diffusers:
                if diffusers_calls(cls, nfe) == nfe:
                    label = f"diffusers {cls.removesuffix('Scheduler')}"
                    out.append((f"real NFE {nfe}: {label}", partial(_row, digits, label, "diffusers", "fixed", nfe,
                                                                     partial(_theirs, digits, diffusers, cls, nfe))))
    return out


# ---- summary ---------------------------------------------------------------------------------------
def metric(n: int, held: int) -> str:
    """The distance the tables sort by: at the held-out count where the rows reach it."""
    return "frechet_matched" if n >= held else "frechet"


def _key(row, key):
    value = row.get(key)
    return math.inf if value is None else value


def _group(row) -> str:
    """"fixed" (scoresde, default grid), "tuned" or "diffusers"."""
    return "diffusers" if row["library"] == "diffusers" else row["kind"]


def summarize(rows, opts: RealOptions) -> dict:
    floor = next(r for r in rows if r["kind"] == "floor")
    sampled = [r for r in rows if r["kind"] != "floor"]
    key = metric(opts.n, floor["held_count"])
    unreachable = {name: [nfe for nfe in opts.nfe if not exact_steps(name, nfe)] for name in fixed_solvers(opts)}
    diffusers_rows = any(r["library"] == "diffusers" for r in sampled)
    best = []  # per NFE: the best scoresde sampler on a default grid, the best tuned grid, the best diffusers loop
    for nfe in sorted(dict.fromkeys(r["nfe_budget"] for r in sampled)):
        groups = {kind: [r for r in sampled if r["nfe_budget"] == nfe and _group(r) == kind]
                  for kind in ("fixed", "tuned", "diffusers")}
        best.append({"nfe": nfe, **{kind: min(group, key=lambda r: _key(r, key))["sampler"] if group else None
                                    for kind, group in groups.items()}})
    ours = [r for r in sampled if r["library"] == "scoresde" and r.get(key) is not None]
    top = min(ours, key=lambda r: r[key], default=None)
    most = max(ours, key=lambda r: r["replication_share"], default=None)
    replication = {"best_sampler": top and top["sampler"], "best_nfe": top and top["nfe"],
                   "best_share": top and top["replication_share"], "floor_share": floor["replication_share"],
                   "max_sampler": most and most["sampler"], "max_nfe": most and most["nfe"],
                   "max_share": most and most["replication_share"], "threshold": floor["threshold"],
                   "quantile": floor["quantile"], "train_count": floor["train_count"],
                   "held_count": floor["held_count"]}
    return {"n": opts.n, "nfe": list(opts.nfe), "seed": opts.seed, "metric": key, "floor": floor, "rows": sampled,
            "best": best, "replication": replication, "unreachable": {k: v for k, v in unreachable.items() if v},
            "diffusers": list(opts.diffusers), "diffusers_skipped": bool(opts.diffusers) and not diffusers_rows}


# ---- Markdown and plots ----------------------------------------------------------------------------
def _pct(value) -> str:
    return fmt(None if value is None else 100 * value, ".1f")


def replication_text(summary) -> str:
    rep = summary["replication"]
    if rep["best_sampler"] is None:
        return ""
    total = rep["train_count"] + rep["held_count"]
    return (f"Replication: at its best setting here ({rep['best_sampler']}, NFE {rep['best_nfe']}) the shipped "
            f"model puts {_pct(rep['best_share'])} % of its samples under the replication threshold "
            f"({rep['threshold']:.3g}, pixel distance in model units to the nearest training-split digit); the "
            f"held-out real digits put {_pct(rep['floor_share'])} % there, and the largest share of any scoresde "
            f"row is {_pct(rep['max_share'])} % ({rep['max_sampler']}, NFE {rep['max_nfe']}). What it implies: the "
            f"shipped model was trained on all {total:,} digits, including the {rep['held_count']} held out here, "
            "so the floor's held-out images were seen in training. The threshold is calibrated on held-out "
            f"digits (every fifth image, the even-numbered half: {100 * rep['quantile']:.0f} % of them lie closer "
            "than it to their nearest training-split digit), so a sample that copies a held-out digit is not "
            f"counted as a copy: the check bounds copying of the {rep['train_count']:,} training-split digits only.")


def markdown(summary) -> list[str]:
    key, floor = summary["metric"], summary["floor"]
    matched = key == "frechet_matched"
    lines = ["## Quality against time on the digits network", "",
             f"The shipped digits model, n = {summary['n']} samples per row from the same x_T (seed "
             f"{summary['seed']}), NFE budgets {summary['nfe']} (final denoising call counted); tuned rows: the "
             "shipped tuned grids at their own NFE. Samples clipped to the data's range, then measured in the "
             "digits feature space against the training split. FD: Fréchet distance, "
             + (f"sorted by FD over the first {floor['held_count']} samples (the held-out count: comparable to "
                "the floor); " if matched else
                f"sorted by FD over all n (n < {floor['held_count']}: no FD at the held-out count, and none "
                "comparable to the floor's); ")
             + "precision/recall: k-NN (k = 3) against the training features; coverage: share of classes "
             "holding at least half their training share; class TV: total variation to the training class "
             "shares; replication: share of samples under the replication threshold; ms/sample: the sampling "
             "call's wall time over n (one run per row: on a busy machine it moves by tens of percent); CPU "
             "ms/sample: the process's CPU time over the same call, steadier where the machine is shared.", "",
             "![Fréchet distance against time per sample](real_fd_time.png)", "",
             "![Fréchet distance against NFE](real_fd_nfe.png)", ""]
    text = replication_text(summary)
    if text:
        lines += [text, ""]
    if summary["unreachable"]:
        lines += ["No row where a solver cannot make exactly the budget's model calls: " + "; ".join(
            f"{name} at NFE {', '.join(map(str, nfes))}" for name, nfes in summary["unreachable"].items()) + ".", ""]
    if summary["diffusers_skipped"]:
        lines += ["diffusers' rows: skipped (diffusers cannot be imported here; pip install -e \".[bench]\").", ""]
    lines += _best_table(summary)
    for nfe in dict.fromkeys(r["nfe_budget"] for r in summary["rows"]):
        rows = sorted([r for r in summary["rows"] if r["nfe_budget"] == nfe] + [floor], key=lambda r: _key(r, key))
        lines += [f"### NFE {nfe}", ""]
        lines += table(["sampler", "kind", "NFE", f"FD ({floor['held_count']})", "FD (all n)", "precision %",
                        "recall %", "coverage %", "class TV", "replication %", "ms/sample", "CPU ms/sample"],
                       [[f"**{r['sampler']}**" if r["kind"] == "floor" else r["sampler"],
                         r["kind"] if r["library"] != "diffusers" else "diffusers", r["nfe"] or "—",
                         fmt(r["frechet_matched"], ".1f"), fmt(r["frechet"], ".1f"), _pct(r["precision"]),
                         _pct(r["recall"]), _pct(r["coverage"]), fmt(r["class_distance"], ".3f"),
                         _pct(r["replication_share"]), fmt(r.get("ms_per_sample"), ".2f")
                         + (f" ({r['error']})" if r.get("error") else ""),
                         fmt(r.get("cpu_seconds") and 1e3 * r["cpu_seconds"] / r["n"], ".2f")] for r in rows],
                       align="llrrrrrrrrrr")
        lines.append("")
    return lines


def _best_table(summary) -> list[str]:
    """Per NFE: the best scoresde row on a default grid, the best tuned grid, the best diffusers loop."""
    key, floor = summary["metric"], summary["floor"]

    def cell(nfe, sampler):
        if sampler is None:
            return ["—", "—"]
        row = next(r for r in summary["rows"] if r["nfe_budget"] == nfe and r["sampler"] == sampler)
        return [sampler, fmt(row[key], ".1f")]

    name = f"FD ({floor['held_count']})" if key == "frechet_matched" else "FD (all n)"
    lines = ["### Best per NFE", "", f"By {name}; the floor's: {fmt(floor[key], '.1f')}.", ""]
    lines += table(["NFE", "best scoresde (default grid)", name, "tuned grid", name, "best diffusers", name],
                   [[b["nfe"], *cell(b["nfe"], b["fixed"]), *cell(b["nfe"], b["tuned"]),
                     *cell(b["nfe"], b["diffusers"])] for b in summary["best"]],
                   align="rlrlrlr")
    return lines + [""]


def _styles(plt, samplers: dict) -> dict:
    """Ours: solid, hues from cyan to violet (light and dark in turn); diffusers: dashed, oranges to
    browns; tuned grids: thick red dash-dot with large stars, on top."""
    from matplotlib.colors import hsv_to_rgb

    markers = "osv^D<>pPXhd"
    ours = [s for s, kind in samplers.items() if kind == "fixed"]
    theirs = [s for s, kind in samplers.items() if kind == "diffusers"]
    style = {}
    for group, hues, ls in ((ours, (0.45, 0.8), "-"), (theirs, (0.05, 0.12), "--")):
        for k, s in enumerate(group):
            hue = hues[0] + (hues[1] - hues[0]) * k / max(len(group) - 1, 1)
            color = hsv_to_rgb((hue, 0.85, 0.95 if k % 2 == 0 else 0.55))
            style[s] = {"color": color, "ls": ls, "marker": markers[k % len(markers)], "ms": 5, "lw": 1.2}
    for s, kind in samplers.items():
        if kind == "tuned":
            style[s] = {"color": "crimson", "ls": "-.", "lw": 2.2, "marker": "*", "ms": 14, "mec": "black",
                        "mew": 0.6, "zorder": 4}
    return style


def _log_axis(axis, plt):
    """Plain numbers on a log axis; minor ticks labelled at 2, 3 and 5 times a power of ten."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    def minor(value, _):
        lead = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return f"{value:g}" if round(lead) in (2, 3, 5) and abs(lead - round(lead)) < 1e-6 else ""

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(FuncFormatter(minor))


def plots(summary, out: Path) -> list[str]:
    """real_fd_time.png (FD against wall time per sample, log-log) and real_fd_nfe.png (FD against
    NFE, log-log): a line per sampler across its NFE budgets, the floor a horizontal line."""
    from ..plotting import _pyplot

    plt = _pyplot()
    key, floor = summary["metric"], summary["floor"]
    rows = [r for r in summary["rows"] if r.get(key) is not None]
    kinds = {r["sampler"]: _group(r) for r in rows}
    order = list(sd.SOLVERS)  # ours in the registry's order, then the tuned grids, then diffusers' loops
    samplers = dict(sorted(kinds.items(), key=lambda item: (("fixed", "tuned", "diffusers").index(item[1]),
                                                          order.index(item[0]) if item[0] in order else 0)))
    style = _styles(plt, samplers)
    label = f"FD (first {floor['held_count']} samples)" if key == "frechet_matched" else "FD (all n)"
    names = []
    for name, x_key, x_label in (("real_fd_time.png", "ms_per_sample", "wall time per sample (ms)"),
                                 ("real_fd_nfe.png", "nfe", "NFE (model calls)")):
        fig, ax = plt.subplots(figsize=(10, 6))
        for sampler in samplers:
            points = sorted((r[x_key], r[key]) for r in rows if r["sampler"] == sampler)
            ax.plot(*zip(*points), label=sampler, **style[sampler])
        if floor.get(key) is not None:
            ax.axhline(floor[key], color="black", ls=":", lw=2, label=f"floor: {floor['n']} held-out real digits")
        ax.set(xscale="log", yscale="log", xlabel=x_label, ylabel=label)
        _log_axis(ax.xaxis, plt)
        _log_axis(ax.yaxis, plt)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax.set_title(f"Digits network: {label} against {x_label.split(' (')[0]}, log-log, n = {summary['n']}\n"
                     "solid: scoresde (default grids), dashed: diffusers, red stars: shipped tuned grids; "
                     "dotted: the floor", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names
