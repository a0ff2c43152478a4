"""Models of other diffusion paths (`scoresde.paths`, `Denoiser.from_sigma/from_flow/from_path`): the exact
mixture written natively in each convention — here, from its own formulas, not through the library's
conversions — samples through the adapter as the VP mixture does, to round-off."""
from __future__ import annotations

import math

import pytest
import torch

import scoresde as sd
from scoresde import paths

F64 = torch.float64
SDE = sd.VPSDE.linear(beta_max=18.0)  # noise at T inside every ready path's range (sub-VP's ends at VP's)
MIX = sd.GaussianMixture(SDE, [1.0, 2.0, 3.0], [[0.8, 0.1], [-0.5, 0.6], [0.0, -0.9]], 0.15)
X_T = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))


def native(x, a, s):
    """E[x0 | x], eps and the score of the mixture's marginal on the path x = a x0 + s eps (a, s per sample)."""
    a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
    var = a**2 * MIX.stds.reshape(1, -1, 1) ** 2 + s**2  # (batch, K, 1)
    diff = x[:, None, :] - a * MIX.means[None]  # (batch, K, d)
    log_p = torch.log(MIX.weights)[None, :, None] - 0.5 * diff.pow(2).sum(-1, keepdim=True) / var \
        - 0.5 * x.shape[1] * torch.log(2 * math.pi * var)
    r = torch.softmax(log_p, dim=1)
    x0 = (r * (MIX.means[None] + a * MIX.stds.reshape(1, -1, 1) ** 2 / var * diff)).sum(1)
    score = (r * (-diff / var)).sum(1)
    return x0, -s.reshape(-1, 1) * score, score


def sigma_denoiser(x, sigma):  # x = x0 + sigma eps -> x0
    return native(x, torch.ones_like(sigma), sigma)[0]


def flow_velocity(x, t):  # x = (1 - t) x0 + t eps -> v = eps - x0
    x0, eps, _ = native(x, 1 - t, t)
    return eps - x0


VE = paths.ve(0.002, 200.0)
SUBVP = paths.subvp(0.1, 20.0)


def ve_score(x, sigma):  # Song et al.'s NCSN++ convention: the score at noise level sigma
    return native(x, torch.ones_like(sigma), sigma)[2]


def subvp_eps(x, t):
    return native(x, SUBVP.a(t.to(F64)), SUBVP.s(t.to(F64)))[1]


def cosine_x0(x, t):  # a path given only by its coefficients
    return native(x, torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t))[0]


ADAPTED = {
    "sigma denoiser": lambda: sd.Denoiser.from_sigma(sigma_denoiser, SDE),
    "flow velocity": lambda: sd.Denoiser.from_flow(flow_velocity, SDE),
    "VE score": lambda: sd.Denoiser.from_path(ve_score, SDE, VE, prediction="score", time="sigma"),
    "sub-VP eps": lambda: sd.Denoiser.from_path(subvp_eps, SDE, SUBVP, prediction="eps"),
    "coefficients x0": lambda: sd.Denoiser.from_path(cosine_x0, SDE, alpha=lambda t: torch.cos(math.pi / 2 * t),
                                                     sigma=lambda t: torch.sin(math.pi / 2 * t), prediction="x0"),
}


@pytest.mark.parametrize("convention", list(ADAPTED))
@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc", "heun", "ancestral"])
def test_every_convention_samples_as_the_vp_model(convention, solver):
    model = ADAPTED[convention]()
    kw = dict(x_T=X_T, solver=solver, steps=8, generator=torch.Generator().manual_seed(1))
    reference = sd.sample(MIX, SDE, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    torch.testing.assert_close(sd.sample(model, SDE, **kw), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("convention", ["sigma denoiser", "flow velocity"])
def test_the_likelihood_through_an_adapter_is_the_mixtures_density(convention):
    x = MIX.sample(16, generator=torch.Generator().manual_seed(2)).to(F64)
    got = sd.log_likelihood(ADAPTED[convention](), SDE, x, rtol=1e-8, atol=1e-8).nats
    torch.testing.assert_close(got, sd.log_likelihood(MIX, SDE, x, rtol=1e-8, atol=1e-8).nats, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, MIX.log_prob(x), rtol=0, atol=2e-2)  # t_eps = 1e-5 blurs the data a little


def test_the_adapter_feeds_the_network_its_own_path():
    """At the VP time t the network sees x_vp sqrt(a^2 + s^2) and its own time of equal log-SNR."""
    seen = {}

    def spy(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    x, t = torch.randn(3, 2, dtype=F64), 0.3
    sd.Denoiser.from_flow(spy, SDE).eps(x, t)
    alpha, sigma = (float(v) for v in SDE.alpha_sigma(torch.tensor(t, dtype=F64)))
    t_flow = sigma / (alpha + sigma)  # log((1 - t)/t) = log(alpha/sigma)
    torch.testing.assert_close(seen["t"], torch.full((3,), t_flow, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(seen["x"], x * math.hypot(1 - t_flow, t_flow), rtol=1e-12, atol=0)


# ---- bad input ----------------------------------------------------------------------------------------
def test_a_grid_beyond_the_paths_noise_range_is_refused_naming_the_end():
    narrow = sd.Denoiser.from_path(ve_score, SDE, paths.ve(0.01, 50.0), prediction="score", time="sigma")
    with pytest.raises(ValueError, match=r"noisier than the ve\(sigma_min=0.01, sigma_max=50\) path goes"):
        sd.sample(narrow, SDE, x_T=X_T, solver="ddim", steps=4)
    clean = sd.Denoiser.from_path(ve_score, SDE, paths.ve(0.3, 200.0), prediction="score", time="sigma")
    with pytest.raises(ValueError, match=r"cleaner than the ve\(sigma_min=0.3, sigma_max=200\) path goes"):
        sd.sample(clean, SDE, x_T=X_T, solver="ddim", steps=4)


def test_a_network_returning_the_wrong_shape_is_named():
    bad = sd.Denoiser.from_sigma(lambda x, sigma: x[:, :1], SDE)
    with pytest.raises(ValueError, match=r"fn \(the network behind the sigma adapter\) returned \(64, 1\)"):
        sd.sample(bad, SDE, x_T=X_T, solver="ddim", steps=4)


@pytest.mark.parametrize("kw,error,message", [
    (dict(prediction="v"), ValueError, "prediction='v'"),
    (dict(time="index"), ValueError, "time='index'"),
    (dict(path="ve"), TypeError, "path='ve'"),
])
def test_bad_adapter_arguments(kw, error, message):
    kw = {"path": VE, **kw}
    with pytest.raises(error, match=message):
        paths.PathDenoiser(ve_score, SDE, **kw)


def test_from_path_wants_a_path_or_coefficients():
    with pytest.raises(ValueError, match="give a path"):
        sd.Denoiser.from_path(ve_score, SDE)
    with pytest.raises(ValueError, match="not both"):
        sd.Denoiser.from_path(ve_score, SDE, VE, alpha=torch.cos, sigma=torch.sin)


# ---- k-diffusion's samplers on the sigma-denoiser, written out from their algorithms -----------------
# (k-diffusion itself needs torchvision and more to import; these two references agree with its 0.1.1
# sample_euler and sample_dpmpp_2m to 0 and 3e-15 on this test's grid, checked once by hand.)
def k_euler(denoiser, x, sigmas):
    """Karras et al.'s Euler step in sigma (k-diffusion's sample_euler without churn): the last sigma is 0."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (x - denoiser(x, s)) / s * (s_next - s)
    return x


def k_dpmpp_2m(denoiser, x, sigmas):
    """DPM-Solver++(2M) in k-diffusion's form (Lu et al. 2022), on t = -log sigma: second order from the
    second step, first order into sigma = 0."""
    previous, h_previous = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, s)
        if s_next == 0:
            return denoised
        h = math.log(s / s_next)
        d = denoised if previous is None else (1 + h / (2 * h_previous)) * denoised - h / (2 * h_previous) * previous
        x = (s_next / s) * x - math.expm1(-h) * d
        previous, h_previous = denoised, h
    return x


@pytest.mark.parametrize("ours,theirs,options", [("euler", k_euler, {}),
                                                 ("dpm_solver_pp_2m", k_dpmpp_2m, {"lower_order_final": False})])
def test_k_diffusion_samplers_on_the_sigma_denoiser_match_ours(ours, theirs, options):
    """Ours on the VP grid t_i (then the final denoising step) and theirs in sigma = s/a on the same
    log-SNRs followed by sigma = 0, from x_T / alpha(T): the same samples, in VE units."""
    times = sd.grids.karras(SDE, 8, SDE.T, SDE.t_min)
    alpha, sigma = SDE.alpha_sigma(times)
    sigmas = (sigma / alpha).tolist() + [0.0]

    def denoiser(x, s):
        return sigma_denoiser(x, torch.full((x.shape[0],), s, dtype=F64))

    got = sd.sample(sd.Denoiser.from_sigma(sigma_denoiser, SDE), SDE, x_T=X_T, solver=ours, grid=times, **options)
    torch.testing.assert_close(got, theirs(denoiser, X_T / alpha[0], sigmas), rtol=1e-10, atol=1e-10)


# ---- learned variances (iDDPM) ------------------------------------------------------------------------
def with_variance(v):
    """MIX's eps with a learned-range variance output v(x) appended along dimension 1."""
    return sd.Denoiser(lambda x, t: torch.cat([MIX(x, t), v(x)], dim=1), SDE, variance="learned_range")


@pytest.mark.parametrize("v,fixed", [(-1.0, "posterior"), (1.0, "beta")])
def test_a_learned_variance_at_its_ends_is_the_posterior_or_the_beta_variance(v, fixed):
    kw = dict(x_T=X_T, solver="ancestral", steps=8)
    got = sd.sample(with_variance(lambda x: torch.full_like(x, v)), SDE, variance="learned",
                    generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(got, sd.sample(MIX, SDE, variance=fixed, generator=torch.Generator().manual_seed(3),
                                              **kw), rtol=1e-12, atol=1e-12)


def test_a_learned_variance_interpolates_in_log_space_per_element():
    """One step from t to s, with v differing per element: the draw's std is exp((f log beta + (1 - f) log
    tilde) / 2), f = (v + 1)/2, beta = 1 - (alpha_t/alpha_s)^2, tilde = beta sigma_s^2 / sigma_t^2."""
    times = torch.tensor([0.6, 0.3], dtype=F64)
    x = X_T[:4]
    v = torch.tensor([[-1.0, 0.5], [0.0, 1.0], [-0.25, 0.75], [0.9, -0.9]], dtype=F64)
    model = with_variance(lambda xx: v)
    draw = sd.GaussianNoise(torch.Generator().manual_seed(4))
    z = draw.draw(x.shape, F64, x.device)
    got = sd.sample(model, SDE, x_T=x, solver="ancestral", grid=times, variance="learned", final_denoise=False,
                    noise=lambda like, t0, t1: z)
    mean = sd.sample(MIX, SDE, x_T=x, solver="ancestral", grid=times, final_denoise=False,
                     noise=lambda like, t0, t1: torch.zeros_like(like))
    (a_t, a_s), (s_t, s_s) = SDE.alpha_sigma(times)
    beta = 1 - (a_t / a_s) ** 2
    tilde = beta * s_s**2 / s_t**2
    f = (v + 1) / 2
    torch.testing.assert_close(got, mean + torch.exp(0.5 * (f * beta.log() + (1 - f) * tilde.log())) * z,
                               rtol=1e-12, atol=1e-12)


def test_learned_variance_refusals():
    with pytest.raises(ValueError, match="variance='learned': the model .* learns no variance"):
        sd.sample(MIX, SDE, x_T=X_T, solver="ancestral", steps=3, variance="learned")
    with pytest.raises(ValueError, match=r"with variance='learned_range' expected twice x's 2 channels"):
        sd.sample(sd.Denoiser(MIX, SDE, variance="learned_range"), SDE, x_T=X_T, solver="ancestral", steps=3,
                  variance="learned")
    with pytest.raises(ValueError, match="variance='fixed'"):
        sd.Denoiser(MIX, SDE, variance="fixed")


def test_ancestral_draws_with_a_learned_variance_when_the_model_has_one():
    model = with_variance(lambda x: 0.3 * torch.tanh(x))
    kw = dict(x_T=X_T, solver="ancestral", steps=6)
    default = sd.sample(model, SDE, generator=torch.Generator().manual_seed(5), **kw)
    learned = sd.sample(model, SDE, variance="learned", generator=torch.Generator().manual_seed(5), **kw)
    posterior = sd.sample(model, SDE, variance="posterior", generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(default, learned) and not torch.allclose(default, posterior)
    # a model without one keeps the posterior variance
    assert torch.equal(sd.sample(MIX, SDE, generator=torch.Generator().manual_seed(5), **kw),
                       sd.sample(MIX, SDE, variance="posterior", generator=torch.Generator().manual_seed(5), **kw))


def test_a_nan_in_a_learned_variance_is_reported_like_any_model_nan():
    model = with_variance(lambda x: torch.where(x[:, :1] > 10, 0.0, math.nan).expand_as(x))
    with pytest.raises(FloatingPointError, match="the model returned NaN or inf at model call 1"):
        sd.sample(model, SDE, x_T=X_T, solver="ancestral", steps=3)
