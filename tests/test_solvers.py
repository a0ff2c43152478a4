"""Every registered solver against exact ground truth: Ho et al.'s Algorithm 2 transcribed
literally, sharp Gaussian mixtures with exact scores, and the shared contract (reproducibility,
NFE accounting, callbacks, dtypes, shapes, time conventions)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import scoresde as sd

F64 = torch.float64
SOLVER_NAMES = sorted(sd.SOLVERS)
FIXED = [n for n in SOLVER_NAMES if not sd.SOLVERS[n].adaptive]
ADAPTIVE = [n for n in SOLVER_NAMES if sd.SOLVERS[n].adaptive]
STOCHASTIC = [n for n in SOLVER_NAMES if sd.SOLVERS[n].stochastic]
# Options that make a stochastic solver actually draw noise (DDIM defaults to eta = 0).
NOISY_OPTIONS = {"ddim": {"eta": 1.0}, "edm": {"s_churn": 10.0}}

# The torchsde bridge steps on its own: it reports one callback at the end and takes uniform grids only.
BRIDGE = "torchsde"




class Counting:
    """A plain eps model that counts its calls and records the times it is called at."""

    def __init__(self, model):
        self.model, self.calls, self.times = model, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.times.append(t.detach().to("cpu", F64).clone())
        return self.model(x, t)


def quick_kwargs(name, steps=6):
    return {} if sd.SOLVERS[name].adaptive else {"steps": steps}


# ---- Ho et al. (2020), Algorithm 2, transcribed ------------------------------------------------------
def ho_algorithm_2(eps_net, betas, shape, generator, sigma2="posterior"):
    """DDPM sampling (Ho et al. 2020, Algorithm 2), with the 1-based step t and eps_net taking
    the 0-based index t - 1; sigma_t^2 is beta~_t ("posterior") or beta_t ("beta")."""
    betas = torch.as_tensor(betas, dtype=F64)
    alphas = 1.0 - betas
    alpha_bars = torch.cumprod(alphas, 0)
    x = torch.randn(shape, generator=generator, dtype=F64)  # x_T ~ N(0, I)
    for t in range(len(betas), 0, -1):
        z = torch.randn(shape, generator=generator, dtype=F64) if t > 1 else torch.zeros(shape, dtype=F64)
        alpha_t, alpha_bar_t, beta_t = alphas[t - 1], alpha_bars[t - 1], betas[t - 1]
        alpha_bar_prev = alpha_bars[t - 2] if t > 1 else torch.tensor(1.0, dtype=F64)
        var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t if sigma2 == "posterior" else beta_t
        eps = eps_net(x, torch.full((shape[0],), float(t - 1), dtype=F64))
        x = (x - (1 - alpha_t) / torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_t) + torch.sqrt(var) * z
    return x


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("betas", [np.linspace(1e-4, 0.02, 50), np.linspace(0.1 / 50, 20.0 / 50, 50)],
                         ids=["ho-linspace", "song-linear-N50"])
def test_ancestral_on_the_chain_is_ho_algorithm_2(betas, variance):
    N = len(betas)
    sde = sd.VPSDE.from_betas(betas)
    mix = sd.GaussianMixture(sde, [1.0, 3.0], [[0.6, -0.2], [-0.7, 0.5]], [0.15, 0.3])
    seen = []

    def eps_net(x, index):  # a network trained on 0-based DDPM indices
        seen.append(index.clone())
        return mix(x, (index.to(F64) + 1) / N)

    shape = (8, 2)
    ref = ho_algorithm_2(eps_net, betas, shape, torch.Generator().manual_seed(0), variance)
    seen.clear()
    model = sd.Denoiser(eps_net, sde, time_input="index")
    grid = torch.arange(N, 0, -1, dtype=F64) / N  # t = n/N, n = N..1
    x, info = sd.sample(model, sde, shape=shape, dtype=F64, solver="ancestral", variance=variance, grid=grid,
                        final_denoise=True, generator=torch.Generator().manual_seed(0), return_info=True)
    assert info.nfe == N  # N-1 ancestral steps and the final x0_hat at t = 1/N: Ho's N network calls
    torch.testing.assert_close(torch.stack(seen)[:, 0], torch.arange(N - 1, -1, -1, dtype=F64),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


def test_ancestral_variances_differ_on_the_chain():
    """The two DDPM variances are distinguishable, so the equivalences above are not vacuous."""
    betas = np.linspace(1e-4, 0.02, 50)
    sde = sd.VPSDE.from_betas(betas)
    mix = sd.GaussianMixture(sde, [1.0], [[0.3, 0.3]], 0.5)
    grid = torch.arange(50, 0, -1, dtype=F64) / 50
    kw = dict(shape=(8, 2), dtype=F64, solver="ancestral", grid=grid)
    a = sd.sample(mix, sde, variance="posterior", generator=torch.Generator().manual_seed(0), **kw)
    b = sd.sample(mix, sde, variance="beta", generator=torch.Generator().manual_seed(0), **kw)
    assert (a - b).abs().max() > 1e-3


# ---- distribution checks against exact sharp mixtures ------------------------------------------------
def expected_std_ratio(sde, std, t_end):
    """Within-mode std of x0_hat = E[x0 | x_t_end] over the true std, for a component of std c
    (modes far apart): x0_hat - mu = (x - alpha mu) alpha c^2 / v, v = alpha^2 c^2 + sigma^2,
    so std(x0_hat) = c^2 / sqrt(c^2 + (sigma/alpha)^2) and the ratio is c / sqrt(c^2 + s^2)."""
    t = torch.tensor(t_end, dtype=F64)
    s = (sde.sigma(t) / sde.alpha(t)).item()
    return std / math.sqrt(std**2 + s**2)


def mixture_failures(mix, x, expected_ratio, *, z_max=4.5, stray_max=0.005, ratio_z=5.0):
    """Ways in which samples x disagree with the mixture; empty when they agree.

    - weights: each mode's fraction within z_max binomial standard errors sqrt(w(1-w)/n)
      (6 modes x ~10 solvers at 4.5 SE: a false alarm has probability ~1e-4);
    - stray: the fraction outside every mode's 1-1e-4 chi-square ball; exact samples put ~1e-4
      there (fewer after the final denoising shrink), so 0.5% is > 10 expected counts away;
    - spread: with x - mu ~ N(0, r^2 c^2 I_d), the per-mode mean of |x - mu|^2 / (d c^2) estimates
      r^2 with relative SE sqrt(2/(d n)), so r has SE r / sqrt(2 d n); the pooled ratio and each
      mode's must lie within ratio_z SE of the exact expectation.
    """
    rep = mix.mode_report(x)
    n, d = x.shape[0], mix.dim
    fails = []
    w = mix.weights
    z = (rep["weights"] - w).abs() / torch.sqrt(w * (1 - w) / n)
    if z.max() > z_max:
        fails.append(f"mode weights {rep['weights'].tolist()} vs {w.tolist()} (max |z| {z.max():.1f})")
    if rep["stray"] > stray_max:
        fails.append(f"stray mass {rep['stray']:.4f} > {stray_max}")
    counts = rep["weights"] * n
    ratios = rep["std_ratio"]
    if counts.sum() < 2:
        return fails + ["no samples near any mode"]
    pooled = math.sqrt((counts * ratios.nan_to_num() ** 2).sum().item() / counts.sum().item())
    se = expected_ratio / math.sqrt(2 * d * counts.sum().item())
    if abs(pooled - expected_ratio) > ratio_z * se:
        fails.append(f"pooled std ratio {pooled:.4f} vs exact {expected_ratio:.4f} (+-{ratio_z * se:.4f})")
    for k, (r, c) in enumerate(zip(ratios.tolist(), counts.tolist())):
        if c < 2 or abs(r - expected_ratio) > ratio_z * expected_ratio / math.sqrt(2 * d * c):
            fails.append(f"mode {k}: std ratio {r:.4f} from {c:.0f} samples vs exact {expected_ratio:.4f}")
    return fails


def distribution_steps(name):
    """Steps for the distribution checks: ~500 model calls, where the first-order solvers' own bias
    in the within-mode spread (about -2% for ancestral, +1.5% for Euler-Maruyama at 200 steps on
    these sharp modes, shrinking like 1/steps) stays within about 2 standard errors. torchsde
    always steps uniformly in t, which is much coarser near the data: it gets 1000 steps."""
    spec = sd.SOLVERS[name]
    if spec.adaptive:
        return {}
    if name == "torchsde":
        return {"steps": 1000}
    return {"steps": max(1, 500 // spec.nfe_per_step)}


RING_SAMPLES = 3000


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_every_solver_samples_the_sharp_ring(solver):
    """Six modes of std 0.04 (2% of the data range) with weights 1..6, exact eps, default grids
    and tolerances. The checks catch a wrong coefficient (measured when writing this test, with
    the step counts below): eps scaled by 1.1 moves the pooled spread ratio 8 (torchsde) to 26
    (ODE solvers) standard errors below the exact 0.967, eps scaled by 0.9 moves it 12 to 72 SE
    above and leaves ~10% stray mass with the ODE solvers; correct models stay within 2.1 SE.
    A sign flip leaves no sample near any mode. test_the_mixture_check_catches_a_wrong_model
    keeps a cheap subset of these as tests."""
    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    x = sd.sample(ring, sde, shape=(RING_SAMPLES, 2), solver=solver, generator=torch.Generator().manual_seed(0),
                  **distribution_steps(solver))
    expected = expected_std_ratio(sde, 0.04, sde.t_min)
    assert mixture_failures(ring, x, expected) == []


def test_every_solver_samples_the_ring_without_final_denoise():
    """final_denoise=False returns x at t_end ~ sum_k w_k N(alpha mu_k, (alpha^2 c^2 + sigma^2) I):
    measured from mu_k, the ratio is sqrt(c^2 alpha^2 + sigma^2 + (1-alpha)^2 |mu|^2/d) / c."""
    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    t = torch.tensor(sde.t_min, dtype=F64)
    a, s = sde.alpha(t).item(), sde.sigma(t).item()
    expected = math.sqrt(a * a * 0.04**2 + s * s + (1 - a) ** 2 / 2) / 0.04
    for solver in ("heun", "ancestral", "dopri5"):
        x = sd.sample(ring, sde, shape=(RING_SAMPLES, 2), solver=solver, final_denoise=False,
                      generator=torch.Generator().manual_seed(1), **distribution_steps(solver))
        assert mixture_failures(ring, x, expected) == [], solver


@pytest.mark.parametrize("scale,solver", [(1.1, "euler"), (0.9, "euler"), (-1.0, "euler"), (1.1, "ancestral")])
def test_the_mixture_check_catches_a_wrong_model(scale, solver):
    """The distribution check is not vacuous: a 10% error in eps, or its sign, fails it."""
    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    x = sd.sample(lambda x, t: scale * ring(x, t), sde, shape=(RING_SAMPLES, 2), solver=solver,
                  generator=torch.Generator().manual_seed(0), **distribution_steps(solver))
    assert mixture_failures(ring, x, expected_std_ratio(sde, 0.04, sde.t_min)) != []


def sharp_mixture_16d(sde):
    """Four modes of std 0.04 in 16 dimensions, unit distance from the origin, weights 1..4."""
    means = torch.zeros(4, 16, dtype=F64)
    for k in range(4):
        means[k, 4 * k:4 * k + 4] = 0.5
    return sd.GaussianMixture(sde, [1.0, 2.0, 3.0, 4.0], means, 0.04)


@pytest.mark.parametrize("solver", ["heun", "dopri5", "ancestral", "euler_maruyama"])
def test_sharp_mixture_in_16_dimensions(solver):
    sde = sd.VPSDE.linear()
    mix = sharp_mixture_16d(sde)
    x = sd.sample(mix, sde, shape=(1000, 16), solver=solver, generator=torch.Generator().manual_seed(0),
                  **distribution_steps(solver))
    assert mixture_failures(mix, x, expected_std_ratio(sde, 0.04, sde.t_min)) == []


@pytest.mark.parametrize("solver", ["heun", "ancestral"])
def test_sharp_ring_on_the_cosine_and_discrete_schedules(solver):
    for sde in (sd.VPSDE.cosine(), sd.VPSDE.from_betas(sd.VPSDE.linear().discretize(1000))):
        ring = sd.GaussianMixture.ring2d(sde)
        x = sd.sample(ring, sde, shape=(RING_SAMPLES, 2), solver=solver, generator=torch.Generator().manual_seed(2),
                      **distribution_steps(solver))
        assert mixture_failures(ring, x, expected_std_ratio(sde, 0.04, sde.t_min)) == [], sde


# ---- reproducibility --------------------------------------------------------------------------------------
def small_mixture(sde):
    return sd.GaussianMixture(sde, [1.0, 2.0], [[0.8, 0.1], [-0.5, -0.6]], [0.2, 0.3])


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_only_stochastic_solvers_use_the_generator_after_x_T(solver):
    """From the same x_T, another seed changes a stochastic solver's samples and nothing else's."""
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    opts = {**quick_kwargs(solver), **NOISY_OPTIONS.get(solver, {})}
    a = sd.sample(mix, sde, x_T=x_T, solver=solver, generator=torch.Generator().manual_seed(1), **opts)
    b = sd.sample(mix, sde, x_T=x_T, solver=solver, generator=torch.Generator().manual_seed(2), **opts)
    if sd.SOLVERS[solver].stochastic:
        assert (a - b).abs().min() > 0  # every sample got its own noise
    else:
        assert torch.equal(a, b)


def test_ddim_eta0_ignores_the_generator():
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    a = sd.sample(mix, sde, x_T=x_T, solver="ddim", steps=6, generator=torch.Generator().manual_seed(1))
    b = sd.sample(mix, sde, x_T=x_T, solver="ddim", steps=6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


# ---- NFE accounting ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("final_denoise", [True, False])
@pytest.mark.parametrize("solver", FIXED)
def test_fixed_step_nfe(solver, final_denoise):
    sde = sd.VPSDE.linear()
    model = Counting(small_mixture(sde))
    steps = 7
    _, info = sd.sample(model, sde, shape=(4, 2), solver=solver, steps=steps, final_denoise=final_denoise,
                        generator=torch.Generator().manual_seed(0), return_info=True)
    assert info.nfe == model.calls
    assert info.nfe == steps * sd.SOLVERS[solver].nfe_per_step + final_denoise
    assert info.steps == steps and info.solver == solver and len(info.times) == steps + 1


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_reported_nfe_is_the_number_of_model_calls(solver):
    sde = sd.VPSDE.linear()
    model = Counting(sd.GaussianMixture.ring2d(sde))
    _, info = sd.sample(model, sde, shape=(16, 2), solver=solver, generator=torch.Generator().manual_seed(0),
                        return_info=True, **quick_kwargs(solver, steps=13))
    assert info.nfe == model.calls > 1
    if sd.SOLVERS[solver].adaptive:
        assert info.steps is None
        torch.testing.assert_close(info.times, torch.tensor([sde.T, sde.t_min], dtype=F64))


# ---- callback, progress, dtype, shapes ------------------------------------------------------------------
@pytest.mark.parametrize("solver", [s for s in FIXED if s != BRIDGE])
def test_callback_once_per_step_with_decreasing_t(solver):
    sde = sd.VPSDE.linear()
    seen = []
    steps = 5
    x, info = sd.sample(small_mixture(sde), sde, shape=(4, 2), solver=solver, steps=steps, final_denoise=False,
                        callback=lambda i, t, x: seen.append((i, t, x.clone())),
                        generator=torch.Generator().manual_seed(0), return_info=True)
    assert [i for i, _, _ in seen] == list(range(steps))
    assert [t for _, t, _ in seen] == info.times[1:].tolist()  # strictly decreasing (checked in the grid)
    assert all(b < a for a, b in zip([t for _, t, _ in seen], [t for _, t, _ in seen][1:]))
    assert torch.equal(seen[-1][2], x)  # the last callback sees the returned state


@pytest.mark.parametrize("solver", ADAPTIVE + ["torchsde"])
def test_callback_of_one_shot_solvers_ends_at_t_end(solver):
    """Adaptive solvers (and the torchsde bridge) report only the end of their solve; the state
    they hand to the callback is the returned one."""
    sde = sd.VPSDE.linear()
    seen = []
    x = sd.sample(small_mixture(sde), sde, shape=(4, 2), solver=solver, final_denoise=False,
                  callback=lambda i, t, x: seen.append((i, t, x.clone())), generator=torch.Generator().manual_seed(0),
                  **quick_kwargs(solver))
    assert len(seen) >= 1 and torch.equal(seen[-1][2], x)
    ts = [t for _, t, _ in seen]
    assert all(b < a for a, b in zip(ts, ts[1:]))
    assert ts[-1] == pytest.approx(sde.t_min)


def test_torchsde_callback_reports_t_end():
    sde = sd.VPSDE.linear()
    seen = []
    sd.sample(small_mixture(sde), sde, shape=(4, 2), solver="torchsde", steps=5,
              callback=lambda i, t, x: seen.append(t), generator=torch.Generator().manual_seed(0))
    assert seen[-1] == pytest.approx(sde.t_min)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_progress_bar_changes_nothing(solver, capsys):
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    kw = dict(shape=(4, 2), solver=solver, **quick_kwargs(solver))
    a = sd.sample(mix, sde, progress=True, generator=torch.Generator().manual_seed(0), **kw)
    b = sd.sample(mix, sde, progress=False, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)
    capsys.readouterr()


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_float64_sampling_with_a_float32_model(solver):
    """A float32 network under float64 sampling: the state stays float64 and agrees with an
    all-float64 run up to float32 round-off (~1e-7) grown through the flow, or the adaptive
    solvers' tolerance (1e-5): 1e-3 is a loose bound on both and far below an O(1) error.
    adaptive_sde samples the 16-D mixture instead: in 2-D it rejects 30-45% of its attempts, so
    round-off flips some decision, and the sample then follows its Brownian path through other
    times (the draws are kept): an equally valid sample, not a nearby one. In 16-D rejections are rare."""
    sde = sd.VPSDE.linear()
    data = sharp_mixture_16d(sde) if solver == "adaptive_sde" else sd.GaussianMixture.ring2d(sde)
    x_T = torch.randn(32, data.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    f32 = lambda x, t: data(x.float(), t.float()).float()  # noqa: E731
    kw = dict(x_T=x_T, solver=solver, **quick_kwargs(solver, steps=20))
    a = sd.sample(f32, sde, generator=torch.Generator().manual_seed(1), **kw)
    b = sd.sample(data, sde, generator=torch.Generator().manual_seed(1), **kw)
    assert a.dtype == F64
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_image_shaped_samples(solver):
    """x of shape (batch, 1, 4, 4) goes through every solver and lands on the image modes."""
    sde = sd.VPSDE.linear()
    means = torch.stack([torch.full((1, 4, 4), 0.5, dtype=F64), torch.full((1, 4, 4), -0.5, dtype=F64)])
    mix = sd.GaussianMixture(sde, [1.0, 1.0], means, 0.2)
    x = sd.sample(mix, sde, shape=(16, 1, 4, 4), solver=solver, generator=torch.Generator().manual_seed(0),
                  **quick_kwargs(solver, steps=100))
    assert x.shape == (16, 1, 4, 4) and x.dtype == torch.float32
    assert mix.mode_report(x)["stray"] == 0.0  # all 16 samples near a mode (each would stray w.p. 1e-4)


# ---- time conventions -------------------------------------------------------------------------------------
def test_index_time_on_the_chain_grid():
    """Denoiser(time_input="index") calls the network with the 0-based index tN - 1."""
    N = 20
    sde = sd.VPSDE.from_betas(np.linspace(1e-4, 0.2, N))
    net = Counting(lambda x, idx: torch.zeros_like(x))
    grid = torch.arange(N, 0, -1, dtype=F64) / N
    sd.sample(sd.Denoiser(net, sde, time_input="index"), sde, shape=(3, 2), solver="euler", grid=grid)
    idx = torch.stack(net.times)
    assert idx.shape == (N, 3)  # N-1 steps and the final denoising at t = 1/N
    torch.testing.assert_close(idx, torch.arange(N - 1, -1, -1, dtype=F64)[:, None].expand(N, 3),
                               rtol=0, atol=1e-5)  # the index arrives in x's dtype (float32)


@pytest.mark.parametrize("solver", ["euler", "heun", "ancestral", "euler_maruyama"])
def test_index_time_on_other_grids(solver):
    """Off the chain's knots the index is fractional: tN - 1 at the solver's grid times (for
    these solvers every model call sits at a grid time)."""
    N = 1000
    sde = sd.VPSDE.from_betas(sd.VPSDE.linear().discretize(N))
    net = Counting(lambda x, idx: 0.1 * x)
    _, info = sd.sample(sd.Denoiser(net, sde, time_input="index"), sde, shape=(2, 2), dtype=F64, solver=solver,
                        steps=9, return_info=True)
    idx = torch.stack(net.times)[:, 0]
    grid_idx = (info.times * N - 1).tolist()
    # Euler-type steps call at t_i; Heun at t_i and t_{i+1}; then the final denoising at t_end.
    nodes = [[i] if sd.SOLVERS[solver].nfe_per_step == 1 else [i, i + 1] for i in range(9)]
    want = torch.tensor([grid_idx[j] for step in nodes for j in step] + [grid_idx[-1]], dtype=F64)
    torch.testing.assert_close(idx, want, rtol=0, atol=1e-9)


def test_index_time_with_num_steps_on_a_continuous_sde():
    sde = sd.VPSDE.linear()
    net = Counting(lambda x, idx: 0.1 * x)
    _, info = sd.sample(sd.Denoiser(net, sde, time_input="index", num_steps=1000), sde, shape=(2, 2),
                        dtype=F64, solver="euler", steps=5, return_info=True)
    torch.testing.assert_close(torch.stack(net.times)[:, 0], info.times * 1000 - 1, rtol=0, atol=1e-9)


def test_grid_choice_matters_for_fixed_step_solvers_and_nfe_does_not_change():
    """A different grid is a different discretisation (and the same number of model calls)."""
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for solver in FIXED:
        if solver == "torchsde":
            continue  # see test_torchsde_honours_the_grid
        runs = {g: sd.sample(mix, sde, x_T=x_T, solver=solver, steps=6, grid=g, return_info=True,
                             generator=torch.Generator().manual_seed(1)) for g in ("uniform", "log_snr")}
        assert runs["uniform"][1].nfe == runs["log_snr"][1].nfe
        assert not torch.allclose(runs["uniform"][0], runs["log_snr"][0]), solver


def test_torchsde_refuses_a_non_uniform_grid():
    """The bridge steps uniformly: another grid is refused by name, before any model call."""
    sde = sd.VPSDE.linear()
    model = Counting(small_mixture(sde))
    with pytest.raises(ValueError, match="grid"):
        sd.sample(model, sde, shape=(4, 2), solver="torchsde", steps=6, grid="log_snr")
    assert model.calls == 0
