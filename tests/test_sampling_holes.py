"""Holes in `sample` found by trying the library as a careless and as a hostile user would (issue 10,
items 5-9): NaN in x_T, schedules and end times no solver can resolve, inputs that escaped as raw
torch/IndexError/AssertionError failures, a Brownian noise source whose seed was ignored, and sampling
that recorded autograd graphs by default. Each test fails on the code before the fix."""
from __future__ import annotations

import pytest
import torch

import scoresde as sd
from scoresde.train.config import TrainConfig

F64 = torch.float64
SDE = sd.VPSDE.linear()
MIXTURE = sd.GaussianMixture.ring2d(SDE)
ALL = sorted(sd.SOLVERS)
STOCHASTIC = sorted(name for name, spec in sd.SOLVERS.items() if spec.stochastic)


class CountingModel:
    """eps = 0, counting calls: a refusal at the door must come before the first one."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return torch.zeros_like(x)


def _steps(name):
    return None if sd.SOLVERS[name].adaptive else 4


# ---- item 5: NaN or inf in x_T ------------------------------------------------------------------
@pytest.mark.parametrize("solver,bad", [("heun", float("nan")), ("dopri5", float("inf")), ("pc", float("inf"))])
def test_a_nan_or_inf_in_x_T_is_refused_naming_the_sample(solver, bad):
    """One door check (`_check_x_T`) serves every solver: a plan, an adaptive solver, pc."""
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    x_T[3, 1] = bad
    model = CountingModel()
    with pytest.raises(ValueError, match=r"x_T: sample 3 \(of 5\) holds NaN or inf"):
        sd.sample(model, SDE, x_T=x_T, solver=solver, steps=_steps(solver))
    assert model.calls == 0


# ---- item 6: schedules and end times that no solver can use -------------------------------------
def test_a_one_step_chain_names_the_default_t_end_it_cannot_use():
    sde = sd.VPSDE.from_betas([0.02])
    with pytest.raises(ValueError, match=r"sde=.*t_end defaults to the chain's first step 1/N = 1.0, which is T"):
        sd.sample(CountingModel(), sde, shape=(3, 2), solver="ddim", steps=4)
    # An explicit t_end inside the one step is a run the chain can make.
    x = sd.sample(CountingModel(), sde, shape=(3, 2), solver="ddim", steps=4, t_end=0.5)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("solver", ["ddim", "heun", "dopri5", "ancestral", "unipc"])
def test_a_chain_whose_alpha_underflows_is_refused_at_the_door(solver):
    sde = sd.VPSDE.from_betas([0.5] * 3000)  # alpha_bar_N = 2^-3000: alpha underflows float64
    model = CountingModel()
    with pytest.raises(ValueError, match=r"^sde: at t=1 .*alpha underflows"):
        sd.sample(model, sde, shape=(3, 2), solver=solver, steps=_steps(solver), dtype=F64)
    assert model.calls == 0


def test_times_the_schedule_maps_to_one_log_snr_are_refused():
    sde = sd.VPSDE.from_betas([0.9999999, 1e-20])  # 1 - 1e-20 == 1: the second step changes nothing
    with pytest.raises(ValueError, match=r"t=1 and t=0.5 have the same half log-SNR"):
        sd.sample(CountingModel(), sde, shape=(3, 2), solver="dopri5")


@pytest.mark.parametrize("t_end, dtype", [(5e-324, F64), (1e-300, torch.float32), (1e-12, torch.float16)])
def test_a_t_end_beneath_what_the_dtype_resolves_is_refused(t_end, dtype):
    model = CountingModel()
    with pytest.raises(ValueError, match=r"^t_end: at t=.* beyond what torch\.float\d+ samples resolve.*raise t_end"):
        sd.sample(model, SDE, shape=(3, 2), solver="edm", steps=3, t_end=t_end, dtype=dtype)
    assert model.calls == 0


@pytest.mark.parametrize("t_end, dtype", [(1e-300, F64), (1e-30, torch.float32)])
def test_tiny_t_end_the_dtype_resolves_still_samples(t_end, dtype):
    """The limit is the dtype's, not a blanket one: these ends worked before and still do."""
    for solver in ("edm", "ddim", "dpm_solver_pp_2m", "adaptive_sde"):
        x = sd.sample(MIXTURE, SDE, shape=(8, 2), solver=solver, steps=_steps(solver), t_end=t_end, dtype=dtype,
                      generator=torch.Generator().manual_seed(0))
        assert x.dtype == dtype and torch.isfinite(x).all(), solver


# ---- item 7: inputs that escaped as other exceptions ----------------------------------------------
def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match=r"x_T: an empty tensor of shape \(0, 2\)"):
        sd.sample(MIXTURE, SDE, x_T=torch.zeros(0, 2), solver="torchsde", steps=4)


@pytest.mark.parametrize("solver", ["adaptive_sde", "euler"])
def test_samples_without_a_dimension_after_the_batch_are_refused(solver):
    with pytest.raises(TypeError, match=r"x_T: expected a floating tensor of shape \(batch, \.\.\.\)"):
        sd.sample(CountingModel(), SDE, x_T=torch.randn(5), solver=solver, steps=_steps(solver))
    with pytest.raises(ValueError, match=r"shape=\(5,\): .*use \(batch, 1\)"):
        sd.sample(CountingModel(), SDE, shape=(5,), solver=solver, steps=_steps(solver))


def test_dopri5_in_float16_is_refused_naming_the_dtype():
    with pytest.raises(ValueError, match=r"dtype=torch.float16: solver 'dopri5'"):
        sd.sample(MIXTURE, SDE, shape=(3, 2), solver="dopri5", dtype=torch.float16)


def test_a_plan_too_large_for_memory_is_refused_before_any_allocation():
    model = CountingModel()
    with pytest.raises(ValueError, match=r"steps=10000000: 10000000 steps, more than the 100000 a run may take"):
        sd.sample(model, SDE, shape=(2, 2), solver="heun", steps=10**7)
    with pytest.raises(ValueError, match=r"grid: 200000 steps, more than the 100000"):
        sd.sample(model, SDE, shape=(2, 2), solver="euler", grid=torch.linspace(1.0, 1e-3, 200_001, dtype=F64))
    assert model.calls == 0
    with pytest.raises(ValueError, match=r"sample_steps=10000000: expected an int in \[1, 100000\]"):
        TrainConfig(sample_steps=10**7).validate()


# ---- item 8: a Brownian noise source is the whole randomness --------------------------------------
def _brownian(seed, **kwargs):
    return sd.BrownianNoise((6, 2), SDE.T, 1e-3, seed=seed, dtype=F64, **kwargs)


@pytest.mark.parametrize("solver", [name for name in STOCHASTIC if name != "pc"] + ["heun"])
def test_the_same_brownian_noise_seed_gives_the_same_samples(solver):
    """x_T comes from the seed too (it came from torch's global generator), for every solver (pc's
    Langevin corrector refuses a Brownian path: its draws must be independent of it)."""
    options = {"method": "srk"} if solver == "torchsde" else {}
    runs = [sd.sample(MIXTURE, SDE, shape=(6, 2), solver=solver, steps=_steps(solver), dtype=F64,
                      noise=_brownian(seed, levy_area=solver == "torchsde"), **options) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_torchsde_follows_the_brownian_path():
    """torchsde's Euler on a path equals euler_maruyama's on it (uniform grid, same steps) up to the
    bridge's rounding of times; with the path ignored they differ by the noise itself (order 1)."""
    x_T = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(x_T=x_T, steps=40, grid="uniform", final_denoise=False)
    bridge = sd.sample(MIXTURE, SDE, solver="torchsde", noise=_brownian(3), **kwargs)
    ours = sd.sample(MIXTURE, SDE, solver="euler_maruyama", noise=_brownian(3), **kwargs)
    assert (bridge - ours).abs().max() < 1e-6
    assert (sd.sample(MIXTURE, SDE, solver="torchsde", noise=_brownian(4), **kwargs) - ours).abs().max() > 1e-2


def test_a_brownian_path_that_does_not_fit_the_run_is_refused():
    with pytest.raises(ValueError, match=r"noise: a BrownianNoise of shape \(6, 2\) for samples of shape \(4, 2\)"):
        sd.sample(MIXTURE, SDE, shape=(4, 2), solver="euler_maruyama", steps=3, noise=_brownian(0))
    with pytest.raises(ValueError, match=r"noise: the BrownianNoise path covers t in \[0.001, 1\]"):
        sd.sample(MIXTURE, SDE, shape=(6, 2), solver="euler_maruyama", steps=3, t_end=1e-4, noise=_brownian(0))
    with pytest.raises(ValueError, match=r"method='srk' needs the path's space-time Levy area"):
        sd.sample(MIXTURE, SDE, shape=(6, 2), solver="torchsde", steps=3, method="srk", noise=_brownian(0))


# ---- item 9: no autograd unless asked for ----------------------------------------------------------
class Net(torch.nn.Module):
    """A network with parameters, recording whether autograd was on when it was called."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))
        self.grad_on = []

    def forward(self, x, t):
        self.grad_on.append(torch.is_grad_enabled())
        return self.scale * x


@pytest.mark.parametrize("solver", ["heun", "rk45", "dopri5", "ancestral"])
def test_sampling_runs_without_autograd_by_default(solver):
    net = Net()
    x = sd.sample(net, SDE, shape=(4, 2), solver=solver, steps=_steps(solver))
    assert not x.requires_grad and net.grad_on and not any(net.grad_on)


def test_grad_true_lets_gradients_reach_the_parameters_and_x_T():
    net = Net()
    x_T = torch.randn(4, 2, requires_grad=True)
    x = sd.sample(net, SDE, x_T=x_T, solver="heun", steps=3, grad=True)
    x.square().sum().backward()
    assert all(net.grad_on) and net.scale.grad is not None and net.scale.grad != 0
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0


def test_grad_true_with_the_numpy_solver_is_refused_and_grad_must_be_a_flag():
    with pytest.raises(ValueError, match=r"grad=True: solver 'rk45' integrates in numpy"):
        sd.sample(Net(), SDE, shape=(4, 2), solver="rk45", grad=True)
    with pytest.raises(TypeError, match=r"grad='yes': expected True or False"):
        sd.sample(Net(), SDE, shape=(4, 2), steps=2, grad="yes")


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_a_conversion_through_x0_where_alpha_is_zero_is_refused(kind):
    """Found by the slow fuzz run: t = 1e8 on a chain has alpha = 0, and x0 = (x - sigma eps)/alpha was inf."""
    chain = sd.VPSDE.from_betas(SDE.discretize(1000))
    denoiser = sd.Denoiser(lambda x, t: 0.5 * x, chain)
    with pytest.raises(ValueError, match=r"t=100000000: alpha\(t\) = 0 .*expected a t where alpha > 0"):
        getattr(denoiser, kind)(torch.randn(3, 2), 10**8)
    assert torch.isfinite(getattr(denoiser, kind)(torch.randn(3, 2), 1.0)).all()
