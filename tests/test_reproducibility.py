"""Reproducibility (issue 6): the same seed gives the same samples, bit for bit on the CPU, for every
solver and dtype; and with one generator per sample, a sample of a stochastic solver does not depend
on the batch it is drawn in."""
from __future__ import annotations

import math

import pytest
import torch

import scoresde as sd
from scoresde.solvers.base import GaussianNoise
from scoresde.solvers.reverse_sde import _BrownianSteps
from test_solvers import NOISY_OPTIONS, SOLVER_NAMES, quick_kwargs, small_mixture

DTYPES = [torch.float32, torch.float64]
# Every solver that steps each sample on its own. dopri5 and rk45 are excluded: torchdiffeq and scipy
# control one step size for the whole batch; they are deterministic, so a seed still repeats them.
PER_SAMPLE = [n for n in SOLVER_NAMES if not sd.SOLVERS[n].adaptive or sd.SOLVERS[n].stochastic]
# The torchsde bridge's Levy-area method and pc with another predictor take other paths through the code.
EXTRA_CASES = [pytest.param("torchsde", {"method": "srk"}, id="torchsde-srk"),
               pytest.param("pc", {"predictor": "ancestral", "n_corrector": 2}, id="pc-ancestral")]


def options(solver, extra=None):
    return {**quick_kwargs(solver), **NOISY_OPTIONS.get(solver, {}), **(extra or {})}


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def draw(solver, n, generator, dtype, extra=None):
    sde = sd.VPSDE.linear()
    return sd.sample(small_mixture(sde), sde, shape=(n, 2), solver=solver, dtype=dtype, generator=generator,
                     **options(solver, extra))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("solver,extra", [pytest.param(n, None, id=n) for n in SOLVER_NAMES] + EXTRA_CASES)
def test_same_seed_same_samples(solver, extra, dtype):
    a = draw(solver, 6, torch.Generator().manual_seed(3), dtype, extra)
    b = draw(solver, 6, torch.Generator().manual_seed(3), dtype, extra)
    assert a.dtype == dtype and torch.equal(a, b)
    c = draw(solver, 6, torch.Generator().manual_seed(4), dtype, extra)
    assert ((a - c).abs().amax(1) > 0).all()  # another seed: every sample differs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("solver,extra", [pytest.param(n, None, id=n) for n in PER_SAMPLE] + EXTRA_CASES)
def test_a_sample_does_not_depend_on_its_batch(solver, extra, dtype):
    """One generator per sample: a batch of 6 is, bit for bit, its first 2 samples drawn alone and its
    last 4 drawn alone (an uneven split, so that no batch size is special)."""
    whole = draw(solver, 6, generators(range(6)), dtype, extra)
    parts = [draw(solver, 2, generators(range(2)), dtype, extra), draw(solver, 4, generators(range(2, 6)), dtype, extra)]
    assert torch.equal(torch.cat(parts), whole)
    assert len(whole.unique(dim=0)) == 6  # and the samples are not all one


def test_pc_batch_rule_couples_the_batch():
    """step_size="batch" (score_sde's batch-mean norms) is the documented exception: its samples do
    depend on the batch, so the default rule above is what makes pc batch-independent."""
    whole = draw("pc", 6, generators(range(6)), torch.float64, {"step_size": "batch"})
    parts = [draw("pc", 2, generators(range(2)), torch.float64, {"step_size": "batch"}),
             draw("pc", 4, generators(range(2, 6)), torch.float64, {"step_size": "batch"})]
    assert not torch.equal(torch.cat(parts), whole)


# ---- the torchsde bridge's Brownian motion ---------------------------------------------------------------
def test_bridge_brownian_steps_have_the_brownian_law():
    """Each step's increment W ~ N(0, h) and U = h (W/2 + H) with H ~ N(0, h/12) independent of W, as
    torchsde's BrownianInterval defines them: E W^2 = h, E W U = h^2 / 2, E U^2 = h^3 / 3. Each sample
    moment of n draws is within 5 standard errors (sqrt(Var(product) / n), from the Gaussian moments)."""
    n, h = 200_000, 0.3
    like = torch.empty(n, 1, dtype=torch.float64)
    bm = _BrownianSteps(GaussianNoise(torch.Generator().manual_seed(0)), like, 0.0)
    bm(0.0, 0.1)  # a first step, so that the one checked starts where it ended
    W, U = (v[:, 0] for v in bm(0.1, 0.1 + h, return_U=True))
    var_u = h**3 / 3
    for got, want, var_of_product in [((W * W).mean(), h, 2 * h * h),
                                      ((W * U).mean(), h * h / 2, h * var_u + (h * h / 2) ** 2),
                                      ((U * U).mean(), var_u, 2 * var_u**2)]:
        assert abs(got.item() - want) < 5 * math.sqrt(var_of_product / n), (got.item(), want)


def test_bridge_brownian_steps_refuse_anything_but_the_next_step():
    """The draws are not stored, so a revisited, skipped or backward interval would be answered with
    unrelated noise: it is refused instead."""
    bm = _BrownianSteps(GaussianNoise(torch.Generator().manual_seed(0)), torch.empty(3, 2), 0.0)
    assert bm(0.0, 0.5).shape == (3, 2)
    for ta, tb in [(0.0, 0.5), (0.6, 0.7), (0.5, 0.5), (0.5, 0.4)]:
        with pytest.raises(RuntimeError, match="step by step"):
            bm(ta, tb)
    assert bm(0.5, 0.75).shape == (3, 2)  # the next step is still answered
