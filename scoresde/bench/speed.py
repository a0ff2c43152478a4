"""Sampling speed on real networks: wall time per sample and per model call, the ratio of sampling
time to NFE bare forwards, and peak memory, for every solver and for the peers on the same network.

    scoresde bench --only speed

Networks: the shipped digits UNet (trained, on its own linear VP-SDE) and Ho et al.'s CIFAR-10
UNet (35.7M parameters, random weights: speed does not depend on them), in eval mode under
torch.no_grad, at batch 1 and 64. At each NFE budget every fixed-step solver runs
`sd.sample(..., steps=NFE // nfe_per_step, final_denoise=False)`; beside them, on the same network
and x_T: diffusers' DDPM, DDIM, DPMSolverMultistep, UniPC, Euler and Heun schedulers driving it
through a small adapter (timestep n -> t = (n + 1)/1000 on Ho et al.'s linear chain), and
torchsde.sdeint (Euler) on a plainly written reverse SDE. The adaptive solvers a setting names
run once each, dopri5 beside torchdiffeq.odeint (dopri5) on a plainly written probability-flow ODE.

ratio = time of one sampling run / time of the same number of bare forwards of the network (a plain
Python loop over `net(x, t)`, same batch) timed right after it: the median of that quotient over
the rounds. It is the sampling loop's cost over the network's: 1.0 is the physical limit.
"ratio (CPU)" is the same from process CPU time, which ignores time spent descheduled.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import ClassVar

import torch

import scoresde as sd

from .report import fmt, median, table, timed

F64 = torch.float64
N_TRAIN = 1000  # diffusers' chain: Ho et al.'s linspace(1e-4, 0.02, 1000) = the linear VP-SDE at N = 1000
NETWORKS = {"digits": "shipped digits UNet (trained, 1.1M parameters)", "tiny": "tiny test UNet (random weights)",
            "cifar10": "CIFAR-10 UNet of Ho et al. (35.7M parameters, random weights)"}
DIFFUSERS_LOOPS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                   "EulerDiscreteScheduler", "HeunDiscreteScheduler")
LIMIT = 1.03  # the target for the fixed-step solvers' ratio at batch 64 on CPU


@dataclass(frozen=True)
class Setting:
    """One network at one batch size: the NFE budgets, timing rounds, and what runs beside ours."""

    model: str  # "digits" (the shipped model) or a network preset, e.g. "cifar10" (fresh weights)
    batch: int
    nfe: tuple[int, ...]
    rounds: int = 3
    peers: bool = True  # diffusers' loops, torchsde.sdeint and torchdiffeq.odeint beside ours
    adaptive: tuple[str, ...] = ()  # our adaptive solvers to run (one round each), "dopri5" with torchdiffeq's
    tolerance: float = 1e-3  # rtol = atol of the adaptive ODE solvers (adaptive_sde keeps its own default)


@dataclass(frozen=True)
class SpeedOptions:
    settings: tuple[Setting, ...]


def options(profile: str, env) -> SpeedOptions:
    if profile == "tiny":
        return SpeedOptions((Setting("tiny", 2, (2,), rounds=5, adaptive=("dopri5",), tolerance=1e-2),))
    if profile == "quick":
        return SpeedOptions((Setting("digits", 1, (10,), rounds=3, adaptive=("dopri5",)),
                             Setting("digits", 64, (4,), rounds=1),
                             Setting("cifar10", 1, (1,), rounds=1, peers=False)))
    every = tuple(name for name, spec in sd.SOLVERS.items() if spec.adaptive)
    return SpeedOptions((Setting("digits", 1, (10, 20), rounds=5, adaptive=every),
                         Setting("digits", 64, (10, 20), rounds=3, adaptive=every),
                         Setting("cifar10", 1, (10,), rounds=1),
                         Setting("cifar10", 64, (1,), rounds=1, peers=False)))


# ---- peak memory -----------------------------------------------------------------------------------
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


class PeakMemory:
    """Peak memory growth over a `with` block, in MiB (`.mib`; None where it cannot be measured).

    CUDA: the caching allocator's peak above what was allocated before the block.
    CPU (Linux): the peak resident set (VmHWM) above the resident set before the block. Before it,
    glibc hands its cached free memory back to the system (malloc_trim), so that reused pages count,
    and the peak is reset (writing 5 to /proc/self/clear_refs).
    """

    METHOD: ClassVar[dict] = {"cuda": "torch.cuda.max_memory_allocated above the memory allocated before the run",
              "cpu": "peak resident set growth of this process over the run (Linux VmHWM, reset through "
                     "/proc/self/clear_refs after malloc_trim); glibc's arenas and Python objects make it "
                     "approximate, to about 10 MiB"}

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled, self.mib, self._base = device, enabled, None, None

    def __enter__(self):
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS")
        except (OSError, AttributeError):
            self._base = None  # not Linux, or /proc is read-only: not measured
        return self

    def __exit__(self, *exc):
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self.mib = (_status_kib("VmHWM") - self._base) / 2**10


# ---- the network, a batch, and the runs on it --------------------------------------------------------
class Bench:
    """One setting's network, x_T and bare forward loop, built on first use."""

    def __init__(self, setting: Setting, device: torch.device):
        self.setting, self.device, self._warm = setting, device, False

    @cached_property
    def model(self):
        """(Denoiser, sde, sample shape): "digits" is the shipped model, any other name a network
        preset with fresh weights on the linear VP-SDE."""
        if self.setting.model == "digits":
            found = sd.load_model(device=self.device)
            return found.denoiser, found.sde, found.sample_shape
        net = sd.nn.from_preset(self.setting.model).to(self.device).eval()
        shape = (net.config["in_channels"], net.config["image_size"], net.config["image_size"])
        sde = sd.VPSDE.linear()
        return sd.Denoiser(net, sde), sde, shape

    @cached_property
    def x_T(self):
        _, _, shape = self.model
        x = torch.randn((self.setting.batch, *shape), generator=torch.Generator().manual_seed(0))
        return x.to(self.device)

    def warm_up(self):
        """Two forwards before the setting's first timing: first-call allocations, kernel selection."""
        if not self._warm:
            self.forward(2)
            self._warm = True

    @cached_property
    def _t(self):
        return torch.full((self.setting.batch,), 0.5, device=self.device)

    def forward(self, nfe: int) -> int:
        """`nfe` bare network calls on the batch in a plain loop, the time input prepared outside."""
        net, x, t = self.model[0].net, self.x_T, self._t
        with torch.no_grad():
            for _ in range(nfe):
                net(x, t)
        return nfe


def _steps(solver: str, nfe: int) -> int:
    return max(1, nfe // sd.SOLVERS[solver].nfe_per_step)


def _ours(bench: Bench, solver: str, nfe: int | None, tolerance: float | None):
    denoiser, sde, _ = bench.model
    options = {"rtol": tolerance, "atol": tolerance} if nfe is None and solver != "adaptive_sde" else {}
    if nfe is not None:
        options["steps"] = _steps(solver, nfe)
    _, info = sd.sample(denoiser, sde, x_T=bench.x_T, solver=solver, final_denoise=False, return_info=True,
                        generator=torch.Generator(bench.device).manual_seed(1), **options)
    return info.nfe


def diffusers_scheduler(diffusers, cls: str):
    """A fresh diffusers scheduler `cls` (a name in DIFFUSERS_LOOPS) on Ho et al.'s linear chain."""
    return getattr(diffusers, cls)(num_train_timesteps=N_TRAIN, beta_schedule="linear", beta_start=1e-4,
                                   beta_end=0.02)


def diffusers_calls(cls: str, nfe: int) -> int:
    """The model calls `diffusers_loop` makes with scheduler `cls` at budget `nfe`: Heun makes 2k - 1
    for k timesteps, so only an odd budget is met exactly; the others make `nfe`."""
    return 2 * ((nfe + 1) // 2) - 1 if cls == "HeunDiscreteScheduler" else nfe


def diffusers_loop(denoiser, x_T: torch.Tensor, scheduler, nfe: int, generator: torch.Generator):
    """A diffusers scheduler loop driving our network from x_T: timestep n (fractional for
    Euler/Heun) is the network's time t = (n + 1)/N. Returns (samples, model calls); the caller
    chooses torch.no_grad."""
    heun = type(scheduler).__name__ == "HeunDiscreteScheduler"
    scheduler.set_timesteps((nfe + 1) // 2 if heun else nfe, device=x_T.device)  # Heun: 2 calls a step, 1 last
    timesteps = scheduler.timesteps.tolist()  # sync: once, before the loop (the adapter needs host floats)
    x = x_T * scheduler.init_noise_sigma
    noisy = "generator" in inspect.signature(scheduler.step).parameters
    for n, t in zip(timesteps, scheduler.timesteps, strict=True):
        eps = denoiser.eps(scheduler.scale_model_input(x, t), (n + 1) / N_TRAIN)
        x = scheduler.step(eps, t, x, **({"generator": generator} if noisy else {})).prev_sample
    return x, len(timesteps)


def _diffusers(bench: Bench, scheduler, nfe: int):
    """`diffusers_loop` on the setting's network and x_T; its model calls."""
    denoiser, _, _ = bench.model
    return diffusers_loop(denoiser, bench.x_T, scheduler, nfe, torch.Generator(bench.device).manual_seed(1))[1]


class _Counted:
    """The network as an eps-model of continuous t, counting its calls (for the plain peers)."""

    def __init__(self, bench: Bench):
        self.denoiser, self.sde, self.shape = bench.model
        self.calls = 0

    def beta_sigma(self, t: float):
        t = torch.tensor(t, dtype=F64)
        return float(self.sde.beta(t)), float(self.sde.sigma(t))

    def eps(self, x, t: float):
        self.calls += 1
        return self.denoiser.eps(x, t)


class _PlainReverseSDE(_Counted):
    """The reverse SDE as a torchsde user writes it, in u = T - t on flattened states:
    du-drift = beta/2 x - beta/sigma eps, diffusion sqrt(beta) (Song et al. 2021, eq. 6)."""

    noise_type, sde_type = "diagonal", "ito"

    def f(self, u, y):
        t = self.sde.T - float(u)  # sync: torchsde hands over time as a tensor
        beta, sigma = self.beta_sigma(t)
        eps = self.eps(y.reshape(-1, *self.shape), t).reshape(y.shape)
        return 0.5 * beta * y - beta / sigma * eps

    def g(self, u, y):
        beta, _ = self.beta_sigma(self.sde.T - float(u))
        return torch.full_like(y, math.sqrt(beta))


def _torchsde(bench: Bench, nfe: int):
    import torchsde

    func = _PlainReverseSDE(bench)
    span = func.sde.T - func.sde.t_min
    ts = torch.tensor([0.0, span], device=bench.device)
    torchsde.sdeint(func, bench.x_T.flatten(1), ts, method="euler", dt=span / nfe)
    return func.calls


def _torchdiffeq(bench: Bench, tolerance: float):
    """torchdiffeq's dopri5 on the probability-flow ODE in t, as a user writes it:
    dx/dt = -beta/2 x + beta/(2 sigma) eps (Song et al. 2021, eq. 13)."""
    from torchdiffeq import odeint

    model = _Counted(bench)

    def velocity(t, x):
        # dopri5's trial stages may overshoot the end; sigma(t) is NaN below t = 0, so stop at t_min.
        t = max(float(t), model.sde.t_min)  # sync: the step control reads t on the host anyway
        beta, sigma = model.beta_sigma(t)
        return -0.5 * beta * x + 0.5 * beta / sigma * model.eps(x, t)

    ts = torch.tensor([model.sde.T, model.sde.t_min], device=bench.device)
    odeint(velocity, bench.x_T, ts, method="dopri5", rtol=tolerance, atol=tolerance)
    return model.calls


# ---- cases and their measurement -------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    library: str
    solver: str
    nfe_budget: int | None  # None: adaptive
    run: Callable[[Bench], int]  # runs the sampler once, returns its NFE


def cases(setting: Setting, env) -> list[Case]:
    """Every fixed-step solver at each NFE budget, the peers beside them, then the adaptive ones."""
    out, peers = [], env.peers if setting.peers else {}
    for nfe in setting.nfe:
        out += [Case("scoresde", name, nfe, partial(_ours, solver=name, nfe=nfe, tolerance=None))
                for name, spec in sd.SOLVERS.items() if not spec.adaptive]
        if peers.get("diffusers"):
            out += [Case("diffusers", name, nfe, partial(_diffusers_case, diffusers=peers["diffusers"], cls=name,
                                                         nfe=nfe))
                    for name in DIFFUSERS_LOOPS]
        if peers.get("torchsde"):
            out.append(Case("torchsde", "sdeint euler (plain)", nfe, partial(_torchsde, nfe=nfe)))
    out += [Case("scoresde", name, None, partial(_ours, solver=name, nfe=None, tolerance=setting.tolerance))
            for name in setting.adaptive]
    if "dopri5" in setting.adaptive and peers.get("torchdiffeq"):
        out.append(Case("torchdiffeq", "odeint dopri5 (plain)", None,
                        partial(_torchdiffeq, tolerance=setting.tolerance)))
    return out


def _diffusers_case(bench: Bench, diffusers, cls: str, nfe: int):
    return _diffusers(bench, diffusers_scheduler(diffusers, cls), nfe)


def measure(bench: Bench, case: Case) -> list[dict]:
    """Time `case`, then as many bare forwards right after it, `rounds` times (an adaptive solver,
    hundreds of calls a run: once); peak memory in the first round."""
    rounds = bench.setting.rounds if case.nfe_budget is not None else 1
    loops, bares, peaks = [], [], None  # (wall, cpu) seconds per round; (sampling, forward) MiB
    with torch.no_grad():
        bench.warm_up()
        for r in range(rounds):
            with PeakMemory(bench.device, enabled=r == 0) as loop_peak:
                nfe, *loop = timed(partial(case.run, bench), bench.device)
            with PeakMemory(bench.device, enabled=r == 0) as bare_peak:
                _, *bare = timed(partial(bench.forward, nfe), bench.device)
            loops.append(loop)
            bares.append(bare)
            peaks = peaks or (loop_peak.mib, bare_peak.mib)
    setting = bench.setting
    loop_s, bare_s = median([w for w, _ in loops]), median([w for w, _ in bares])
    # A round's loop and bare forwards ran back to back: their quotient sees one machine load.
    ratio, ratio_cpu = (median([a[k] / b[k] for a, b in zip(loops, bares, strict=True)]) for k in (0, 1))
    tolerance = setting.tolerance if case.nfe_budget is None and case.solver != "adaptive_sde" else None
    return [{"model": setting.model, "batch": setting.batch, "nfe_budget": case.nfe_budget, "library": case.library,
             "solver": case.solver, "kind": "fixed" if case.nfe_budget is not None else "adaptive",
             "tolerance": tolerance, "nfe": nfe, "seconds": loop_s, "ms_per_sample": 1e3 * loop_s / setting.batch,
             "ms_per_nfe": 1e3 * loop_s / nfe, "forward_ms": 1e3 * bare_s / nfe, "ratio": ratio,
             "ratio_cpu": ratio_cpu, "peak_mib": peaks[0], "forward_peak_mib": peaks[1],
             "rounds_s": [w for w, _ in loops], "bare_rounds_s": [w for w, _ in bares]}]


def units(opts: SpeedOptions, env):
    out = []
    for setting in opts.settings:
        bench = Bench(setting, env.device)  # shared by the setting's cases, built by the first
        out += [(f"speed {setting.model} b{setting.batch} {_budget(c.nfe_budget, setting)}: {c.library} {c.solver}",
                 partial(measure, bench, c)) for c in cases(setting, env)]
    return out


def _budget(nfe_budget, setting: Setting) -> str:
    return f"NFE {nfe_budget}" if nfe_budget is not None else "adaptive"


# ---- summary, Markdown, plot -----------------------------------------------------------------------
def _groups(rows):
    """Rows by (model, batch, NFE budget), in the order they ran."""
    keys = dict.fromkeys((r["model"], r["batch"], r["nfe_budget"]) for r in rows)
    return {k: [r for r in rows if (r["model"], r["batch"], r["nfe_budget"]) == k] for k in keys}


def summarize(rows, opts: SpeedOptions) -> dict:
    fixed = [r for r in rows if r["library"] == "scoresde" and r["kind"] == "fixed"]
    return {"rows": rows, "settings": [vars(s) for s in opts.settings], "limit": LIMIT,
            "memory_method": PeakMemory.METHOD,
            "ratio_range": {key: [min(r[key] for r in fixed), max(r[key] for r in fixed)] if fixed else None
                            for key in ("ratio", "ratio_cpu")},
            # Over the target at batch 64 by wall or by CPU time.
            "above_limit_at_batch_64": [{k: r[k] for k in ("model", "batch", "nfe_budget", "solver", "ratio",
                                                          "ratio_cpu")}
                                        for r in fixed if r["batch"] >= 64 and max(r["ratio"], r["ratio_cpu"]) > LIMIT]}


def markdown(summary) -> list[str]:
    lines = ["## Sampling speed on real networks", "",
             "Time per sample and per model call; ratio = sampling time / time of the same number of bare "
             "forwards of the network on the same batch, timed right after it (median over rounds); 1.0 is the "
             "physical limit; ratio (CPU) is the same from process CPU time. "
             f"Target for the fixed-step solvers at batch 64 on CPU: <= {LIMIT}. Peak memory: the growth over "
             "the run (sampling) and over the bare forwards (forward).", "",
             "![time per NFE](speed.png)", ""]
    wall, cpu = summary["ratio_range"]["ratio"], summary["ratio_range"]["ratio_cpu"]
    if wall:
        above = ", ".join(f"{r['model']} NFE {r['nfe_budget']} {r['solver']} "
                          f"({r['ratio']:.3f} / {r['ratio_cpu']:.3f})" for r in summary["above_limit_at_batch_64"])
        lines += [f"Fixed-step scoresde solvers, all settings: ratio {wall[0]:.3f} to {wall[1]:.3f}, ratio (CPU) "
                  f"{cpu[0]:.3f} to {cpu[1]:.3f}. Above {LIMIT} at batch 64 (wall / CPU): {above or 'none'}.", ""]
    for (model, batch, nfe), rows in _groups(summary["rows"]).items():
        budget = f"NFE {nfe}" if nfe is not None else "adaptive solvers"
        lines += [f"### {model}, batch {batch}, {budget}", "", f"Network: {NETWORKS.get(model, model)}.", ""]
        lines += table(["library", "solver", "NFE", "ms/sample", "ms/NFE", "forward ms", "ratio", "ratio (CPU)",
                        "peak MiB", "forward peak MiB"],
                       [[r["library"], r["solver"] + (f" (tol {r['tolerance']:g})" if r["tolerance"] else ""),
                         r["nfe"], f"{r['ms_per_sample']:.3f}", f"{r['ms_per_nfe']:.3f}", f"{r['forward_ms']:.3f}",
                         f"{r['ratio']:.3f}", f"{r['ratio_cpu']:.3f}", fmt(r["peak_mib"], ".1f"),
                         fmt(r["forward_peak_mib"], ".1f")] for r in rows], align="llrrrrrrrr")
        lines.append("")
    method = summary["memory_method"]
    lines += [f"Peak memory, CPU: {method['cpu']}. CUDA: {method['cuda']}.", ""]
    return lines


LIBRARY_COLORS = {"scoresde": "tab:blue", "diffusers": "tab:orange", "torchsde": "tab:green",
                  "torchdiffeq": "tab:purple"}


def plots(summary, out: Path) -> list[str]:
    """speed.png: for each network, batch and NFE budget, a bar per solver of its time per model call
    over the bare forward's timed beside it (the ratio; 1 is the limit), labelled with ms per call.
    The ratio, not the raw time, is drawn: on a busy machine the forward's own time drifts between
    cases, and each case is compared with the forwards timed next to it."""
    from ..plotting import _pyplot

    plt = _pyplot()
    groups = _groups(summary["rows"])
    if not groups:
        return []
    cols = min(len(groups), 3)
    rows_of_plots = math.ceil(len(groups) / cols)
    height = max(len(rows) for rows in groups.values()) * 0.2 + 1.3
    fig, axes = plt.subplots(rows_of_plots, cols, figsize=(5.4 * cols, height * rows_of_plots + 0.4),
                             squeeze=False)
    for ax, ((model, batch, nfe), rows) in zip(axes.flat, groups.items(), strict=False):
        ratios = [r["ratio"] for r in rows]
        ax.barh(range(len(rows)), ratios, color=[LIBRARY_COLORS.get(r["library"], "gray") for r in rows])
        for k, r in enumerate(rows):
            ms = r["ms_per_nfe"]
            ax.text(0.02, k, f"{ms:.3g} ms/NFE" if ms < 1000 else f"{ms:,.0f} ms/NFE", va="center", fontsize=6,
                    color="white")
        ax.axvline(1.0, color="black", lw=1)
        ax.axvline(LIMIT, color="black", ls=":", lw=1, label=f"target {LIMIT} (fixed-step, batch 64)")
        ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1.5, max(ratios) * 1.05))
        ax.set_xlabel("sampling time / bare forwards (ratio)", fontsize=8)
        ax.set_title(f"{model}, batch {batch}, " + (f"NFE {nfe}" if nfe is not None else "adaptive solvers"),
                     fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("Sampling time per model call over the network's own (blue: scoresde, orange: diffusers, "
                 "green: torchsde, purple: torchdiffeq)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(out / "speed.png", dpi=90)
    plt.close(fig)
    return ["speed.png"]


def _short(row) -> str:
    """A bar's label: our solver's name, or the peer's library and loop."""
    if row["library"] == "scoresde":
        return row["solver"]
    return f"{row['library']} {row['solver'].removesuffix('Scheduler')}"
