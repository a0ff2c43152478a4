"""Bad input, tried systematically.

Hypothesis throws random arguments, mostly wrong and sometimes right, at every public entry point:
`sample` (every keyword and every solver's options), the VPSDE constructors and methods, the grids,
`Denoiser` (construction and call), `log_likelihood`, the guidance wrappers, `TrainConfig` /
`apply_overrides` and the command line. Each call must either work, with a sane result (the right
shape, finite), or refuse with a ValueError or TypeError whose message names an argument it was
given (FloatingPointError only where an input held NaN or inf). Anything else fails the test: an
IndexError, a RuntimeError or NotImplementedError from deep inside torch, an AttributeError, a
ZeroDivisionError, an OverflowError, a traceback from the command line.

Each entry point has two properties: `wild` (any mix of good and wrong arguments) and `valid` (good
arguments only: every such call must work). Wrong values come from one pool (WILD): None, bools,
small and huge ints, edge floats (NaN, inf, 0, negative, subnormal, 1e308), strings, lists, dicts,
complex numbers, tensors of the wrong dtype, shape or device (meta), numpy arrays, dtypes, devices,
generators and a callable. Left out on purpose: values that are valid but take minutes (tolerances
of 1e-10, a million steps) and broken user extension points (a callable noise source or time_input
that returns garbage): their contract is the user's. Runs are derandomized, so CI is deterministic;
`-m slow` runs every property with a five times larger budget and another seed. The tally of calls
tried, answered and refused is printed at the end of the module (run with -s to see it).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import re
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import scoresde as sd
from scoresde import cli
from scoresde._util import MAX_STEPS, as_time
from scoresde.solvers import ode, pc
from scoresde.solvers import reverse_sde as sde_solvers
from scoresde.train import config as train_config
from scoresde.train import loop as train_loop

F64 = torch.float64
SOLVER_NAMES = sorted(sd.SOLVERS)
TALLY: collections.Counter = collections.Counter()
# Solver failures that are answers, not crashes: the documented ways an adaptive solver gives up.
GAVE_UP = re.compile(r"reached max_steps|step size underflowed|solve_ivp\(\w+\) failed")


# ---- the verdict ---------------------------------------------------------------------------------
def names_one_of(message: str, names) -> bool:
    """Whether `message` names one of `names` as a word (t in 't=0.5', not in 't_end')."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def non_finite(values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta"
               and not bool(torch.isfinite(v).all()) for v in values)


def answer(entry: str, call, names, sane, *, nan_ok: bool = False) -> str:
    """Call `call()`: it works and `sane(result)` holds, or it refuses naming one of `names`.
    Returns "worked", "refused" or "gave up"; any other exception propagates and fails the test."""
    TALLY[entry, "tried"] += 1
    try:
        result = call()
    except (ValueError, TypeError) as err:
        assert names_one_of(str(err), names), f"{type(err).__name__} names none of {sorted(names)}: {err}"
        verdict = "refused"
    except FloatingPointError as err:
        assert nan_ok, f"FloatingPointError without a NaN or inf input: {err}"
        verdict = "refused"
    except RuntimeError as err:
        if not GAVE_UP.search(str(err)):
            raise
        verdict = "gave up"
    else:
        sane(result)
        verdict = "worked"
    TALLY[entry, verdict] += 1
    return verdict


def sane_tensor(x, shape=None, dtype=None, finite=True):
    assert isinstance(x, torch.Tensor), type(x)
    if shape is not None:
        assert tuple(x.shape) == tuple(shape), (tuple(x.shape), shape)
    if dtype is not None:
        assert x.dtype == dtype, (x.dtype, dtype)
    if finite and x.device.type != "meta":
        assert bool(torch.isfinite(x).all()), x


# ---- strategies -------------------------------------------------------------------------------------
def fresh(*makers) -> st.SearchStrategy:
    """A freshly built object per example (tensors are mutable, so never shared between examples)."""
    return st.sampled_from(makers).map(lambda make: make())


def normal(*shape, dtype=torch.float32, uniform=False) -> torch.Tensor:
    """Seeded draws (N(0, 1), or U(-1, 1) with uniform=True): examples repeat exactly."""
    g = torch.Generator().manual_seed(sum(shape))
    if uniform:
        return torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    return torch.randn(shape, generator=g, dtype=dtype)


HUGE_INTS = st.one_of(st.integers(min_value=10**8, max_value=10**400),
                      st.integers(min_value=-10**400, max_value=-10**8))
EDGE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-3, 5e-324, 1e-300, 1e308,
                               0.5, 1.0, 1.5, 2.0, 1e6])
WILD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), HUGE_INTS, EDGE_FLOATS,
    st.floats(-3.0, 3.0).filter(lambda v: abs(v) > 1e-2),
    st.text(max_size=4), st.lists(st.integers(-1, 3), max_size=3), st.tuples(st.integers(-1, 3), st.text(max_size=1)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.complex_numbers(max_magnitude=2),
    fresh(lambda: torch.zeros(2), lambda: torch.ones(3, 2, dtype=torch.int64), lambda: torch.zeros(3, 2, device="meta"),
          lambda: torch.tensor(0.5), lambda: torch.full((3, 2), math.nan),
          lambda: torch.zeros(3, 2, dtype=torch.complex64),
          lambda: torch.ones(3, 2, dtype=torch.bool), lambda: torch.zeros(5, 7), lambda: torch.zeros(0, 2),
          lambda: torch.zeros(3, 2, dtype=torch.float16), lambda: torch.tensor([0.9, 0.5]), lambda: np.zeros((3, 2)),
          lambda: np.float64(0.5), lambda: np.int64(3), lambda: torch.Generator(), lambda: (lambda *args: None)),
    st.sampled_from([torch.float64, torch.int32, torch.bool, "cpu", "meta", "cuda", "cuda:3", torch.device("cpu"),
                     torch.device("meta"), "eps", "t", "uniform", "heun", "linear"]),
)


@st.composite
def keywords(draw, good: dict, *, wild: bool) -> dict:
    """A subset of `good`'s keywords, each with a good value or (when wild) a WILD one."""
    out = {}
    for key, strategy in good.items():
        how = draw(st.sampled_from(("omit", "good", "wild") if wild else ("omit", "good")))
        if how != "omit":
            out[key] = draw(strategy if how == "good" else WILD)
    return out


def budget(n: int):
    """Settings for n examples, deterministic (derandomize) and without a database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


LARGER = {}  # property name -> the same property with five times the examples and another seed


def fuzz(n: int, *strategies):
    """A property run on n examples by default; LARGER keeps a 5n-example variant for `-m slow`."""
    def decorate(prop):
        LARGER[prop.__name__] = seed(20240601)(settings(budget(5 * n), derandomize=False)(given(*strategies)(prop)))
        return budget(n)(given(*strategies)(prop))
    return decorate


# ---- models and schedules -------------------------------------------------------------------------
SDES = {"linear": sd.VPSDE.linear(), "cosine": sd.VPSDE.cosine(),
        "chain": sd.VPSDE.from_betas(torch.linspace(1e-3, 0.2, 40, dtype=F64))}


def mixture(sde):
    """A smooth 2-D mixture: exact, cheap and differentiable (adaptive solvers finish quickly on it)."""
    return sd.GaussianMixture(sde, [1.0, 2.0], [[0.8, 0.1], [-0.5, -0.6]], [0.3, 0.4])


MIXTURES = {name: mixture(sde) for name, sde in SDES.items()}
GOOD_SDE = st.sampled_from(sorted(SDES))


# ---- sample ----------------------------------------------------------------------------------------------
OPTION_GOOD = {
    "variance": st.sampled_from(("posterior", "beta")), "eta": st.floats(0.0, 1.0),
    "rtol": st.floats(1e-3, 0.1), "atol": st.floats(1e-3, 0.1), "h_init": st.floats(1e-3, 0.1),
    "max_steps": st.integers(1, 10**4), "lower_order_final": st.booleans(), "s_churn": st.floats(0.0, 10.0),
    "s_tmin": st.floats(0.0, 1.0), "s_tmax": st.floats(1.0, math.inf), "s_noise": st.floats(0.5, 1.5),
    "predictor": st.sampled_from(pc._predictors()), "snr": st.floats(0.01, 0.5), "n_corrector": st.integers(0, 2),
    "step_size": st.sampled_from(pc.STEP_SIZES), "order": st.integers(1, 3), "variant": st.sampled_from(("bh1", "bh2")),
    "corrector": st.booleans(), "predictor_options": st.just({}),
}
METHODS = {"dopri5": ode.TORCHDIFFEQ_ADAPTIVE, "rk45": ode.SCIPY_METHODS, "torchsde": sde_solvers.TORCHSDE_METHODS}
SAMPLE_GOOD = {
    "shape": st.sampled_from([(3, 2), [3, 2], torch.Size([3, 2])]),
    "x_T": fresh(lambda: normal(3, 2), lambda: normal(3, 2, dtype=F64)),
    "steps": st.integers(1, 4),
    "grid": st.one_of(st.sampled_from(sorted(sd.GRIDS)), st.just(functools.partial(sd.grids.karras, rho=3.0)),
                      fresh(lambda: torch.tensor([0.9, 0.5, 0.05], dtype=F64))),
    "t_end": st.floats(1e-3, 0.5),
    "final_denoise": st.booleans(),
    "generator": st.one_of(st.integers(0, 9).map(lambda s: torch.Generator().manual_seed(s)),
                           st.just(None).map(lambda _: [torch.Generator().manual_seed(k) for k in range(3)])),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "device": st.sampled_from(["cpu", torch.device("cpu")]),
    "return_info": st.booleans(),
    "callback": st.just(lambda i, t, x: None),
    "progress": st.just(False),
}


@st.composite
def sample_call(draw, *, wild: bool):
    """(sde name, solver, keywords) for sd.sample; with wild=False, a combination that must work."""
    kwargs = draw(keywords(SAMPLE_GOOD, wild=wild))
    solver = draw(st.sampled_from(SOLVER_NAMES) if not wild else st.one_of(st.sampled_from(SOLVER_NAMES), WILD))
    spec = sd.SOLVERS.get(solver) if isinstance(solver, str) else None
    options = dict(spec.options) if spec is not None else {}
    for name in options:
        good = st.sampled_from(METHODS[solver]) if name == "method" else OPTION_GOOD[name]
        how = draw(st.sampled_from(("omit", "good", "wild") if wild else ("omit", "good")))
        if how != "omit":
            kwargs[name] = draw(good if how == "good" else WILD)
    if wild and draw(st.booleans()):  # an option of another solver
        kwargs[draw(st.sampled_from(sorted(OPTION_GOOD)))] = draw(WILD)
    if not wild:  # the combination rules a valid call keeps
        if spec.adaptive:
            kwargs.pop("steps", None), kwargs.pop("grid", None)
        if isinstance(kwargs.get("grid"), torch.Tensor):
            kwargs.pop("steps", None), kwargs.pop("t_end", None)
        if solver == "torchsde" and kwargs.get("grid") is not None:
            kwargs["grid"] = "uniform"
        if "x_T" in kwargs:
            kwargs.pop("dtype", None)
        if "x_T" not in kwargs and "shape" not in kwargs:
            kwargs["shape"] = (3, 2)
    return draw(GOOD_SDE), solver, kwargs


def check_sample(sde_name, solver, kwargs, *, entry):
    sde = SDES[sde_name]
    x_T = kwargs.get("x_T")
    want_shape = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else kwargs.get("shape")

    def sane(result):
        x, info = result if kwargs.get("return_info") is True else (result, None)
        sane_tensor(x, want_shape)
        TALLY["sample", "samples drawn"] += x.shape[0]
        if info is not None:
            assert info.nfe >= 1 and info.solver == solver

    names = set(kwargs) | {"shape", "x_T", "solver"}
    return answer(entry, lambda: sd.sample(MIXTURES[sde_name], sde, solver=solver, **kwargs), names, sane,
                  nan_ok=non_finite(kwargs.values()))


@fuzz(150, sample_call(wild=True))
def test_sample_wild(call):
    check_sample(*call, entry="sample")


@fuzz(60, sample_call(wild=False))
def test_sample_valid(call):
    assert check_sample(*call, entry="sample") in ("worked", "gave up")


# ---- VPSDE: constructors and methods ----------------------------------------------------------------
TIMES = st.one_of(st.floats(0.0, 0.99), st.lists(st.floats(0.0, 0.99), min_size=1, max_size=3),
                  st.lists(st.floats(0.0, 0.99), min_size=1, max_size=3).map(lambda v: torch.tensor(v, dtype=F64)),
                  st.just(0.5).map(torch.tensor))
SDE_MAKERS = {
    "linear": (sd.VPSDE.linear, {"beta_min": st.floats(0.0, 1.0), "beta_max": st.floats(1.0, 30.0)}),
    "cosine": (sd.VPSDE.cosine, {"s": st.floats(0.0, 0.1), "t_max": st.floats(0.9, 0.999)}),
    "from_betas": (sd.VPSDE.from_betas, {"betas": st.lists(st.floats(1e-4, 0.5), min_size=1, max_size=40)}),
}


def check_schedule(sde):
    """A constructed sde is sane: alpha^2 + sigma^2 = 1 with both in [0, 1] across [0, T]."""
    t = torch.linspace(0.0, sde.T, 9, dtype=F64)
    alpha, sigma = sde.alpha_sigma(t)
    assert bool(((alpha >= 0) & (alpha <= 1) & (sigma >= 0) & (sigma <= 1)).all())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))


@fuzz(120, st.sampled_from(sorted(SDE_MAKERS)), st.data())
def test_vpsde_constructors(kind, data):
    make, good = SDE_MAKERS[kind]
    kwargs = data.draw(keywords(good, wild=True))
    if kind == "from_betas" and "betas" not in kwargs:
        kwargs["betas"] = data.draw(WILD)
    answer("VPSDE constructors", lambda: make(**kwargs), set(kwargs) | {"schedule"}, check_schedule)


STATE = fresh(lambda: normal(3, 2))
SCALAR_TIME = st.floats(0.0, 0.99)
METHOD_ARGS = {  # method -> its arguments, each with a good strategy, in call order
    "alpha": {"t": TIMES}, "sigma": {"t": TIMES}, "log_alpha": {"t": TIMES}, "log_snr": {"t": TIMES},
    "beta": {"t": TIMES}, "t_from_log_snr": {"lam": st.floats(-8.0, 8.0)}, "discretize": {"N": st.integers(21, 60)},
    "t_to_index": {"t": SCALAR_TIME, "N": st.integers(1, 1000)},
    "index_to_t": {"n": st.integers(1, 1000), "N": st.integers(1, 1000)},
    "marginal": {"x0": STATE, "t": SCALAR_TIME, "noise": STATE}, "drift": {"x": STATE, "t": SCALAR_TIME},
    "pf_drift": {"x": STATE, "t": SCALAR_TIME, "score": STATE},
    "prior_sample": {"shape": st.just((3, 2)), "dtype": st.sampled_from([None, torch.float64])},
    "prior_logp": {"x": STATE},
}


def method_sane(sde, method, args, out):
    """In range, a method's result is sane; out-of-range or NaN inputs are only required not to crash."""
    t = args.get("t", 0.5)
    in_range = isinstance(t, (float, list, torch.Tensor)) and as_time(t).device.type != "meta" \
        and bool(((as_time(t) >= 0) & (as_time(t) <= sde.T)).all())
    if not in_range or non_finite([out]) or non_finite(args.values()):
        return
    if method in ("alpha", "sigma"):
        assert out.dtype == F64 and bool(((out >= 0) & (out <= 1)).all())
    elif method == "discretize":
        assert out.shape == (args["N"],) and bool(((out > 0) & (out < 1)).all())
    elif method in ("marginal", "drift", "pf_drift"):
        sane_tensor(out, args.get("x0", args.get("x")).shape)
    elif method == "prior_sample":
        sane_tensor(out, args["shape"])
    elif method == "prior_logp":
        sane_tensor(out, args["x"].shape[:1])


@fuzz(250, GOOD_SDE, st.sampled_from(sorted(METHOD_ARGS)), st.data())
def test_vpsde_methods(sde_name, method, data):
    """Each argument good or wild. Times outside [0, T] or NaN are computed by the formula (no check:
    a value check would read device tensors on the host inside sampling loops)."""
    args = {name: data.draw(st.one_of(good, WILD), label=name) for name, good in METHOD_ARGS[method].items()}
    sde = SDES[sde_name]
    call = getattr(sde, method)
    keyword = {"dtype": args.pop("dtype")} if method == "prior_sample" else {}
    names = set(args) | set(keyword)
    answer("VPSDE methods", lambda: call(*args.values(), **keyword), names,
           lambda out: method_sane(sde, method, args, out))


# ---- grids --------------------------------------------------------------------------------------------------
@fuzz(100, GOOD_SDE, st.sampled_from(sorted(sd.GRIDS)), st.data())
def test_grids(sde_name, name, data):
    sde = SDES[sde_name]
    args = {"steps": st.integers(1, 20), "t_start": st.just(sde.T), "t_end": st.floats(1e-3, 0.5)}
    if name == "karras":
        args["rho"] = st.floats(0.5, 10.0)
    wild = data.draw(st.booleans())
    drawn = {k: data.draw(st.one_of(v, WILD) if wild else v, label=k) for k, v in args.items()}

    def sane(times):
        sane_tensor(times, (drawn["steps"] + 1,), F64)
        assert bool((times[1:] < times[:-1]).all()) and times[0] == drawn["t_start"] and times[-1] == drawn["t_end"]

    verdict = answer("grids", lambda: sd.GRIDS[name](sde, **drawn), set(drawn) | {"sde"}, sane)
    assert wild or verdict == "worked"


# ---- Denoiser -----------------------------------------------------------------------------------------------
class TimeScaledNet(torch.nn.Module):
    """A network that uses its time input (so a wrong one would show)."""

    def forward(self, x, time):
        return 0.1 * x * (1.0 + time.to(x.dtype)[:, None] / 1000.0)


NETS = fresh(lambda: (lambda x, time: 0.5 * x), TimeScaledNet,
             lambda: (lambda x, time: types.SimpleNamespace(sample=0.5 * x)))
DENOISER_GOOD = {
    "prediction": st.sampled_from(sd.prediction.PREDICTIONS),
    "time_input": st.sampled_from(["t", "index", lambda t: t * 999.0]),
    "num_steps": st.integers(1, 1000),
}
CALL_GOOD = {
    "x": fresh(lambda: normal(3, 2), lambda: normal(3, 2, dtype=F64)),
    "t": st.one_of(st.floats(1e-3, 0.99), st.floats(1e-3, 0.99).map(lambda v: torch.full((3,), v)),
                   st.floats(1e-3, 0.99).map(torch.tensor)),
    "kind": st.sampled_from(sd.prediction.PREDICTIONS),
}


@fuzz(150, GOOD_SDE, st.booleans(), st.sampled_from(["__call__", "eps", "x0", "score", "v", "predict"]), st.data())
def test_denoiser(sde_name, wild, method, data):
    sde = SDES[sde_name]
    kwargs = data.draw(keywords(DENOISER_GOOD, wild=wild))
    net = data.draw(st.one_of(NETS, WILD) if wild else NETS, label="net")
    if not wild and kwargs.get("time_input") == "index" and sde.num_steps is None:
        kwargs.setdefault("num_steps", 1000)
    call = {k: data.draw(st.one_of(v, WILD) if wild else v, label=k) for k, v in CALL_GOOD.items()}
    built = {}

    def construct():
        built["d"] = sd.Denoiser(net, sde, **kwargs)

    verdict = answer("Denoiser", construct, set(kwargs) | {"net", "sde", "time_input"}, lambda _: None)
    assert wild or verdict == "worked"
    if verdict != "worked":
        return
    d = built["d"]
    run = (lambda: d.predict(call["x"], call["t"]).as_kind(call["kind"])) if method == "predict" else \
        (lambda: getattr(d, method)(call["x"], call["t"]))
    x = call["x"]
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
    verdict = answer("Denoiser", run, {"x", "t", "kind", "net"}, lambda out: sane_tensor(out, shape),
                     nan_ok=non_finite(call.values()))
    assert wild or verdict == "worked"


# ---- log_likelihood ---------------------------------------------------------------------------------------
LIKELIHOOD_GOOD = {
    "t_eps": st.floats(1e-4, 0.5), "divergence": st.sampled_from(("auto", "exact", "hutchinson")),
    "probes": st.integers(1, 3), "probe": st.sampled_from(("rademacher", "gaussian")),
    "solver": st.sampled_from(("euler", "heun", "rk4", "dopri5")), "steps": st.integers(1, 3),
    "rtol": st.floats(1e-3, 0.1), "atol": st.floats(1e-3, 0.1), "levels": st.sampled_from([None, 256]),
    "generator": st.integers(0, 9).map(lambda s: torch.Generator().manual_seed(s)), "return_stats": st.booleans(),
}


@fuzz(120, GOOD_SDE, st.booleans(), st.data())
def test_log_likelihood(sde_name, wild, data):
    sde = SDES[sde_name]
    kwargs = data.draw(keywords(LIKELIHOOD_GOOD, wild=wild))
    good_x = fresh(lambda: normal(3, 2, uniform=True), lambda: normal(3, 2, dtype=F64, uniform=True))
    x = data.draw(st.one_of(good_x, WILD) if wild else good_x, label="x")
    if not wild and kwargs.get("solver", "dopri5") == "dopri5":
        kwargs.pop("steps", None)

    def sane(result):
        sane_tensor(result.nats, (3,), F64)
        assert (result.bpd is None) == (kwargs.get("levels") is None) and result.nfe >= 1
        if result.bpd is not None:
            sane_tensor(result.bpd, (3,))

    verdict = answer("log_likelihood", lambda: sd.log_likelihood(MIXTURES[sde_name], sde, x, **kwargs),
                     set(kwargs) | {"x"}, sane)
    assert wild or verdict == "worked"


# ---- guidance ------------------------------------------------------------------------------------------------
class Classifier(torch.nn.Module):
    """Logits linear in x: differentiable, 4 classes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8).reshape(2, 4))

    def forward(self, x, t):
        return x.to(self.weight.dtype) @ self.weight


def build_guidance(kind, sde_name, kw):
    sde, model = SDES[sde_name], MIXTURES[sde_name]
    if kind == "cfg":
        return sd.ClassifierFreeGuidance(kw.pop("net"), sde, **kw)
    if kind == "classifier":
        return sd.ClassifierGuidance(model, sde, kw.pop("classifier"), **kw)
    if kind == "inpaint":
        return sd.Inpaint(model, sde, **kw)
    fn = sd.dynamic_threshold(**kw["dynamic"]) if kw["use_dynamic"] else sd.static_threshold(**kw["static"])
    return sd.X0Correction(model, sde, fn)


GUIDANCE_GOOD = {
    "cfg": {"net": fresh(lambda: (lambda x, time, y: 0.5 * x)), "cond": st.integers(0, 2), "scale": st.floats(0.0, 5.0),
            "null": st.just(3), "num_classes": st.just(3), "prediction": st.sampled_from(sd.prediction.PREDICTIONS)},
    "classifier": {"classifier": fresh(Classifier), "target": st.integers(0, 3), "scale": st.floats(0.0, 5.0)},
    "inpaint": {"known": fresh(lambda: normal(3, 2)),
                "mask": fresh(lambda: torch.tensor([True, False]), lambda: torch.tensor([[1.0, 0.0]] * 3)),
                "generator": st.integers(0, 9).map(lambda s: torch.Generator().manual_seed(s))},
}
REQUIRED = {"cfg": ("net", "cond", "scale", "num_classes"), "classifier": ("classifier", "target", "scale"),
            "inpaint": ("known", "mask")}
THRESHOLDS = {"percentile": st.floats(0.5, 1.0), "max_value": st.floats(0.5, 2.0), "lo": st.floats(-2.0, -0.5),
              "hi": st.floats(0.5, 2.0)}


@fuzz(150, GOOD_SDE, st.sampled_from(["cfg", "classifier", "inpaint", "x0"]), st.booleans(), st.data())
def test_guidance(sde_name, kind, wild, data):
    if kind == "x0":  # the x0 hook takes a threshold function: its arguments are the ones fuzzed
        kw = {"use_dynamic": data.draw(st.booleans()),
              "dynamic": data.draw(keywords({k: THRESHOLDS[k] for k in ("percentile", "max_value")}, wild=wild)),
              "static": data.draw(keywords({k: THRESHOLDS[k] for k in ("lo", "hi")}, wild=wild))}
        names = set(kw["dynamic"]) | set(kw["static"])
    else:
        kw = data.draw(keywords(GUIDANCE_GOOD[kind], wild=wild))
        for key in REQUIRED[kind]:
            kw.setdefault(key, data.draw(GUIDANCE_GOOD[kind][key]))
        names = set(kw)
    built = {}

    def construct():
        built["wrapper"] = build_guidance(kind, sde_name, dict(kw))

    verdict = answer("guidance", construct, names, lambda _: None)
    assert wild or verdict == "worked", kw
    if verdict != "worked":
        return
    t = data.draw(st.one_of(st.floats(1e-3, 0.9), st.floats(1e-3, 0.9).map(lambda v: torch.full((3,), v))))
    # A scale of 1e308 multiplies eps beyond the float range: inf is the formula's answer (sample()
    # then reports the model call that returned it); below that the output must be finite.
    extreme = any(isinstance(v, (int, float)) and abs(v) > 1e30 for v in kw.values())
    verdict = answer("guidance", lambda: built["wrapper"](normal(3, 2), t), names | {"x", "t"},
                     lambda out: sane_tensor(out, (3, 2), finite=not extreme))
    assert wild or verdict == "worked", kw


# ---- TrainConfig and apply_overrides ------------------------------------------------------------------------
FIELDS = {f.name: f for f in train_config.dataclasses.fields(train_config.TrainConfig)}
FIELD_GOOD = {
    "data": st.sampled_from(["digits", "mixture"]), "model": st.sampled_from(["tiny", "digits", "toy2d"]),
    "model_overrides": st.just({}), "schedule": st.sampled_from(["linear", "cosine"]), "beta_min": st.floats(0.0, 1.0),
    "beta_max": st.floats(1.0, 30.0), "cosine_s": st.floats(0.0, 0.1), "target": st.sampled_from(["eps", "x0", "v"]),
    "time": st.just("continuous"), "t_eps": st.floats(1e-4, 0.1), "num_steps": st.sampled_from([None, 1000]),
    "min_snr_gamma": st.sampled_from([None, 5.0]), "cond_drop": st.floats(0.0, 0.5), "steps": st.integers(1, 10**6),
    "split": st.sampled_from(["all", "train"]), "resolution": st.sampled_from([0, 4]), "lowres": st.sampled_from([0, 4]),
    "lowres_aug": st.floats(0.0, 1.0), "lowres_aug_sample": st.floats(0.0, 0.5),
    "batch_size": st.sampled_from([8, 16, 128]), "grad_accum": st.sampled_from([1, 2, 4]), "lr": st.floats(1e-5, 1e-2),
    "weight_decay": st.floats(0.0, 0.1), "warmup": st.integers(0, 1000), "grad_clip": st.floats(0.1, 10.0),
    "ema_decay": st.floats(0.0, 0.9999), "ema_warmup": st.booleans(), "bf16": st.booleans(), "compile": st.booleans(),
    "channels_last": st.booleans(), "max_nan_steps": st.integers(1, 10), "out": st.just("runs/x"),
    "log_every": st.integers(1, 100), "sample_every": st.integers(1, 100), "ckpt_every": st.integers(1, 100),
    "keep": st.integers(1, 5), "sample_n": st.integers(1, 64), "sample_solver": st.sampled_from(SOLVER_NAMES),
    "sample_steps": st.integers(1, 50), "seed": st.integers(0, 2**32 - 1), "device": st.sampled_from(["auto", "cpu"]),
}
assert set(FIELD_GOOD) == set(FIELDS), "every TrainConfig field needs a good value here"


def check_config(config):
    assert isinstance(config, train_config.TrainConfig)
    check_schedule(config.sde())
    config.objective()


@fuzz(150, st.booleans(), st.data())
def test_train_config(wild, data):
    kwargs = data.draw(keywords(FIELD_GOOD, wild=wild))
    verdict = answer("TrainConfig", lambda: train_config.TrainConfig(**kwargs).validate(), set(kwargs), check_config)
    assert wild or verdict == "worked"


OVERRIDE_TEXT = st.one_of(st.sampled_from(["none", "true", "false", "nan", "inf", "-inf", "-1", "0", "1", "2",
                                           "1e-3", "0.5", "1e400", "99999999999999999999999", "", "abc", "[1]",
                                           "linear", "heun", "cuda", "meta"]), st.text(max_size=5))


@st.composite
def override(draw):
    """'key=value': a field (or a network argument, or a typo) with its own good value or any text."""
    key = draw(st.sampled_from(sorted(FIELD_GOOD) + ["model.base_channels", "model.nope", "stepz", ""]))
    good = FIELD_GOOD[key].map(str) if key in FIELD_GOOD else st.just("16")
    return key + draw(st.sampled_from(["=", "=", "=", "", "=="])) + draw(st.one_of(good, OVERRIDE_TEXT))


@fuzz(150, st.sampled_from(sorted(train_config.PRESETS)), st.lists(override(), max_size=4))
def test_apply_overrides(name, overrides):
    names = {item.split("=")[0] for item in overrides} | {"override", "overrides"}
    answer("apply_overrides", lambda: train_config.apply_overrides(train_config.preset(name), overrides).validate(),
           names, check_config)


@fuzz(40, st.one_of(WILD, st.lists(WILD, max_size=2)),
      st.one_of(WILD, st.just(None).map(lambda _: train_config.preset("toy2d"))))
def test_apply_overrides_wrong_types(overrides, config):
    answer("apply_overrides", lambda: train_config.apply_overrides(config, overrides),
           {"config", "overrides", "override"}, lambda out: None)


# ---- the command line -------------------------------------------------------------------------------------
ARG_VALUES = st.one_of(st.sampled_from(["0", "1", "2", "-1", "abc", "", "nan", "1e9", "99999999999999999999",
                                        "cpu", "meta", "cuda", "foo:0", "heun", "dopri5", "karras", "digits",
                                        "toy2d", "mixture", "steps=2", "lr=x", "nope=1", "model.x=1", "/nonexistent",
                                        "OUT/s.npy", "OUT/s.png", "OUT/s.txt", "OUT/chunks/",
                                        "scoresde/assets/digits"]),
                       st.text(max_size=4))
OPTIONS = {
    "sample": ["--model", "--solver", "--steps", "--grid", "--n", "--seed", "--device", "--out", "--batch-size",
               "--raw"],
    "train": ["--preset", "--set", "--out", "--resume", "--overwrite", "--device"],
    "likelihood": ["--model", "--n", "--divergence", "--probes", "--solver", "--steps", "--seed", "--device",
                   "--progress", "--no-progress"],
    "export": [], "presets": [],
}


FLAGS = ("--resume", "--overwrite", "--raw", "--progress", "--no-progress")  # options without a value
OPTION_VALUES = {  # good values per option (OUT is the test's folder)
    "--model": ["mixture", "scoresde/assets/digits"], "--solver": SOLVER_NAMES, "--steps": ["1", "2"],
    "--grid": sorted(sd.GRIDS), "--n": ["2", "3"], "--seed": ["0", "7"], "--device": ["cpu"],
    "--out": ["OUT/s.npy", "OUT/s.png", "OUT/chunks/"], "--batch-size": ["2"], "--preset": sorted(train_config.PRESETS),
    "--set": ["steps=2", "lr=1e-3", "model.base_channels=8"], "--divergence": ["auto", "exact", "hutchinson"],
    "--probes": ["1", "2"], "--bogus": ["1"],
}


@st.composite
def argv(draw):
    command = draw(st.sampled_from(sorted(OPTIONS) + ["", "nope", "--help-me"]))
    tokens = [command] if command else []
    if command == "export":
        tokens += draw(st.lists(st.sampled_from(["scoresde/assets/digits", "OUT/export", "/nonexistent"]), max_size=3))
    for _ in range(draw(st.integers(0, 4))):
        option = draw(st.sampled_from(OPTIONS.get(command, []) + ["--bogus"]))
        tokens.append(option)
        if option not in FLAGS:
            tokens.append(draw(st.one_of(st.sampled_from(OPTION_VALUES[option]), ARG_VALUES)))
    if command == "sample":  # keep runs cheap where the draw left it open: few samples, few steps
        for option, value in (("--n", "3"), ("--steps", "2"), ("--model", "mixture")):
            if option not in tokens and (option != "--model" or draw(st.booleans())):
                tokens += [option, value]
    return tokens


@contextlib.contextmanager
def cheap_commands():
    """A scratch folder, and training and likelihood as cheap stand-ins that keep every argument check:
    train() validates its config and stops; log_likelihood runs the real checks on one image with a
    linear model."""
    real_likelihood = sd.likelihood.log_likelihood

    def likelihood(model, sde, x, **kw):
        if isinstance(kw.get("steps"), int) and 3 < kw["steps"] <= MAX_STEPS:
            kw["steps"] = 3  # valid either way; fewer steps are quicker
        return real_likelihood(lambda y, t: 0.1 * y, sde, x[:1].flatten(1), **kw)

    with tempfile.TemporaryDirectory() as out, pytest.MonkeyPatch.context() as patches:
        patches.setattr(train_loop, "train",
                        lambda config, resume=False, overwrite=False: config.validate() and Path(out) / "none")
        patches.setattr(sd.likelihood, "log_likelihood", likelihood)
        yield out


@fuzz(60, argv())
def test_cli(tokens):
    """argparse's exit 2 with a usage line, a return code 0, or a return code 2 with one line
    'scoresde <command>: error: ...' naming something the command line gave; never a traceback."""
    TALLY["command line", "tried"] += 1
    err = io.StringIO()
    with cheap_commands() as out, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        tokens = [t.replace("OUT", out) for t in tokens]
        try:
            code = cli.main(tokens)
        except SystemExit as exit_:
            code = exit_.code
            assert code == 0 or (code == 2 and "usage:" in err.getvalue()), err.getvalue()
            TALLY["command line", "worked" if code == 0 else "refused"] += 1
            return
    if code == 0:
        TALLY["command line", "worked"] += 1
        return
    message = err.getvalue().strip().splitlines()[-1]
    assert code == 2 and re.match(r"scoresde \w+: error: ", message), err.getvalue()
    given_words = {w for t in tokens for w in (t, t.lstrip("-"), t.lstrip("-").replace("-", "_"), t.split("=")[0]) if w}
    assert any(w in message for w in given_words), message
    TALLY["command line", "refused"] += 1


# ---- a larger budget, and the tally ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGER))
def test_larger_budget(name):
    LARGER[name]()


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    entries = sorted({entry for entry, _ in TALLY})
    lines = [f"{e:20s} tried {TALLY[e, 'tried']:5d}  worked {TALLY[e, 'worked']:5d}  refused {TALLY[e, 'refused']:5d}"
             f"  gave up {TALLY[e, 'gave up']:3d}" for e in entries]
    total = {v: sum(TALLY[e, v] for e in entries) for v in ("tried", "worked", "refused", "gave up")}
    print("\nfuzz tally:\n" + "\n".join(lines) + f"\n{'all':20s} " + "  ".join(f"{k} {n}" for k, n in total.items())
          + f"\nsamples drawn by sample(): {TALLY['sample', 'samples drawn']}")
