"""Super-resolution (SR3) and cascades: conditioning through `sample`, its checks, the digits_sr
training preset, and the cascade sampler."""
import pytest
import torch
import torch.nn.functional as F

import scoresde as sd
from scoresde import nn as networks
from scoresde.cascade import sample_cascade, super_resolve
from scoresde.pretrained import Pretrained
from scoresde.train import preset, train
from scoresde.train.config import apply_overrides

SDE = sd.VPSDE.linear()


class Recorder(torch.nn.Module):
    """A stub network: eps = 0, and records the channels of its input and of its conditioning."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond=None, cond_t=None):
        self.calls.append((x.shape, None if cond is None else cond.clone(), cond_t))
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", ["heun", "ddim", "euler_maruyama", "ancestral"])
def test_the_conditioning_reaches_the_network_through_sample(solver):
    net, cond = Recorder(), torch.randn(3, 1, 4, 4)
    model = sd.Denoiser(net, SDE, cond={"cond": cond, "cond_t": 0.1})
    sd.sample(model, SDE, shape=(3, 1, 8, 8), solver=solver, steps=4, generator=torch.Generator().manual_seed(0))
    assert net.calls
    for shape, got, level in net.calls:
        assert tuple(shape) == (3, 1, 8, 8) and torch.equal(got, cond) and level == 0.1


def test_guidance_wrappers_keep_working_with_a_conditioned_denoiser():
    net, cond = Recorder(), torch.randn(2, 1, 4, 4)
    model = sd.X0Correction(sd.Denoiser(net, SDE, cond=cond), SDE, sd.static_threshold())
    x = sd.sample(model, SDE, shape=(2, 1, 8, 8), solver="heun", steps=3)
    assert x.shape == (2, 1, 8, 8) and all(torch.equal(c, cond) for _, c, _ in net.calls)


def _sr_net():
    return networks.from_preset("digits_sr", base_channels=8, dropout=0.0)


def test_a_conditioning_image_of_the_wrong_size_is_refused_with_expected_and_got():
    net = _sr_net()
    with pytest.raises(ValueError, match=r"expected a conditioning image of shape \(batch, 1, 4, 4\).*got \(2, 1, 8, 8\)"):
        sd.Denoiser(net, SDE, cond=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"cond: expected shape \(2, 1, 4, 4\).*got \(2, 1, 2, 2\)"):
        net(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), cond=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="cond: 3 conditioning samples for a batch of 2"):
        sd.sample(sd.Denoiser(net, SDE, cond=torch.zeros(3, 1, 4, 4)), SDE, shape=(2, 1, 8, 8), steps=2)
    with pytest.raises(ValueError, match="takes no conditioning image"):
        networks.from_preset("tiny")(torch.zeros(2, 1, 8, 8), 0.5, cond=torch.zeros(2, 1, 4, 4))


def test_missing_conditioning_for_a_conditional_network_is_refused():
    with pytest.raises(ValueError, match=r"cond=None: this network is conditioned.*\(2, 1, 4, 4\)"):
        sd.sample(sd.Denoiser(_sr_net(), SDE), SDE, shape=(2, 1, 8, 8), steps=2)


def test_the_unet_sees_the_upsampled_conditioning():
    """Other conditioning images, or levels, give other outputs (zero-initialised layers made random)."""
    net = _sr_net().eval()
    for module in net.modules():
        if getattr(module, "_zero_init", False):
            torch.nn.init.normal_(module.weight, std=0.2)
    x, t = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((1,), 0.5)
    a = net(x, t, cond=torch.zeros(1, 1, 4, 4))
    b = net(x, t, cond=torch.ones(1, 1, 4, 4))
    c = net(x, t, cond=torch.zeros(1, 1, 4, 4), cond_t=torch.full((1,), 0.5))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert net.config["cond_size"] == 4 and "cond_channels" not in networks.from_preset("tiny").config


class UpsampledCond(torch.nn.Module):
    """An exact "model" whose x0 prediction is the upsampled conditioning image."""

    def forward(self, x, t, cond=None, cond_t=None):
        return F.interpolate(cond, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("solver", ["ddim", "euler_maruyama"])
def test_samples_are_the_upsampled_conditioning_for_an_exact_model(solver):
    low = torch.randn(4, 1, 4, 4)
    model = sd.Denoiser(UpsampledCond(), SDE, prediction="x0", cond=low)
    x = sd.sample(model, SDE, shape=(4, 1, 8, 8), solver=solver, steps=20, generator=torch.Generator().manual_seed(1))
    want = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(x, want, atol=1e-4)
    assert not torch.allclose(x, F.interpolate(low, size=(8, 8), mode="nearest"), atol=1e-2)


def test_a_tiny_digits_sr_run_trains_checkpoints_loads_back_and_upsamples(tmp_path):
    config = apply_overrides(preset("digits_sr"), [
        "steps=3", "batch_size=16", "log_every=1", "sample_every=3", "sample_n=4", "sample_steps=2",
        "ckpt_every=3", f"out={tmp_path / 'sr'}", "model.base_channels=8"])
    path = train(config)
    assert (tmp_path / "sr" / "samples_00000003.png").is_file()
    sr = sd.load_model(path)
    assert sr.denoiser.net.config["cond_size"] == 4 and sr.config["train"]["lowres"] == 4
    low = torch.zeros(2, 1, 4, 4)
    x = super_resolve(sr, low, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"low: expected low-resolution images of shape \(batch, 1, 4, 4\).*got \(2, 1, 8, 8\)"):
        super_resolve(sr, torch.zeros(2, 1, 8, 8), steps=2)
    # A cascade: a (stub) 4x4 base, then the super-resolution model.
    base = Pretrained(sd.Denoiser(lambda x, t: torch.zeros_like(x), SDE), SDE, (1, 4, 4), {}, tmp_path)
    high, low = sample_cascade(base, sr, 3, base_steps=2, sr_steps=2, return_low=True,
                               generator=torch.Generator().manual_seed(0))
    assert high.shape == (3, 1, 8, 8) and low.shape == (3, 1, 4, 4)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        sample_cascade(base, base, 2)


def test_a_run_that_mismatches_lowres_and_the_network_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lowres=0: model preset 'digits_sr' is conditioned on a 4x4 image"):
        train(apply_overrides(preset("digits_sr"), ["lowres=0", "steps=1", f"out={tmp_path / 'a'}"]))
    with pytest.raises(ValueError, match="lowres=4: model preset 'tiny' takes no conditioning image"):
        train(apply_overrides(preset("digits_sr"), ["model=tiny", "steps=1", f"out={tmp_path / 'b'}"]))
    with pytest.raises(ValueError, match="split='test'"):
        apply_overrides(preset("digits_sr"), ["split=test"]).validate()
