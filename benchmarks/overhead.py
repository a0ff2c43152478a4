"""Per-step overhead of scoresde's fixed-step sampling loops, next to diffusers' scheduler loops.

With a trivial model (eps = x / 2, one elementwise kernel) almost all of a sampling loop's time is
the library's own: the per-step arithmetic, the Python around it and the set-up before the loop.
For every fixed-step solver in `sd.SOLVERS` this times

    sd.sample(model, sde, x_T=x, solver=name, steps=50, final_denoise=False)

and, when diffusers is installed (an optional peer, not a dependency), the standard scheduler loop

    scheduler.set_timesteps(50)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample

for DDIMScheduler and DPMSolverMultistepScheduler in their default configuration. In the same run
it times the bare model calls alone (as many as the loop makes, in a plain Python loop), and
reports

    overhead per step = (loop time - bare model time) / steps

(and per model call), with each loop's overhead as a ratio of diffusers DDIM's. Times are
medians over `--repeats` repetitions, each long enough (`--min-time`) for perf_counter to resolve.

    python benchmarks/overhead.py [--steps 50] [--batch 64] [--repeats 7] [--out results/overhead]

Writes overhead.json and overhead.md under --out and prints the Markdown table. Measures only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import scoresde as sd

# Fixed-step solvers that hand the whole loop to another library (reported, but marked).
BRIDGES = ("torchsde",)
DIFFUSERS_LOOPS = ("DDIMScheduler", "DPMSolverMultistepScheduler")
REFERENCE = "diffusers DDIMScheduler"  # the loop every overhead is divided by


def trivial_model(x, t):
    """The same trivial eps-model for both libraries: a fixed linear map, ignoring t."""
    return x * 0.5


# ---- timing ---------------------------------------------------------------------------------
def _median_times(loop, bare, repeats: int, min_time: float):
    """Median seconds per call of `loop` and of `bare`, timed alternately in each repetition so
    that drifts in machine load hit both alike. Each repetition runs as many calls as fill
    `min_time` (at least one); two warm-up calls go first."""
    for _ in range(2):
        loop(), bare()
    t0 = time.perf_counter()
    loop()
    once = time.perf_counter() - t0
    inner = max(1, math.ceil(min_time / max(once, 1e-9)))
    loops, bares = [], []
    for _ in range(repeats):
        for fn, out in ((loop, loops), (bare, bares)):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return statistics.median(loops), statistics.median(bares), inner


def _bare_calls(model, x, nfe: int):
    """`nfe` model calls in a plain loop, each with its own (batch,) time tensor as in sampling."""
    ts = [torch.full((x.shape[0],), 1.0 - i / max(nfe, 1), dtype=x.dtype) for i in range(nfe)]

    def bare():
        for t in ts:
            model(x, t)

    return bare


@dataclass
class Row:
    setting: str
    library: str
    loop: str
    steps: int
    nfe: int
    loop_us_per_step: float
    model_us_per_step: float
    overhead_us_per_step: float
    overhead_us_per_nfe: float
    ratio_to_ddim_per_step: float | None = None
    ratio_to_ddim_per_nfe: float | None = None
    bridge: bool = False
    inner: int = 1
    notes: list = field(default_factory=list)


def _row(setting, library, loop_name, steps, nfe, loop_s, bare_s, inner, bridge=False):
    over = loop_s - bare_s
    return Row(setting, library, loop_name, steps, nfe,
               loop_us_per_step=1e6 * loop_s / steps, model_us_per_step=1e6 * bare_s / steps,
               overhead_us_per_step=1e6 * over / steps, overhead_us_per_nfe=1e6 * over / nfe,
               bridge=bridge, inner=inner)


# ---- the cases --------------------------------------------------------------------------------
def fixed_step_solvers():
    """(name, is_bridge) for every fixed-step solver in the registry, bridges last."""
    names = [n for n, spec in sd.SOLVERS.items() if not spec.adaptive]
    return [(n, False) for n in names if n not in BRIDGES] + [(n, True) for n in names if n in BRIDGES]


def make_sde(kind: str):
    if kind == "ddpm":  # Ho et al.'s chain, diffusers' default: linspace(1e-4, 0.02, 1000)
        return sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    return sd.VPSDE.linear()


def scoresde_case(sde, name, x, steps, repeats, min_time, setting, bridge):
    def loop():
        return sd.sample(trivial_model, sde, x_T=x, solver=name, steps=steps, final_denoise=False)

    _, info = sd.sample(trivial_model, sde, x_T=x, solver=name, steps=steps, final_denoise=False,
                        return_info=True)
    loop_s, bare_s, inner = _median_times(loop, _bare_calls(trivial_model, x, info.nfe), repeats, min_time)
    return _row(setting, "scoresde", name, steps, info.nfe, loop_s, bare_s, inner, bridge)


def diffusers_case(diffusers, cls_name, x, steps, repeats, min_time, setting):
    scheduler = getattr(diffusers, cls_name)()  # default config: linear betas, 1000 train steps

    def loop():
        scheduler.set_timesteps(steps)
        y = x
        for t in scheduler.timesteps:
            eps = trivial_model(y, t)
            y = scheduler.step(eps, t, y).prev_sample
        return y

    scheduler.set_timesteps(steps)
    nfe = len(scheduler.timesteps)
    loop_s, bare_s, inner = _median_times(loop, _bare_calls(trivial_model, x, nfe), repeats, min_time)
    return _row(setting, "diffusers", cls_name, nfe, nfe, loop_s, bare_s, inner)


# ---- reporting --------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return dict(cpu=cpu, logical_cores=os.cpu_count(), usable_cores=usable, torch_threads=threads,
                python=platform.python_version(), platform=platform.platform(),
                torch=torch.__version__, scoresde=getattr(sd, "__version__", None),
                diffusers=diffusers_version)


def machine_line(m: dict) -> str:
    diff = f"diffusers {m['diffusers']}" if m["diffusers"] else "diffusers not installed"
    return (f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"{diff}, Python {m['python']}")


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(rows) -> str:
    head = ("| setting | library | loop | NFE/step | loop µs/step | model µs/step | overhead µs/step "
            "| overhead µs/NFE | overhead ÷ DDIM's (per step) | (per NFE) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        name = f"{r.loop} (bridge)" if r.bridge else r.loop
        lines.append(
            f"| {r.setting} | {r.library} | {name} | {r.nfe / r.steps:g} | {_fmt(r.loop_us_per_step)} "
            f"| {_fmt(r.model_us_per_step)} | {_fmt(r.overhead_us_per_step)} | {_fmt(r.overhead_us_per_nfe)} "
            f"| {_fmt(r.ratio_to_ddim_per_step, 2)} | {_fmt(r.ratio_to_ddim_per_nfe, 2)} |")
    return "\n".join(lines)


def parse_shapes(text: str):
    """'2,3x32x32' -> [(2,), (3, 32, 32)]: per-sample shapes, the batch goes in front."""
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",") if item]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per case (median)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds each repetition lasts at least")
    p.add_argument("--shapes", default="2,3x32x32", help="per-sample shapes, e.g. '2,3x32x32'")
    p.add_argument("--sde", choices=("ddpm", "linear"), default="ddpm",
                   help="scoresde's schedule: 'ddpm' = diffusers' default betas as a VPSDE, 'linear' = Song et al.'s")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    p.add_argument("--out", default="results/overhead")
    args = p.parse_args(argv)

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    torch.set_num_threads(args.threads or usable)
    torch.manual_seed(0)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    info = machine_info(torch.get_num_threads())

    try:
        import diffusers
    except ImportError:
        diffusers = None
        print("diffusers is not installed: its rows are skipped (pip install diffusers to compare).")

    sde = make_sde(args.sde)
    solvers = fixed_step_solvers()
    shapes = parse_shapes(args.shapes)
    cases = []
    for shape in shapes:
        setting = "x".join(str(n) for n in (args.batch,) + shape)
        for name, bridge in solvers:
            cases.append(("scoresde", name, bridge, setting, shape))
        if diffusers is not None:
            for cls_name in DIFFUSERS_LOOPS:
                cases.append(("diffusers", cls_name, False, setting, shape))

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    rows = []
    for library, name, bridge, setting, shape in tqdm(cases, desc="overhead", unit="case"):
        x = torch.randn((args.batch,) + shape)
        if library == "scoresde":
            rows.append(scoresde_case(sde, name, x, args.steps, args.repeats, args.min_time, setting, bridge))
        else:
            rows.append(diffusers_case(diffusers, name, x, args.steps, args.repeats, args.min_time, setting))
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    for setting in dict.fromkeys(r.setting for r in rows):
        ref = next((r for r in rows if r.setting == setting and f"{r.library} {r.loop}" == REFERENCE), None)
        if ref is None:
            continue
        for r in rows:
            if r.setting == setting and ref.overhead_us_per_step > 0:
                r.ratio_to_ddim_per_step = r.overhead_us_per_step / ref.overhead_us_per_step
                r.ratio_to_ddim_per_nfe = r.overhead_us_per_nfe / ref.overhead_us_per_nfe

    table = markdown_table(rows)
    notes = [
        f"scoresde: sd.sample(model, sde, x_T=x, solver=..., steps={args.steps}, final_denoise=False) on "
        f"{'VPSDE.from_betas(linspace(1e-4, 0.02, 1000))' if args.sde == 'ddpm' else 'VPSDE.linear()'}; "
        "diffusers: set_timesteps + the step loop, default scheduler configs.",
        "model: eps = x / 2 for both; 'model µs/step' times the same number of bare calls in a plain loop.",
        "overhead = loop - model; ratios divide by diffusers DDIMScheduler's overhead in the same setting.",
        f"medians of {args.repeats} repetitions; load average {load_before} before, {load_after} after.",
    ]
    if diffusers is None:
        notes.append("diffusers is not installed: no diffusers rows and no ratios.")
    md = "\n".join([
        "## Per-step overhead", "", f"Command: `{command}`", "", f"Machine: {machine_line(info)}", "",
        table, "", *[f"- {n}" for n in notes], ""])
    print(md)
    print(f"({elapsed:.1f} s)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(md)
    payload = dict(command=command, args=vars(args), machine=info, elapsed_s=elapsed,
                   load_average=dict(before=load_before, after=load_after), reference=REFERENCE,
                   notes=notes, rows=[asdict(r) for r in rows])
    (out / "overhead.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out / 'overhead.json'} and {out / 'overhead.md'}")


if __name__ == "__main__":
    main()
