"""The denoising objective, EMA and the training configuration."""
import math

import pytest
import torch
from scipy.integrate import quad

import scoresde as sd
from scoresde.train.config import PRESETS, TrainConfig, apply_overrides, preset
from scoresde.train.ema import EMA
from scoresde.train.objective import Objective, diffusion_loss

F64 = torch.float64


def exact_predictor(gauss: sd.Gaussian, target: str):
    """The Bayes-optimal network for Gaussian data, in the target's units."""
    def net(x_t, t):
        t = t.to(F64)
        eps = gauss.eps(x_t.to(F64), t)
        alpha, sigma = gauss.sde.alpha_sigma(t)
        a, s = alpha[:, None], sigma[:, None]
        return sd.prediction.from_eps(target, eps, x_t.to(F64), a, s)
    return net


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_loss_of_the_exact_model_is_the_posterior_variance(target):
    """For data N(mu, c^2 I) the optimal predictor's squared error is the posterior variance:
    Var(eps | x_t) = a^2 c^2 / (a^2 c^2 + s^2), Var(x0 | x_t) = c^2 s^2 / (a^2 c^2 + s^2) and
    Var(v | x_t) = Var(eps | x_t) / a^2 (v = a eps - s x0 = eps / a - (s / a) x_t).
    The Monte Carlo loss must match its average over t ~ U(t_eps, T) within 5 standard errors;
    forming x_t, the target or the time draw wrongly moves it far outside."""
    sde = sd.VPSDE.linear()
    c = 0.5
    gauss = sd.Gaussian(sde, torch.tensor([0.3, -0.2]), c)
    objective = Objective(target=target, t_eps=1e-3)

    def posterior_variance(t):
        a2 = math.exp(2 * float(sde.log_alpha(torch.tensor(t, dtype=F64))))
        s2 = 1 - a2
        v_eps = a2 * c**2 / (a2 * c**2 + s2)
        return {"eps": v_eps, "x0": c**2 * s2 / (a2 * c**2 + s2), "v": v_eps / a2}[target]

    expected = quad(posterior_variance, 1e-3, sde.T, limit=200)[0] / (sde.T - 1e-3)
    g = torch.Generator().manual_seed(0)
    net = exact_predictor(gauss, target)
    losses = torch.stack([diffusion_loss(net, sde, gauss.sample(4096, generator=g, dtype=F64), objective,
                                         generator=g) for _ in range(40)])
    se = losses.std() / math.sqrt(len(losses))
    assert abs(losses.mean().item() - expected) < 5 * se.item() + 1e-9, (losses.mean().item(), expected)


def test_a_worse_model_has_a_higher_loss():
    sde = sd.VPSDE.linear()
    gauss = sd.Gaussian(sde, torch.tensor([0.3, -0.2]), 0.5)
    x0 = gauss.sample(8192, generator=torch.Generator().manual_seed(1), dtype=F64)
    objective = Objective()
    exact = exact_predictor(gauss, "eps")
    loss = lambda net: diffusion_loss(net, sde, x0, objective, generator=torch.Generator().manual_seed(2))  # noqa
    assert loss(lambda x, t: 1.1 * exact(x, t)) > loss(exact)


def test_discrete_time_draws_chain_steps():
    sde = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 50, dtype=F64))
    t = Objective(time="discrete").sample_times(sde, 5000, generator=torch.Generator().manual_seed(0))
    n = t * 50
    assert torch.allclose(n, n.round(), atol=1e-9)
    assert n.min() == 1 and n.max() == 50
    with pytest.raises(ValueError, match="num_steps"):
        Objective(time="discrete").sample_times(sd.VPSDE.linear(), 3)


def test_continuous_time_is_uniform_on_t_eps_to_T():
    sde = sd.VPSDE.cosine()
    t = Objective(t_eps=0.01).sample_times(sde, 20000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.01 and t.max() <= sde.T
    # mean of U(a, b) within 5 standard errors
    a, b = 0.01, sde.T
    assert abs(t.mean().item() - (a + b) / 2) < 5 * (b - a) / math.sqrt(12 * len(t))


def test_min_snr_weights():
    """Hang et al. 2023: the effective weight on the x0 error is min(SNR, gamma). The x0 error is
    SNR times the eps error and (SNR + 1) times the v error, so w * factor = min(SNR, gamma)."""
    alpha = torch.tensor([0.99, 0.5, 0.01], dtype=F64)
    sigma = (1 - alpha**2).sqrt()
    snr = (alpha / sigma) ** 2
    for target, factor in (("x0", torch.ones_like(snr)), ("eps", snr), ("v", snr + 1)):
        w = Objective(target=target, min_snr_gamma=5.0).weight(alpha, sigma)
        torch.testing.assert_close(w * factor, snr.clamp(max=5.0))
    assert Objective().weight(alpha, sigma) is None


@pytest.mark.parametrize("kwargs", [dict(target="score"), dict(time="daily"), dict(t_eps=0.0), dict(min_snr_gamma=-1.0)])
def test_objective_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Objective(**kwargs)


def test_ema_matches_the_closed_form_average():
    """With warm-up, decay_n = min(d, (1+n)/(10+n)); the shadow is the recursive average."""
    net = torch.nn.Linear(3, 1)
    ema = EMA(net, decay=0.9, warmup=True)
    expected = net.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            net.weight.copy_(torch.full_like(net.weight, float(n)))
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * net.weight.detach()
        ema.update()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    copy = torch.nn.Linear(3, 1)
    ema.copy_to(copy)
    torch.testing.assert_close(copy.weight, expected)


def test_overrides_parse_by_field_type():
    config = apply_overrides(preset("digits"), ["lr=3e-4", "steps=10", "bf16=false", "min_snr_gamma=5",
                                                "model.base_channels=16", "schedule=cosine"])
    assert config.lr == 3e-4 and config.steps == 10 and config.bf16 is False
    assert config.min_snr_gamma == 5 and config.model_overrides == {"base_channels": 16}
    assert config.schedule == "cosine"
    assert PRESETS["digits"].model_overrides == {}  # presets are not mutated


@pytest.mark.parametrize("item,fragment", [("lrr=1", "did you mean 'lr'"), ("steps", "key=value"),
                                           ("steps=ten", "'ten' is not a int"), ("bf16=maybe", "boolean")])
def test_bad_overrides_are_named(item, fragment):
    with pytest.raises(ValueError, match=fragment):
        apply_overrides(preset("digits"), [item])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits, toy2d, fashion, cifar10"):
        preset("mnist")


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("cond_drop", 1.0),
                                         ("schedule", "quadratic"), ("grad_accum", 3)])
def test_config_validation_names_the_field(field, value):
    config = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field if field != "grad_accum" else "multiple of grad_accum"):
        config.validate()
