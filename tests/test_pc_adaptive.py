"""Predictor-corrector sampling (Song et al. 2021) and the adaptive reverse-SDE solver of
Jolicoeur-Martineau et al. (2021): transcribed formulas, distribution checks against exact sharp
mixtures, strong error against a fine solve on the same Brownian path, and refused options."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import scoresde as sd
import scoresde.solvers.adaptive_sde  # noqa: F401  (registers "adaptive_sde")
import scoresde.solvers.pc  # noqa: F401  (registers "pc")
from scoresde.solvers.adaptive_sde import _PathAhead
from scoresde.solvers.base import ModelRun
from test_solvers import expected_std_ratio, mixture_failures, sharp_mixture_16d

F64 = torch.float64




class Counting:
    """An exact eps model that counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.model(x, t)


class Recording(sd.GaussianNoise):
    """GaussianNoise that keeps every step draw, to replay them in a transcription."""

    def __init__(self, generator):
        super().__init__(generator)
        self.draws = []

    def __call__(self, like, t0, t1):
        z = super().__call__(like, t0, t1)
        self.draws.append((t0, t1, z.clone()))
        return z


def small_mixture(sde, dim=2):
    means = torch.tensor([[0.8, 0.1, -0.3], [-0.5, -0.6, 0.4]], dtype=F64)[:, :dim]
    return sd.GaussianMixture(sde, [1.0, 2.0], means, [0.2, 0.3])


def pooled_spread(mix, x):
    """The pooled within-mode std ratio (sample std over true std) and its standard error: with
    x - mu ~ N(0, r^2 c^2 I_d) the mean of |x - mu|^2 / (d c^2) over n samples estimates r^2 with
    relative SE sqrt(2/(d n)), so r has SE r / sqrt(2 d n)."""
    rep = mix.mode_report(x)
    counts = rep["weights"] * x.shape[0]
    n = counts.sum().item()
    r = math.sqrt((counts * rep["std_ratio"].nan_to_num() ** 2).sum().item() / n)
    return r, r / math.sqrt(2 * mix.dim * n)


def rejected(exc, *fragments, sde=None, **kwargs):
    """sample(**kwargs) raises `exc` naming every fragment, before any model call."""
    sde = sde or sd.VPSDE.linear()
    model = Counting(small_mixture(sde))
    kwargs.setdefault("shape", (4, 2))
    with pytest.raises(exc) as info:
        sd.sample(model, sde, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    assert model.calls == 0, "refused only after calling the model"
    return str(info.value)


# ==== pc ==============================================================================================
@pytest.mark.parametrize("predictor", ["euler_maruyama", "ancestral", "ddim", "euler", "heun", "rk4", "edm"])
def test_pc_without_corrector_is_its_predictor(predictor):
    """n_corrector=0 runs the registered predictor step by step on two-point grids: the predictor on
    the whole grid, drawing the same noise in the same order (bit for bit but for edm, whose sigma
    ratios round differently by an ulp)."""
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    kw = dict(shape=(16, 2), dtype=F64, steps=9, grid="log_snr")
    a = sd.sample(mix, sde, solver="pc", predictor=predictor, n_corrector=0,
                  generator=torch.Generator().manual_seed(5), **kw)
    b = sd.sample(mix, sde, solver=predictor, generator=torch.Generator().manual_seed(5), **kw)
    if predictor == "edm":
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    else:
        assert torch.equal(a, b)
    # ... and not vacuously: one Langevin step per step moves the samples.
    c = sd.sample(mix, sde, solver="pc", predictor=predictor, generator=torch.Generator().manual_seed(5), **kw)
    assert (c - a).abs().max() > 1e-2


def pc_by_hand(mix, betas, x, draws, snr, n_corrector, step_size):
    """PC sampling (Song et al. 2021, Alg. 1) on the N-step chain's own grid t = n/N, written out:
    predictor DDIM(eta=0), x_s = alpha_s x0_hat + sigma_s eps; corrector: score_sde's
    LangevinCorrector for a VP-SDE with alpha = 1 - beta_n (its `sde.alphas`), x <- x + e g + sqrt(2 e) z
    with score g, and e = 2 alpha (snr mean|z| / mean|g|)^2 with norms averaged over the batch ("batch"),
    or e = 2 alpha (snr sigma_s)^2, the same rule with |z|^2 = d and |g|^2 = d / sigma_s^2 ("schedule")."""
    betas = torch.as_tensor(betas, dtype=F64)
    N = len(betas)
    alpha_bar = torch.cumprod(1 - betas, 0)
    draws = iter(draws)
    at = lambda n: torch.full((x.shape[0],), n / N, dtype=F64)  # noqa: E731
    for n in range(N, 1, -1):  # from t = n/N to s = (n-1)/N
        a_t, a_s = alpha_bar[n - 1].sqrt(), alpha_bar[n - 2].sqrt()
        s_t, s_s = (1 - alpha_bar[n - 1]).sqrt(), (1 - alpha_bar[n - 2]).sqrt()
        eps = mix(x, at(n))
        x = a_s * (x - s_t * eps) / a_t + s_s * eps
        for _ in range(n_corrector):
            g = -mix(x, at(n - 1)) / s_s
            t0, t1, z = next(draws)
            assert t0 == t1 == pytest.approx((n - 1) / N)  # Langevin draws sit at the new time
            if step_size == "batch":
                e = 2 * (1 - betas[n - 1]) * (snr * z.norm(dim=1).mean() / g.norm(dim=1).mean()) ** 2
            else:
                e = 2 * (1 - betas[n - 1]) * (snr * s_s) ** 2
            x = x + e * g + torch.sqrt(2 * e) * z
    assert next(draws, None) is None  # every draw was a corrector's
    return x


@pytest.mark.parametrize("step_size", ["schedule", "batch"])
def test_pc_is_song_et_al_algorithm_on_the_chain(step_size):
    betas = np.linspace(1e-3, 0.2, 20)
    N = len(betas)
    sde = sd.VPSDE.from_betas(betas)
    mix = sd.GaussianMixture(sde, [1.0, 3.0], [[0.6, -0.2, 0.1], [-0.7, 0.5, 0.0]], [0.15, 0.3])
    x_T = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    noise = Recording(torch.Generator().manual_seed(1))
    grid = torch.arange(N, 0, -1, dtype=F64) / N
    x = sd.sample(mix, sde, x_T=x_T, solver="pc", predictor="ddim", snr=0.2, n_corrector=2, grid=grid,
                  noise=noise, final_denoise=False, step_size=step_size)
    assert len(noise.draws) == 2 * (N - 1)
    ref = pc_by_hand(mix, betas, x_T, noise.draws, snr=0.2, n_corrector=2, step_size=step_size)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    # ... and the corrector did something: without it the result is far away.
    plain = sd.sample(mix, sde, x_T=x_T, solver="ddim", grid=grid, final_denoise=False)
    assert (plain - x).abs().max() > 0.05


def test_pc_step_size_rules_differ():
    """The two rules are distinguishable, so their transcriptions above are not one test twice."""
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    a, b = (sd.sample(mix, sde, shape=(8, 2), dtype=F64, solver="pc", steps=5, step_size=rule,
                      generator=torch.Generator().manual_seed(0)) for rule in ("schedule", "batch"))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("step_size,correctors", [("schedule", (0, 2, 4)), ("batch", (0, 1, 2))])
def test_pc_corrector_tightens_the_modes_at_equal_steps(step_size, correctors):
    """At 20 steps Euler-Maruyama leaves the ring's modes ~19% too wide; more Langevin steps per
    predictor step pull the spread toward the exact one (measured at seed 0, exact 0.967: batch rule
    1.147, 1.105, 1.078 with 0, 1, 2 corrector steps; the schedule rule, whose steps are much shorter
    on these sharp modes near t = 0, 1.147, 1.110, 1.087 with 0, 2, 4). Each gain must exceed 3
    standard errors of a difference of two pooled ratios (about 0.0055 at 20000 samples), so a
    corrector that does nothing, or pushes the wrong way, fails."""
    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    exact = expected_std_ratio(sde, 0.04, sde.t_min)
    errors, ses = [], []
    for n_corrector in correctors:
        x = sd.sample(ring, sde, shape=(20000, 2), steps=20, solver="pc", n_corrector=n_corrector,
                      step_size=step_size, generator=torch.Generator().manual_seed(0))
        r, se = pooled_spread(ring, x)
        errors.append(abs(r - exact))
        ses.append(se)
    for k in range(2):
        assert errors[k] - errors[k + 1] > 3 * math.hypot(ses[k], ses[k + 1]), (errors, ses)


@pytest.mark.parametrize("step_size", ["schedule", "batch"])
def test_pc_samples_a_sharp_mixture_in_16_dimensions(step_size):
    """Neither rule biases the Langevin step: per-sample norms (score_sde's rule on a batch of one)
    widen these modes by (d + 2)/d in variance, ~6% in std, about 4 standard errors here (and 50-80%
    on the 2-D ring); the schedule's step and the batch means do not."""
    sde = sd.VPSDE.linear()
    mix = sharp_mixture_16d(sde)
    x = sd.sample(mix, sde, shape=(1000, 16), solver="pc", steps=250, step_size=step_size,
                  generator=torch.Generator().manual_seed(0))
    assert mixture_failures(mix, x, expected_std_ratio(sde, 0.04, sde.t_min)) == []


def test_pc_nfe_and_callback_with_another_predictor():
    """Heun predicts with 2 calls and each of 3 Langevin steps adds one; the callback still comes once
    per outer step, with the outer index and time; the last one sees the state at t_end."""
    sde = sd.VPSDE.linear()
    model = Counting(small_mixture(sde))
    seen = []
    _, info = sd.sample(model, sde, shape=(4, 2), solver="pc", predictor="heun", n_corrector=3, steps=5,
                        callback=lambda i, t, x: seen.append((i, t, x.clone())),
                        generator=torch.Generator().manual_seed(0), return_info=True)
    assert info.nfe == model.calls == 5 * (2 + 3) + 1  # and the final denoising step
    assert [i for i, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == info.times[1:].tolist()
    x_end = sd.sample(small_mixture(sde), sde, shape=(4, 2), solver="pc", predictor="heun", n_corrector=3,
                      steps=5, final_denoise=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1][2], x_end)


@pytest.mark.parametrize("predictor,step_size", [("heun", "schedule"), ("heun", "batch"), ("ancestral", "batch"),
                                                ("ddim", "schedule")])
def test_pc_loop_is_sync_free(monkeypatch, predictor, step_size):
    """The corrector's norms and step sizes stay on the device: the loop runs on meta tensors."""
    monkeypatch.setattr(ModelRun, "check_finite", lambda self: None)
    sde = sd.VPSDE.linear()
    x_T = torch.empty(4, 3, 2, 2, device="meta")
    x = sd.sample(lambda x, t: 0.5 * x, sde, x_T=x_T, solver="pc", predictor=predictor, n_corrector=2, steps=3,
                  step_size=step_size, generator=torch.Generator().manual_seed(0))
    assert x.device.type == "meta" and x.shape == x_T.shape


@pytest.mark.parametrize("predictor,why", [("nope", "unknown"), ("eulr", "unknown"), ("dopri5", "adaptive"),
                                           ("rk45", "adaptive"), ("adaptive_sde", "adaptive"),
                                           ("unipc", "multistep"), ("dpm_solver_pp_2m", "multistep"),
                                           ("pc", "itself"), ("torchsde", "bridge")])
def test_pc_refuses_predictors_that_cannot_predict_and_says_why(predictor, why):
    msg = rejected(ValueError, f"predictor={predictor!r}", why, solver="pc", steps=5, predictor=predictor)
    valid = msg.split("one of")[1].split("]")[0]
    for name in ("euler_maruyama", "ancestral", "ddim", "euler", "heun", "rk4", "edm", "dpm_solver_2",
                 "dpm_solver_3"):
        assert repr(name) in valid  # the valid choices are listed ...
    for name in ("dopri5", "rk45", "adaptive_sde", "unipc", "dpm_solver_pp_2m", "pc", "torchsde"):
        assert repr(name) not in valid  # ... and only those


def test_pc_refuses_brownian_noise_for_the_corrector():
    """Langevin draws are not increments of the sampling path; without a corrector the path is fine."""
    sde = sd.VPSDE.linear()
    noise = sd.BrownianNoise((4, 2), t0=sde.T, t1=sde.t_min, seed=0)
    rejected(ValueError, "noise", "BrownianNoise", x_T=torch.zeros(4, 2), shape=None, solver="pc", steps=5,
             noise=noise)
    x = sd.sample(small_mixture(sde), sde, x_T=torch.zeros(4, 2), solver="pc", n_corrector=0, steps=5,
                  noise=noise)
    assert torch.isfinite(x).all()


# ==== adaptive_sde ====================================================================================
@pytest.mark.slow  # ~7 s: the default tolerances on the sharp ring
def test_adaptive_sde_samples_the_sharp_ring_at_default_tolerances():
    """Mode weights within 4.5 binomial SE, stray mass under 0.5%, within-mode spread within 5 SE of
    exact (the derivations are in test_solvers.mixture_failures), at 10000 samples: tighter than the
    generic 3000-sample check every solver gets."""
    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    model = Counting(ring)
    x, info = sd.sample(model, sde, shape=(10000, 2), solver="adaptive_sde", return_info=True,
                        generator=torch.Generator().manual_seed(0))
    assert mixture_failures(ring, x, expected_std_ratio(sde, 0.04, sde.t_min)) == []
    # Exact samples put a fraction ~1e-4 outside the modes' 1 - 1e-4 balls (fewer after the final
    # denoising shrink): about 1 of 10000; 5 or more would be a Poisson(1) tail of 4e-3.
    assert ring.mode_report(x)["stray"] < 5e-4
    # Two model calls per attempted step, and the final denoising step: all reported.
    assert info.nfe == model.calls and (info.nfe - 1) % 2 == 0
    assert info.steps is None


@pytest.mark.parametrize("solver,options", [("adaptive_sde", {}), ("pc", {"steps": 250})])
def test_sharp_ring_on_the_cosine_and_discrete_schedules(solver, options):
    """Neither solver leans on the linear schedule: the same checks hold on the cosine schedule (whose
    beta grows steeply near T) and on a 1000-step DDPM chain (piecewise-constant beta)."""
    for sde in (sd.VPSDE.cosine(), sd.VPSDE.from_betas(sd.VPSDE.linear().discretize(1000))):
        ring = sd.GaussianMixture.ring2d(sde)
        x = sd.sample(ring, sde, shape=(3000, 2), solver=solver, generator=torch.Generator().manual_seed(2),
                      **options)
        assert mixture_failures(ring, x, expected_std_ratio(sde, 0.04, sde.t_min)) == [], sde


@pytest.mark.slow  # over 5 s: in the slow run, to keep the default run within its budget
def test_adaptive_sde_tighter_tolerance_costs_more_and_errs_less():
    """Strong error against Euler-Maruyama on 4096 log-SNR steps of the same Brownian path (one
    BrownianNoise: its queries stay consistent, so a retried step sees the same path). Each tighter
    tolerance must take more model calls and land closer. The reference's own error is about its gap
    to an Euler-Maruyama run on half as many steps (strong order 1 with additive noise); the best
    adaptive run must err by more than 3 such gaps, so the reference's error cannot decide the order."""
    sde = sd.VPSDE.linear()
    data = sd.Gaussian(sde, [0.7, -0.4], 0.5)
    B = 64
    x_T = torch.randn(B, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    # Each sample steps on its own, so each attempt queries the path at 64 places: keep all its pieces.
    noise = sd.BrownianNoise((B, 2), t0=sde.T, t1=sde.t_min, seed=7, dtype=F64, cache_size=None)
    tolerances = [3e-1, 1e-1, 3e-2, 1e-2]
    runs = []
    for tol in tolerances:
        model = Counting(data)
        x, info = sd.sample(model, sde, x_T=x_T, solver="adaptive_sde", rtol=tol, atol=tol, noise=noise,
                            final_denoise=False, return_info=True)
        assert info.nfe == model.calls
        runs.append((info.nfe, x))
    ref, coarse = (sd.sample(data, sde, x_T=x_T, solver="euler_maruyama", noise=noise, final_denoise=False,
                             grid=sd.GRIDS["log_snr"](sde, n, sde.T, sde.t_min)) for n in (4096, 2048))
    rms = lambda a, b: (a - b).pow(2).sum(1).mean().sqrt().item()  # noqa: E731
    nfe = [n for n, _ in runs]
    errors = [rms(x, ref) for _, x in runs]
    assert all(a < b for a, b in zip(nfe, nfe[1:])), nfe
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] > 3 * rms(coarse, ref), (errors, rms(coarse, ref))


def test_brownian_noise_with_per_sample_steps():
    """adaptive_sde asks BrownianNoise for per-sample steps: sample k gets its row of the path's
    increment over its own step, scaled to unit variance, and zeros for an empty step."""
    noise = sd.BrownianNoise((4, 3), t0=1.0, t1=0.0, seed=3, dtype=F64)
    like = torch.empty(4, 3, dtype=F64)
    t0 = torch.tensor([0.9, 0.5, 0.9, 0.2], dtype=F64)
    t1 = torch.tensor([0.7, 0.5, 0.8, 0.1], dtype=F64)
    z = noise(like, t0, t1)
    for k in (0, 2, 3):
        h = (t0[k] - t1[k]).item()
        torch.testing.assert_close(z[k], noise.path(t1[k].item(), t0[k].item())[k] / h**0.5, rtol=1e-12, atol=0)
    assert torch.equal(z[1], torch.zeros(3, dtype=F64))


def test_adaptive_sde_keeps_the_draws_of_rejected_steps():
    """Whatever the decisions, the accepted increments are those of one Brownian path. A controller
    that rejects exactly the large draws (|z| > 1; the retry, at half the step, is accepted) still
    sums to W(1) ~ N(0, 1): variance within 5 standard errors, 5 sqrt(2/n). Fresh draws for the
    retries instead (the bias _PathAhead removes) give a variance of about 0.43."""
    n = 20000
    path = _PathAhead(torch.zeros(n, 1, dtype=F64))
    generator = torch.Generator().manual_seed(0)
    left, total = torch.ones(n, dtype=F64), torch.zeros(n, 1, dtype=F64)
    h, retry = torch.full((n,), 0.25, dtype=F64), torch.zeros(n, dtype=torch.bool)
    for _ in range(200):
        active = left > 0
        if not active.any():
            break
        step = torch.where(active, torch.minimum(h, left), 0.0)
        z = path.unit_increment(step, torch.randn(n, 1, dtype=F64, generator=generator))
        accept = active & ((z[:, 0].abs() <= 1) | retry)
        path.advance(accept)
        total += torch.where(accept[:, None], z * step.sqrt()[:, None], 0.0)
        left = torch.where(accept, left - step, left)
        h, retry = torch.where(accept, 0.25, step / 2), active & ~accept
    assert not (left > 0).any()
    assert abs(total.var().item() - 1) < 5 * math.sqrt(2 / n), total.var().item()


def test_adaptive_sde_asked_again_for_a_rejected_step_gives_its_draw():
    path = _PathAhead(torch.zeros(3, 2, dtype=F64))
    h = torch.tensor([0.5, 0.25, 0.0], dtype=F64)
    first = path.unit_increment(h, torch.randn(3, 2, dtype=F64))
    path.advance(torch.zeros(3, dtype=torch.bool))  # all rejected
    assert torch.equal(path.unit_increment(h, torch.randn(3, 2, dtype=F64)), first)
    assert torch.equal(first[2], torch.zeros(2, dtype=F64))  # an empty step: no increment


def test_adaptive_sde_step_control_from_its_model_calls():
    """The controller, reconstructed sample by sample from what the model sees. Attempt k calls the
    model on the whole batch at (x, t) and at (x', s), with per-sample t and s. For sample j, attempt k
    was accepted when attempt k + 1 starts from s_j (its x is then x''); for every accepted step the
    scaled error E_j = sqrt(mean(((x'' - x') / delta)^2)), delta = max(atol, rtol max(|x'|, |x'_prev|)),
    is at most 1 and the next step is min(t - t_end, 0.9 h E_j^-0.9); a rejected step is retried from the
    same state with a smaller step; a sample at t_end takes empty steps and stays put. A first step of 0.5
    from the prior is far too large, so some steps must be rejected, and the samples must part ways."""
    sde = sd.VPSDE.linear()
    mix = small_mixture(sde)
    calls = []

    def model(x, t):
        calls.append((t.clone(), x.clone()))
        return mix(x, t)

    rtol, atol = 2e-2, 5e-3
    x_T = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x_end = sd.sample(model, sde, x_T=x_T, solver="adaptive_sde", rtol=rtol, atol=atol, h_init=0.5,
                      final_denoise=False, generator=[torch.Generator().manual_seed(j) for j in range(8)])
    t_end = sde.t_min
    attempts = [(*calls[k], *calls[k + 1]) for k in range(0, len(calls), 2)]  # (t, x, s, x') per attempt
    assert any(len(t.unique()) > 1 for t, _, _, _ in attempts)  # per-sample times, not one for the batch
    rejections = 0
    for j in range(x_T.shape[0]):
        x_prev, accepted = x_T[j], 0
        assert attempts[0][0][j] == sde.T and attempts[0][2][j] == pytest.approx(sde.T - 0.5, abs=1e-12)
        for k, (t, x, s, x_low) in enumerate(attempts):
            t, x, s, x_low = t[j].item(), x[j], s[j].item(), x_low[j]
            if k + 1 < len(attempts):
                t_next, x_next, s_next, _ = (v[j] for v in attempts[k + 1])
                t_next, s_next = t_next.item(), s_next.item()
            else:  # the loop ended: this sample is done
                t_next, x_next, s_next = t_end, x_end[j], None
            if t == t_end:  # done: an empty step that leaves the sample where it is
                assert s == t_end and torch.equal(x_low, x) and torch.equal(x_next, x)
                continue
            h = t - s
            if t_next == t:  # rejected: retried from the same state with a smaller step
                rejections += 1
                assert torch.equal(x_next, x) and t_next - s_next < h
                continue
            assert t_next == s
            accepted += 1
            delta = torch.maximum(x_low.abs(), x_prev.abs()).mul(rtol).clamp(min=atol)
            err = ((x_next - x_low) / delta).pow(2).mean().sqrt().item()
            assert err <= 1.0
            if s_next is not None and t_next > t_end:
                assert t_next - s_next == pytest.approx(min(t_next - t_end, 0.9 * h * err**-0.9), rel=1e-9)
            x_prev = x_low
        assert accepted >= 10  # the sample took many steps: the checks above were exercised
    assert rejections >= 1


def test_adaptive_sde_gives_up_after_max_steps():
    sde = sd.VPSDE.linear()
    model = Counting(small_mixture(sde))
    with pytest.raises(RuntimeError, match=r"max_steps=3 attempted steps .* t_end="):
        sd.sample(model, sde, shape=(4, 2), solver="adaptive_sde", max_steps=3)
    assert model.calls == 6  # two per attempted step, nothing after giving up


