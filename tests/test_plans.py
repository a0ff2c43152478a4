"""Plans: samples differentiable with respect to the grid, NFE counted from the plan for every
option, plans built without gradients cost host floats only, and pc's predictors told apart by
the structure of their plans."""
from __future__ import annotations

import pytest
import torch

import scoresde as sd
from scoresde.solvers.base import ModelRun
from scoresde.solvers.pc import _one_step
from scoresde.solvers.plan import Planner

F64 = torch.float64
GRAD_SOLVERS = [("ddim", {}), ("ddim", {"eta": 0.7}), ("euler", {}), ("heun", {}), ("rk4", {}),
                ("dpm_solver_2", {}), ("dpm_solver_3", {}), ("dpm_solver_pp_2m", {}), ("dpm_solver_pp_3m", {}),
                ("dpm_solver_pp_2m_sde", {}), ("unipc", {"order": 3}), ("unipc", {"variant": "bh1"}),
                ("edm", {"s_churn": 5.0}), ("ancestral", {}), ("euler_maruyama", {}),
                ("pc", {"predictor": "heun", "n_corrector": 1}), ("pc", {"step_size": "batch"})]


def _mixture(sde):
    return sd.GaussianMixture(sde, [1.0, 2.0], [[0.8, 0.1], [-0.5, -0.6]], [0.2, 0.3])


@pytest.mark.parametrize("solver,options", GRAD_SOLVERS, ids=[f"{s}-{o}" for s, o in GRAD_SOLVERS])
def test_gradient_with_respect_to_the_grid_matches_finite_differences(solver, options):
    """d(sum w * sample)/d(times) by autograd through the plan's coefficients and the model's time input,
    against central differences of the same seeded run (float64; every time of the grid, t_end and
    the final denoising step included). A plan whose coefficients were host floats would give no
    gradient; a wrong derivative of one coefficient would miss by far more than the tolerance."""
    sde = sd.VPSDE.linear()
    model = _mixture(sde)
    base = sd.GRIDS["log_snr"](sde, 6, sde.T, 0.02)
    weights = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def loss(times, grad):
        x = sd.sample(model, sde, shape=(8, 2), dtype=F64, solver=solver, grid=times, grad=grad,
                      generator=torch.Generator().manual_seed(0), **options)
        return (x * weights).sum()

    times = base.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(times, True), times)
    step = 1e-6
    finite = torch.zeros_like(base)
    for k in range(1, len(base)):  # t_start = T stays where sampling starts
        up, down = base.clone(), base.clone()
        up[k] += step
        down[k] -= step
        finite[k] = (loss(up, False) - loss(down, False)) / (2 * step)
    assert grad[1:].abs().max() > 1e-3  # the grid matters ...
    torch.testing.assert_close(grad[1:], finite[1:], rtol=1e-5, atol=1e-6)  # ... and autograd says how much


def test_without_grad_a_plan_holds_host_floats_and_with_grad_tensors():
    """Plans cost what loops cost when nothing asks for gradients: every coefficient is a float."""
    sde = sd.VPSDE.linear()
    times = sd.GRIDS["log_snr"](sde, 4, sde.T, 1e-3)

    def coefficients(planner):
        sd.SOLVERS["unipc"].fn(planner, order=3, variant="bh2", lower_order_final=True, corrector=True)
        steps = planner.finish().steps
        return [c for s in steps for combo in [st.at for st in s.stages] + [s.update]
                for c in (combo.x, *(w for _, w in combo.terms))]

    assert all(type(c) is float for c in coefficients(Planner(sde, times, torch.zeros(1, 2))))
    with torch.enable_grad():
        found = coefficients(Planner(sde, times.clone().requires_grad_(), torch.zeros(1, 2)))
    assert all(isinstance(c, torch.Tensor) and c.requires_grad for c in found if not isinstance(c, float))
    assert any(isinstance(c, torch.Tensor) for c in found)


PC_CASES = [(p, n) for p in ("euler_maruyama", "ancestral", "ddim", "euler", "heun", "rk4", "edm", "dpm_solver_2",
                             "dpm_solver_3") for n in (0, 2)]
TORCHSDE_METHODS = ("euler", "milstein", "srk", "midpoint", "heun")


def _progress_totals(monkeypatch) -> list:
    totals = []
    original = ModelRun.__init__

    def recording(self, denoiser, sde, *, progress=False, total=None):
        totals.append(total)
        original(self, denoiser, sde, progress=progress, total=total)

    monkeypatch.setattr(ModelRun, "__init__", recording)
    return totals


@pytest.mark.parametrize("predictor,n_corrector", PC_CASES)
def test_pc_nfe_is_exact_for_every_predictor(monkeypatch, predictor, n_corrector):
    """The default step count, the progress bar's total and SampleInfo.nfe agree with the calls the
    model sees: about 50 model calls for every predictor (76 with the old fixed count for heun)."""
    totals = _progress_totals(monkeypatch)
    sde = sd.VPSDE.linear()
    calls = []
    model = _mixture(sde)
    _, info = sd.sample(lambda x, t: calls.append(1) or model(x, t), sde, shape=(4, 2), solver="pc",
                        predictor=predictor, n_corrector=n_corrector, return_info=True,
                        generator=torch.Generator().manual_seed(0))
    per_step = sd.SOLVERS[predictor].nfe_per_step + n_corrector
    assert info.nfe == len(calls) == totals[-1] == info.steps * per_step + 1
    assert 50 - per_step < info.nfe <= 51


@pytest.mark.parametrize("method", TORCHSDE_METHODS)
def test_torchsde_nfe_is_exact_for_every_method(monkeypatch, method):
    totals = _progress_totals(monkeypatch)
    sde = sd.VPSDE.linear()
    calls = []
    model = _mixture(sde)
    for steps in (1, 4):
        _, info = sd.sample(lambda x, t: calls.append(1) or model(x, t), sde, shape=(4, 2), solver="torchsde",
                            method=method, steps=steps, return_info=True, generator=torch.Generator().manual_seed(0))
        assert info.nfe == totals[-1] == sd.SOLVERS["torchsde"].calls(steps, {"method": method}) + 1
    _, info = sd.sample(model, sde, shape=(4, 2), solver="torchsde", method=method, return_info=True,
                        generator=torch.Generator().manual_seed(0))
    assert info.nfe == totals[-1] and info.nfe <= 51  # the default steps: about 50 model calls


def test_one_step_plans_are_told_from_multistep_ones_by_their_structure():
    one_step = {n for n in sd.SOLVERS if sd.SOLVERS[n].plans and n != "pc"
                and _one_step(sd.SOLVERS[n].probe(3, {}).plan.steps)}
    assert one_step == {"ancestral", "ddim", "dpm_solver_2", "dpm_solver_3", "edm", "euler", "euler_maruyama",
                        "heun", "rk4"}


def test_edm_churn_acts_under_pc():
    """pc builds its predictor's plan on the whole grid, so EDM's churn (gamma = s_churn/steps) acts;
    on two-point sub-grids it never could (the first step of a grid does not churn)."""
    sde = sd.VPSDE.linear()
    kw = dict(shape=(16, 2), dtype=F64, steps=9, grid="log_snr", solver="pc", predictor="edm", n_corrector=0)
    plain = sd.sample(_mixture(sde), sde, generator=torch.Generator().manual_seed(3), **kw)
    churned = sd.sample(_mixture(sde), sde, generator=torch.Generator().manual_seed(3),
                        predictor_options={"s_churn": 20.0}, **kw)
    alone = sd.sample(_mixture(sde), sde, shape=(16, 2), dtype=F64, steps=9, grid="log_snr", solver="edm",
                      s_churn=20.0, generator=torch.Generator().manual_seed(3))
    assert (plain - churned).abs().max() > 1e-2
    assert torch.equal(churned, alone)


@pytest.mark.slow
def test_compiled_sampling_equals_eager():
    """sample(..., compile=True) runs the same plan under torch.compile (inductor on the CPU): equal to
    eager to float64 round-off, with the same model calls, noise and final denoising step; a second run
    with the same plan reuses the compiled loop. One plan with stages, noise draws, a corrector and the
    final x0 step covers the executor (each compile takes tens of seconds on two cores)."""
    sde = sd.VPSDE.linear()
    kw = dict(shape=(16, 2), dtype=F64, steps=3, solver="pc", predictor="edm", n_corrector=1,
              predictor_options={"s_churn": 5.0}, return_info=True)
    eager, info = sd.sample(_mixture(sde), sde, generator=torch.Generator().manual_seed(4), **kw)
    compiled, compiled_info = sd.sample(_mixture(sde), sde, generator=torch.Generator().manual_seed(4), compile=True,
                                        **kw)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
    assert compiled_info.nfe == info.nfe == 3 * 3 + 1
    again = sd.sample(_mixture(sde), sde, generator=torch.Generator().manual_seed(5), compile=True, **kw)[0]
    assert (again - compiled).abs().max() > 1e-3  # other noise, same compiled loop


def test_compile_is_refused_where_it_cannot_apply():
    sde = sd.VPSDE.linear()
    with pytest.raises(ValueError, match="compile=True: solver 'dopri5'"):
        sd.sample(_mixture(sde), sde, shape=(2, 2), solver="dopri5", compile=True)
    with pytest.raises(ValueError, match="callback: compile=True"):
        sd.sample(_mixture(sde), sde, shape=(2, 2), solver="ddim", compile=True, callback=lambda i, t, x: None)
    with pytest.raises(TypeError, match="compile='yes'"):
        sd.sample(_mixture(sde), sde, shape=(2, 2), solver="ddim", compile="yes")
