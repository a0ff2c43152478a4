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
perf_counter medians (or minima, --stat min) over `--repeats` rounds; each round times every case in turn (shuffled), each
case long enough (`--min-time`) for the clock to resolve, so load changes hit all cases alike.
The last column repeats the ratio from process CPU time, which ignores time spent descheduled.

On a shared or busy machine, pass --threads 1: per-step overhead is a single-thread latency, and
multi-threaded kernels stall whenever another process holds a core.

    python benchmarks/overhead.py [--steps 50] [--batch 64] [--repeats 7] [--out results/overhead]

Writes overhead.json and overhead.md under --out and prints the Markdown table. Measures only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
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
class Case:
    """One loop and its bare model calls. Timed in rounds: every repetition times each case's
    loop and then its bare calls, all cases in turn (in a shuffled order), so that changes in
    machine load during the run hit every case and both halves of a difference alike."""

    def __init__(self, setting, library, name, loop, bare, steps, nfe, bridge=False):
        self.setting, self.library, self.name, self.bridge = setting, library, name, bridge
        self.loop, self.bare, self.steps, self.nfe = loop, bare, steps, nfe
        self.inner = 1
        self.wall = {"loop": [], "bare": []}  # seconds per call, time.perf_counter
        self.cpu = {"loop": [], "bare": []}   # seconds per call, time.process_time (all threads)

    def warm_up(self, min_time: float):
        """Two warm-up calls of each, then as many calls per repetition as fill `min_time`."""
        for _ in range(2):
            self.loop(), self.bare()
        t0 = time.perf_counter()
        self.loop()
        once = time.perf_counter() - t0
        self.inner = max(1, math.ceil(min_time / max(once, 1e-9)))

    def time_once(self):
        for part in ("loop", "bare"):
            fn = getattr(self, part)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(self.inner):
                fn()
            c1, w1 = time.process_time(), time.perf_counter()
            self.wall[part].append((w1 - w0) / self.inner)
            self.cpu[part].append((c1 - c0) / self.inner)


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
    cpu_overhead_us_per_step: float  # the same from process time: robust to a busy machine
    ratio_to_ddim_per_step: float | None = None
    ratio_to_ddim_per_nfe: float | None = None
    cpu_ratio_to_ddim_per_step: float | None = None
    bridge: bool = False
    inner: int = 1
    wall_loop_s: list = field(default_factory=list)
    wall_bare_s: list = field(default_factory=list)


def _row(case: Case, stat: str) -> Row:
    med = statistics.median if stat == "median" else min
    loop_s, bare_s = med(case.wall["loop"]), med(case.wall["bare"])
    over, cpu_over = loop_s - bare_s, med(case.cpu["loop"]) - med(case.cpu["bare"])
    return Row(case.setting, case.library, case.name, case.steps, case.nfe,
               loop_us_per_step=1e6 * loop_s / case.steps, model_us_per_step=1e6 * bare_s / case.steps,
               overhead_us_per_step=1e6 * over / case.steps, overhead_us_per_nfe=1e6 * over / case.nfe,
               cpu_overhead_us_per_step=1e6 * cpu_over / case.steps, bridge=case.bridge, inner=case.inner,
               wall_loop_s=case.wall["loop"], wall_bare_s=case.wall["bare"])


# ---- the cases --------------------------------------------------------------------------------
def fixed_step_solvers():
    """(name, is_bridge) for every fixed-step solver in the registry, bridges last."""
    names = [n for n, spec in sd.SOLVERS.items() if not spec.adaptive]
    return [(n, False) for n in names if n not in BRIDGES] + [(n, True) for n in names if n in BRIDGES]


def make_sde(kind: str):
    if kind == "ddpm":  # Ho et al.'s chain, diffusers' default: linspace(1e-4, 0.02, 1000)
        return sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    return sd.VPSDE.linear()


def scoresde_case(sde, name, x, steps, setting, bridge, compiled=False) -> Case:
    def loop():
        return sd.sample(trivial_model, sde, x_T=x, solver=name, steps=steps, final_denoise=False, compile=compiled)

    _, info = sd.sample(trivial_model, sde, x_T=x, solver=name, steps=steps, final_denoise=False,
                        return_info=True, compile=compiled)
    label = f"{name} (compiled)" if compiled else name
    return Case(setting, "scoresde", label, loop, _bare_calls(trivial_model, x, info.nfe), steps, info.nfe, bridge)


def diffusers_case(diffusers, cls_name, x, steps, setting) -> Case:
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
    return Case(setting, "diffusers", cls_name, loop, _bare_calls(trivial_model, x, nfe), nfe, nfe)


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
    threads = f"{m['torch_threads']} thread{'' if m['torch_threads'] == 1 else 's'}"
    return (f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} ({threads}), "
            f"{diff}, Python {m['python']}")


def _load(avg):
    return "n/a" if avg is None else f"{avg[0]:.1f}"


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(rows) -> str:
    head = ("| setting | library | loop | NFE/step | loop µs/step | model µs/step | overhead µs/step "
            "| overhead µs/NFE | ÷ DDIM, per step | ÷ DDIM, per NFE | ÷ DDIM, per step (CPU time) |")
    lines = [head, "|---|---|---|" + "---:|" * 8]
    for r in rows:
        name = f"{r.loop} (bridge)" if r.bridge else r.loop
        lines.append(
            f"| {r.setting} | {r.library} | {name} | {r.nfe / r.steps:g} | {_fmt(r.loop_us_per_step)} "
            f"| {_fmt(r.model_us_per_step)} | {_fmt(r.overhead_us_per_step)} | {_fmt(r.overhead_us_per_nfe)} "
            f"| {_fmt(r.ratio_to_ddim_per_step, 2)} | {_fmt(r.ratio_to_ddim_per_nfe, 2)} "
            f"| {_fmt(r.cpu_ratio_to_ddim_per_step, 2)} |")
    return "\n".join(lines)


def parse_shapes(text: str):
    """'2,3x32x32' -> [(2,), (3, 32, 32)]: per-sample shapes, the batch goes in front."""
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",") if item]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per case (median)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="how repetitions combine: the median, or the minimum (the undisturbed cost on a busy machine)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds each repetition lasts at least")
    p.add_argument("--shapes", default="2,3x32x32", help="per-sample shapes, e.g. '2,3x32x32'")
    p.add_argument("--sde", choices=("ddpm", "linear"), default="ddpm",
                   help="scoresde's schedule: 'ddpm' = diffusers' default betas as a VPSDE, 'linear' = Song et al.'s")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core; "
                   "1 on a shared machine, where multi-threaded kernels stall)")
    p.add_argument("--compiled", default="ddim,unipc",
                   help="solvers also timed with sample(..., compile=True) ('' for none; each compiles once, "
                   "tens of seconds on a CPU)")
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
    plan = []
    for shape in parse_shapes(args.shapes):
        setting = "x".join(str(n) for n in (args.batch,) + shape)
        plan += [("scoresde", name, bridge, setting, shape) for name, bridge in solvers]
        plan += [("compiled", name, False, setting, shape) for name in args.compiled.split(",") if name]
        if diffusers is not None:
            plan += [("diffusers", cls_name, False, setting, shape) for cls_name in DIFFUSERS_LOOPS]

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    order = random.Random(0)
    cases = []
    with tqdm(total=len(plan) * (1 + args.repeats), desc="overhead", unit="case") as bar:
        for library, name, bridge, setting, shape in plan:  # build and warm up each case
            bar.set_postfix_str(f"warm-up {setting} {name}")
            x = torch.randn((args.batch,) + shape)
            if library in ("scoresde", "compiled"):
                case = scoresde_case(sde, name, x, args.steps, setting, bridge, compiled=library == "compiled")
            else:
                case = diffusers_case(diffusers, name, x, args.steps, setting)
            case.warm_up(args.min_time)
            cases.append(case)
            bar.update()
        for r in range(args.repeats):  # then time them in rounds
            bar.set_postfix_str(f"round {r + 1}/{args.repeats}")
            for case in order.sample(cases, len(cases)):
                case.time_once()
                bar.update()
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = [_row(case, args.stat) for case in cases]
    for setting in dict.fromkeys(r.setting for r in rows):
        ref = next((r for r in rows if r.setting == setting and f"{r.library} {r.loop}" == REFERENCE), None)
        if ref is None or ref.overhead_us_per_step <= 0:
            continue
        for r in rows:
            if r.setting == setting:
                r.ratio_to_ddim_per_step = r.overhead_us_per_step / ref.overhead_us_per_step
                r.ratio_to_ddim_per_nfe = r.overhead_us_per_nfe / ref.overhead_us_per_nfe
                if ref.cpu_overhead_us_per_step > 0:
                    r.cpu_ratio_to_ddim_per_step = r.cpu_overhead_us_per_step / ref.cpu_overhead_us_per_step

    table = markdown_table(rows)
    notes = [
        f"scoresde: sd.sample(model, sde, x_T=x, solver=..., steps={args.steps}, final_denoise=False) on "
        f"{'VPSDE.from_betas(linspace(1e-4, 0.02, 1000))' if args.sde == 'ddpm' else 'VPSDE.linear()'}; "
        "diffusers: set_timesteps + the step loop, default scheduler configs.",
        "model: eps = x / 2 for both; 'model µs/step' times the same number of bare calls in a plain loop.",
        "overhead = loop - model; ratios divide by diffusers DDIMScheduler's overhead in the same setting.",
        "the last column divides overheads measured in process CPU time, which a busy machine inflates less.",
        f"{'medians' if args.stat == 'median' else 'minima'} of {args.repeats} rounds; 1-minute load average {_load(load_before)} before, "
        f"{_load(load_after)} after, on {info['usable_cores']} cores; {elapsed:.0f} s in all.",
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
