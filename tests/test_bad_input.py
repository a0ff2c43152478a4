"""Wrong input is refused at the door: a ValueError or TypeError that names the argument and the
value, raised before the model is called even once; bad model output is caught at the call that
produced it (wrong shape) or right after the loop (NaN/inf), naming the step and the time."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scoresde as sd
from scoresde.solvers.options import Flag, Integer, Number, Table

F64 = torch.float64
SOLVER_NAMES = sorted(sd.SOLVERS)
ADAPTIVE = [n for n in SOLVER_NAMES if sd.SOLVERS[n].adaptive]


class Counting:
    """An exact eps model (a small Gaussian mixture) that counts its calls."""

    def __init__(self, sde):
        self.mix = sd.GaussianMixture(sde, [1.0, 2.0], [[0.8, 0.1], [-0.5, -0.6]], [0.2, 0.3])
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.mix(x, t)


def rejected(exc, *fragments, sde=None, **kwargs):
    """Call sample(**kwargs) expecting `exc` with every fragment in its message and no model call."""
    sde = sde or sd.VPSDE.linear()
    model = Counting(sde)
    kwargs.setdefault("shape", (4, 2))
    with pytest.raises(exc) as info:
        sd.sample(model, sde, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert model.calls == 0, "the input should have been refused before any model call"
    return message


# ---- steps, solver, options --------------------------------------------------------------------------
@pytest.mark.parametrize("steps,exc", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError),
                                       ("10", TypeError)])
def test_bad_steps(steps, exc):
    rejected(exc, f"steps={steps!r}", solver="heun", steps=steps)


@settings(deadline=None, max_examples=25)
@given(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=3)))
def test_any_non_positive_or_non_int_steps_is_refused(steps):
    rejected((ValueError, TypeError), "steps=", solver="euler", steps=steps)


def test_unknown_solver_lists_known_ones_and_suggests_the_closest():
    msg = rejected(ValueError, "solver='heu'", "'heun'", solver="heu")
    assert all(name in msg for name in SOLVER_NAMES)
    assert re.search(r"did you mean 'heun'", msg)
    msg = rejected(ValueError, "'euler_maruyama'", solver="euler_maruyam")
    assert "did you mean 'euler_maruyama'" in msg
    rejected(TypeError, "solver=3", solver=3)


def test_unknown_solver_without_a_close_match_reads_well():
    msg = rejected(ValueError, "solver='xyz'", solver="xyz")
    assert "unknown Known" not in msg


@pytest.mark.parametrize("solver,option", [("heun", "eta"), ("euler", "variance"), ("ancestral", "eta"),
                                           ("dopri5", "steps_per_call"), ("euler_maruyama", "method")])
def test_unknown_solver_option(solver, option):
    rejected(TypeError, repr(solver), option, solver=solver, **{option: 0.5})


def test_unknown_rk45_method():
    rejected(ValueError, "method='nope'", solver="rk45", method="nope")


def _bad_values(option) -> list:
    """(value, error) pairs that a declared option refuses, derived from the declaration itself."""
    if isinstance(option, Number):
        bad = [("0.5", TypeError), (True, TypeError), (None, TypeError), (float("nan"), ValueError)]
        bad += [(option.low - 1.0, ValueError)] if option.low > -math.inf else []
        bad += [(option.low, ValueError)] if option.low_open else []
        bad += [(option.high + 1.0, ValueError)] if option.high < math.inf else []
        return bad + ([(math.inf, ValueError)] if option.finite else [])
    if isinstance(option, Integer):
        bad = [(1.5, TypeError), (True, TypeError), ("1", TypeError)]
        bad += [(int(option.low) - 1, ValueError)] if option.low > -math.inf else []
        return bad + ([(int(option.high) + 1, ValueError)] if option.high < math.inf else [])
    if isinstance(option, Flag):
        return [("yes", TypeError), (1, TypeError), (None, TypeError)]
    if isinstance(option, Table):
        return [([("s_churn", 1.0)], TypeError), ({1: 2.0}, TypeError)]
    return [(3, TypeError), (None, TypeError), ("nope", ValueError)]  # names: Choice, pc's predictor


DECLARED = [(name, option, value, error) for name in SOLVER_NAMES
            for option, declaration in sd.SOLVERS[name].declared.items()
            for value, error in _bad_values(declaration)]


@pytest.mark.parametrize("solver,option,value,error", DECLARED,
                         ids=[f"{s}-{o}-{v!r}" for s, o, v, _ in DECLARED])
def test_every_declared_option_is_checked_by_the_one_validator(solver, option, value, error):
    """One rule for every solver: a TypeError for a wrong type, a ValueError for a wrong value,
    naming the option, the value, the solver and what is allowed, before any model call."""
    kw = {} if sd.SOLVERS[solver].adaptive else {"steps": 5}
    allowed = sd.SOLVERS[solver].declared[option].describe()
    message = rejected(error, f"{option}={value!r}", f"solver {solver!r} expects", solver=solver,
                       **{option: value}, **kw)
    assert allowed in message


def test_the_issue_examples_are_one_rule_now():
    """The inconsistencies the redesign removed: a str tolerance and a str flag are TypeErrors
    everywhere, like final_denoise="yes"."""
    for solver in ("dopri5", "rk45", "adaptive_sde"):
        rejected(TypeError, "rtol='1e-5'", solver=solver, rtol="1e-5")
    rejected(TypeError, "final_denoise='yes'", solver="heun", steps=5, final_denoise="yes")
    rejected(TypeError, "lower_order_final='yes'", solver="dpm_solver_pp_2m", steps=5, lower_order_final="yes")


def test_pc_checks_its_predictors_options_against_the_predictors_declarations():
    rejected(ValueError, "s_churn=-1.0", "solver 'edm' expects", solver="pc", steps=5, predictor="edm",
             predictor_options={"s_churn": -1.0})
    rejected(TypeError, "solver 'heun' got unknown option(s) eta", solver="pc", steps=5, predictor="heun",
             predictor_options={"eta": 0.5})


def test_a_solver_must_declare_its_options():
    def undeclared(planner, eta: float = 0.0):
        pass

    with pytest.raises(TypeError, match="option 'eta' has a default but no declaration"):
        sd.solvers.register("undeclared_options")(undeclared)
    assert "undeclared_options" not in sd.SOLVERS


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_solvers_take_no_steps_or_grid(solver):
    rejected(ValueError, repr(solver), "steps=10", solver=solver, steps=10)
    rejected(ValueError, repr(solver), "grid='uniform'", solver=solver, grid="uniform")


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_solvers_refuse_an_explicit_grid(solver):
    rejected(ValueError, repr(solver), "grid", solver=solver, grid=torch.tensor([1.0, 0.5, 0.1], dtype=F64))


# ---- t_end and grids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t_end,exc", [(0, ValueError), (1, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                       ("a", TypeError), (float("nan"), ValueError), (True, TypeError)])
def test_bad_t_end(t_end, exc):
    rejected(exc, f"t_end={t_end!r}", solver="euler", steps=5, t_end=t_end)


def test_t_end_must_lie_below_the_cosine_start():
    sde = sd.VPSDE.cosine()  # starts at T = 0.9946, not 1
    rejected(ValueError, "t_end=0.995", sde=sde, solver="euler", steps=5, t_end=0.995)


@settings(deadline=None, max_examples=25)
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0)))
def test_any_t_end_outside_the_open_interval_is_refused(t_end):
    rejected(ValueError, "t_end=", solver="euler", steps=3, t_end=t_end)


@pytest.mark.parametrize("grid,fragment", [
    (torch.tensor([0.1, 0.5, 1.0], dtype=F64), "decreasing"),
    (torch.tensor([1.0, 0.5, 0.5, 0.1], dtype=F64), "decreasing"),
    (torch.tensor([1.0, float("nan"), 0.1], dtype=F64), "finite"),
    (torch.tensor([1.5, 0.5, 0.1], dtype=F64), "1.5"),
    (torch.tensor([1.0, 0.5, 0.0], dtype=F64), "0.0"),
    (torch.tensor([1.0, 0.5, -0.2], dtype=F64), "-0.2"),
    (torch.tensor([1.0], dtype=F64), "at least 2"),
    (torch.tensor([[1.0, 0.5, 0.1]], dtype=F64), "1-D"),
])
def test_bad_explicit_grid(grid, fragment):
    rejected(ValueError, "grid", fragment, solver="euler", grid=grid)


def test_explicit_grid_disagreeing_with_steps_or_t_end():
    grid = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    rejected(ValueError, "steps=5", "2 steps", solver="euler", grid=grid, steps=5)
    rejected(ValueError, "t_end=0.2", "0.1", solver="euler", grid=grid, t_end=0.2)


def test_explicit_grid_agreeing_with_steps_and_t_end_is_accepted():
    sde = sd.VPSDE.linear()
    grid = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    _, info = sd.sample(Counting(sde), sde, shape=(2, 2), solver="euler", grid=grid, steps=2, t_end=0.1,
                        return_info=True)
    assert info.steps == 2 and torch.equal(info.times, grid)


def test_bad_t_end_type_with_an_explicit_grid():
    rejected(TypeError, "t_end='a'", solver="euler", grid=torch.tensor([1.0, 0.5, 0.1], dtype=F64), t_end="a")


def test_unknown_grid_name():
    rejected(ValueError, "grid='cosine'", "log_snr", solver="euler", steps=5, grid="cosine")
    rejected(TypeError, "grid=3", solver="euler", steps=5, grid=3)


# ---- x_T, shape, dtype, device, generator -----------------------------------------------------------------
def test_x_T_disagreeing_with_shape_dtype_or_device():
    x_T = torch.randn(4, 2)
    rejected(ValueError, "shape=(3, 2)", "(4, 2)", x_T=x_T, shape=(3, 2))
    rejected(ValueError, "float64", "float32", x_T=x_T, shape=None, dtype=F64)
    rejected(ValueError, "device=meta", "cpu", x_T=x_T, shape=None, device="meta")


def test_non_floating_x_T():
    rejected(TypeError, "x_T", x_T=torch.ones(4, 2, dtype=torch.long), shape=None)
    rejected(TypeError, "x_T", x_T=np.zeros((4, 2)), shape=None)


def test_non_floating_x_T_names_its_dtype():
    rejected(TypeError, "x_T", "int64", x_T=torch.ones(4, 2, dtype=torch.long), shape=None)


@pytest.mark.parametrize("shape", [(0, 2), (2, -1), (2.0, 2), "4", ()])
def test_bad_shape(shape):
    rejected(ValueError, f"shape={shape!r}", shape=shape)


def test_missing_shape_and_x_T():
    rejected(ValueError, "shape", shape=None)


def test_bad_dtype_and_generator():
    rejected(TypeError, "dtype=torch.int32", dtype=torch.int32)
    rejected(TypeError, "generator=3", generator=3)
    rejected(ValueError, "1 generators", "batch of 4", solver="ancestral", steps=3,
             generator=[torch.Generator()])


def test_bad_sde_model_callback_final_denoise():
    sde = sd.VPSDE.linear()
    with pytest.raises(TypeError, match="sde='vp'"):
        sd.sample(Counting(sde), "vp", shape=(2, 2))
    with pytest.raises(TypeError, match="model=3"):
        sd.sample(3, sde, shape=(2, 2))
    rejected(TypeError, "callback=3", callback=3)
    rejected(TypeError, "final_denoise=1", final_denoise=1)


# ---- schedules --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("betas,fragment", [
    ([0.1, 0.0, 0.2], "betas[1]=0.0"),
    ([0.1, 1.0], "betas[1]=1.0"),
    ([-0.1, 0.2], "betas[0]=-0.1"),
    ([0.1, float("nan")], "betas[1]=nan"),
    ([0.1, float("inf")], "betas[1]=inf"),
    ([[0.1, 0.2], [0.1, 0.2]], "(2, 2)"),
    ([], "(0,)"),
])
def test_bad_betas(betas, fragment):
    with pytest.raises(ValueError) as info:
        sd.VPSDE.from_betas(betas)
    assert "betas" in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(beta_min=5.0, beta_max=1.0), "beta_max=1.0"),
    (dict(beta_min=-0.1), "beta_min=-0.1"),
    (dict(beta_max=float("nan")), "beta_max=nan"),
    (dict(beta_max=0.0, beta_min=0.0), "beta_max=0.0"),
])
def test_bad_linear_schedule(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        sd.VPSDE.linear(**kwargs)


@pytest.mark.parametrize("kwargs,fragment", [(dict(s=-0.1), "s=-0.1"), (dict(s=float("nan")), "s=nan"),
                                             (dict(t_max=1.0), "t_max=1.0"), (dict(t_max=0.0), "t_max=0.0")])
def test_bad_cosine_schedule(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        sd.VPSDE.cosine(**kwargs)


# ---- Denoiser ---------------------------------------------------------------------------------------------
def test_bad_denoiser_arguments():
    sde = sd.VPSDE.linear()
    net = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="prediction='noise'"):
        sd.Denoiser(net, sde, prediction="noise")
    with pytest.raises(ValueError, match="time_input='sigma'"):
        sd.Denoiser(net, sde, time_input="sigma")
    with pytest.raises(ValueError, match="time_input='index'.*num_steps"):
        sd.Denoiser(net, sde, time_input="index")  # a continuous sde has no chain length
    with pytest.raises(ValueError, match="num_steps=0"):
        sd.Denoiser(net, sde, time_input="index", num_steps=0)
    with pytest.raises(TypeError, match="net=3"):
        sd.Denoiser(3, sde)
    with pytest.raises(TypeError, match="sde="):
        sd.Denoiser(net, "vp")
    # ... while a discrete chain knows its N, and num_steps serves a continuous sde.
    sd.Denoiser(net, sd.VPSDE.from_betas(np.linspace(1e-4, 0.02, 10)), time_input="index")
    sd.Denoiser(net, sde, time_input="index", num_steps=1000)


# ---- bad model output -------------------------------------------------------------------------------------
# One check (ModelRun._checked) serves every solver: the plan executor's path with each wrong shape,
# and each whole-run solver (adaptive ones, the torchsde bridge) once.
WRONG_SHAPES = ([("ddim", wrong) for wrong in ("flat", "extra_dim", "batch")] + [("unipc", "flat"), ("edm", "batch")]
                + [(name, "batch") for name in SOLVER_NAMES if not sd.SOLVERS[name].plans])


@pytest.mark.parametrize("solver,wrong", WRONG_SHAPES)
def test_model_output_of_the_wrong_shape(solver, wrong):
    sde = sd.VPSDE.linear()
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        out = torch.zeros_like(x)
        return {"flat": out.flatten(), "extra_dim": out[..., None], "batch": out[:1]}[wrong]

    kw = {} if sd.SOLVERS[solver].adaptive else {"steps": 5}
    with pytest.raises(ValueError) as info:
        sd.sample(model, sde, shape=(4, 2), solver=solver, **kw)
    msg = str(info.value)
    wrong_shape = {"flat": (8,), "extra_dim": (4, 2, 1), "batch": (1, 2)}[wrong]
    assert str(wrong_shape) in msg and "(4, 2)" in msg
    assert len(calls) == 1  # caught at the first call
    t = re.search(r"t=([-+.\deE]+)", msg).group(1)
    assert float(t) == pytest.approx(calls[0], rel=1e-5)
    if not (sd.SOLVERS[solver].adaptive or solver == "torchsde"):  # those name the time only
        assert int(re.search(r"step (\d+),", msg).group(1)) == 0


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_nan_from_the_model_names_the_step_and_time(solver):
    """A model that returns NaN only below t = 0.5: the error names the step in progress at the
    first such call (0-based, like the callback's i) and that call's time (adaptive_sde, which steps
    each sample on its own: the time of the first sample below 0.5)."""
    sde = sd.VPSDE.linear()
    mix = sd.GaussianMixture.ring2d(sde)
    completed, calls = [0], []

    def model(x, t):
        below = t < 0.5
        calls.append((completed[0], float(t[below][0] if below.any() else t[0])))
        eps = mix(x, t)
        return torch.where(t[:, None] < 0.5, torch.full_like(eps, float("nan")), eps)

    def callback(i, t, x):
        completed[0] = i + 1

    kw = {} if sd.SOLVERS[solver].adaptive else {"steps": 10}
    with pytest.raises(FloatingPointError) as info:
        sd.sample(model, sde, shape=(4, 2), dtype=F64, solver=solver, callback=callback,
                  **kw)
    message = str(info.value)
    t = re.search(r"t=([-+.\deE]+)", message).group(1)
    first_bad = next(c for c in calls if c[1] < 0.5)
    assert float(t) == pytest.approx(first_bad[1], rel=1e-5)
    assert float(t) < 0.5
    if sd.SOLVERS[solver].adaptive or solver == "torchsde":
        assert "step" not in message  # these step on their own: the time is what locates the call
    else:
        assert int(re.search(r"step (\d+),", message).group(1)) == first_bad[0]


def test_nan_error_comes_after_the_loop_not_mid_loop():
    """The finiteness check is deferred (no host sync per step): every step still runs."""
    sde = sd.VPSDE.linear()
    n = [0]

    def model(x, t):
        n[0] += 1
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match=r"model call 1 \(step 0, t=1\)"):
        sd.sample(model, sde, shape=(2, 2), solver="euler", steps=7)
    assert n[0] == 8


def test_inf_is_caught_like_nan():
    sde = sd.VPSDE.linear()
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        sd.sample(lambda x, t: torch.full_like(x, math.inf), sde, shape=(2, 2), solver="heun", steps=3)


# ---- registering a solver ----------------------------------------------------------------------------------
def _solver(model, x, times, *, noise, callback):
    return x


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"name": "heun"}, ValueError, "registered already"),
    ({"name": "my solver"}, ValueError, "name='my solver'"),
    ({"name": "mine", "grid": "cubic"}, ValueError, "grid='cubic'"),
    ({"name": "mine", "nfe_per_step": 0}, ValueError, "nfe_per_step=0"),
    ({"name": "mine", "stochastic": 1}, TypeError, "stochastic=1"),
])
def test_register_refuses_bad_arguments_and_a_taken_name(kwargs, error, fragment):
    name = kwargs.pop("name")
    with pytest.raises(error, match=re.escape(fragment)):
        sd.solvers.register(name, **kwargs)(_solver)
    assert sd.SOLVERS["heun"].fn.__name__ == "heun"  # nothing was replaced


def test_register_refuses_a_function_without_the_shared_signature():
    with pytest.raises(TypeError, match=r"lacks the shared argument\(s\) \['noise', 'callback'\]"):
        sd.solvers.register("mine")(lambda model, x, times: x)
    assert "mine" not in sd.SOLVERS


def test_register_replaces_only_when_asked():
    try:
        sd.solvers.register("mine_twice")(_solver)
        sd.solvers.register("mine_twice", replace=True, nfe_per_step=2)(_solver)
        assert sd.SOLVERS["mine_twice"].nfe_per_step == 2
    finally:
        sd.SOLVERS.pop("mine_twice", None)
