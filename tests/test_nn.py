"""Networks: shapes, conditioning, Ho et al.'s parameter count, config round trips, gradients,
the Denoiser plumbing and bad input."""
from __future__ import annotations

import json

import pytest
import torch

import scoresde as sd
import scoresde.nn as snn
from scoresde.nn import (
    MLP,
    PRESETS,
    UNet,
    build_network,
    count_parameters,
    describe,
    from_preset,
)

SMALL_PRESETS = [name for name in PRESETS if name != "cifar10"]


def _inputs(net, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = net.config
    shape = (batch, c["dim"]) if c["architecture"] == "MLP" else (batch, c["in_channels"], c["image_size"],
                                                                  c["image_size"])
    return torch.randn(shape, generator=g), torch.rand(batch, generator=g)


def _awake(net, seed=0, scale=0.05):
    """Jitter every weight so the zero-initialised layers no longer hide the rest of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


# ---- shapes and presets ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_every_preset_keeps_the_shape(name):
    torch.manual_seed(0)
    net = _awake(from_preset(name))
    x, t = _inputs(net, batch=3)
    size = net.config.get("cond_size")  # a super-resolution network takes its low-resolution image too
    cond = {"cond": torch.randn(3, net.config["cond_channels"], size, size)} if size else {}
    out = net(x, t, **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if net.config["num_classes"] is not None:
        out_y = net(x, t, torch.tensor([0, 1, net.config["num_classes"]]), **cond)
        assert out_y.shape == x.shape


def test_presets_have_what_the_issue_asks():
    assert PRESETS["tiny"]["image_size"] == 8 and PRESETS["tiny"]["in_channels"] == 1
    digits = from_preset("digits")
    assert (digits.config["image_size"], digits.config["in_channels"], digits.config["num_classes"]) == (8, 1, 10)
    assert 0.5e6 <= count_parameters(digits) <= 2e6  # shipped: a few MB of float32 weights
    assert count_parameters(from_preset("tiny")) < count_parameters(digits)
    toy = from_preset("toy2d")
    assert isinstance(toy, MLP) and toy.config["dim"] == 2


def test_cifar10_has_ho_et_al_parameter_count():
    torch.manual_seed(0)
    net = from_preset("cifar10")
    n = count_parameters(net)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    assert "35.7" in describe(net) and "UNet" in describe(net)
    # the layout of Ho et al.'s network: 2 blocks per level down, 3 up, attention only at 16x16 and mid
    attn = [name for name, m in net.named_modules() if isinstance(m, snn.unet.AttnBlock)]
    assert len(attn) == 2 + 3 + 1
    with torch.no_grad():
        out = _awake(net)(torch.randn(1, 3, 32, 32), torch.tensor([0.5]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_a_fresh_unet_outputs_zero_and_a_fresh_mlp_does_not():
    """Ho et al.'s initialisation: the output conv starts at zero (documented choice)."""
    torch.manual_seed(0)
    net = from_preset("tiny")
    x, t = _inputs(net)
    assert torch.equal(net(x, t), torch.zeros_like(x))
    mlp = from_preset("toy2d")
    assert mlp(*_inputs(mlp)).abs().min() > 0


# ---- conditioning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, kind", [("tiny", "sinusoidal"), ("tiny", "fourier"),
                                          ("toy2d", "sinusoidal"), ("toy2d", "fourier")])
def test_output_depends_on_time(preset, kind):
    torch.manual_seed(0)
    net = _awake(from_preset(preset, time_embedding=kind, dropout=0.0))
    x, _ = _inputs(net)
    out = {s: net(x, torch.full((4,), s)) for s in (0.1, 0.11, 0.9)}
    per_sample = lambda a, b: (a - b).flatten(1).abs().amax(1)
    assert (per_sample(out[0.1], out[0.9]) > 1e-3).all()
    assert (per_sample(out[0.1], out[0.11]) > 0).all()  # nearby times are told apart
    torch.testing.assert_close(net(x, torch.tensor(0.9)), out[0.9])  # a 0-d t is shared by the batch
    torch.testing.assert_close(net(x, 0.9), out[0.9])


@pytest.mark.parametrize("preset", ["tiny", "toy2d"])
def test_output_depends_on_class_and_none_is_the_null_class(preset):
    torch.manual_seed(0)
    net = _awake(from_preset(preset, num_classes=3, dropout=0.0))
    x, t = _inputs(net)
    out = {c: net(x, t, torch.full((4,), c)) for c in range(4)}
    for a in range(4):
        for b in range(a + 1, 4):
            assert ((out[a] - out[b]).flatten(1).abs().amax(1) > 1e-4).all(), (a, b)
    torch.testing.assert_close(net(x, t), out[3])  # y=None -> the null class, index num_classes
    mixed = net(x, t, torch.tensor([0, 1, 2, 3]))  # each sample uses its own label
    for i in range(4):
        torch.testing.assert_close(mixed[i], out[i][i])


def test_unconditional_net_refuses_labels():
    net = from_preset("tiny")
    x, t = _inputs(net)
    with pytest.raises(ValueError, match="y"):
        net(x, t, torch.zeros(4, dtype=torch.long))


# ---- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_build_network_round_trip(name):
    torch.manual_seed(0)
    net = from_preset(name, time_embedding="fourier") if name != "cifar10" else from_preset(name)
    config = json.loads(json.dumps(net.config))  # JSON-ready, and it survives the trip
    assert config == net.config
    cls = UNet if config["architecture"] == "UNet" else MLP
    # every constructor argument (an image-conditioning UNet's cond_channels and cond_size only when it has them)
    unset = {"cond_channels", "cond_size"} if cls is UNet and not config.get("cond_channels") else set()
    assert set(config) == {"architecture"} | set(snn._arguments(cls)) - unset
    twin = build_network(config)
    assert type(twin) is type(net) and twin.config == net.config
    a, b = net.state_dict(), twin.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    if name == "cifar10":
        return
    twin.load_state_dict(a)  # the fourier frequencies travel with the weights
    net, twin = _awake(net), _awake(twin)
    x, t = _inputs(net)
    size = config.get("cond_size")
    cond = {"cond": torch.randn(len(x), config["cond_channels"], size, size)} if size else {}
    torch.testing.assert_close(twin(x, t, **cond), net(x, t, **cond))


def test_from_preset_overrides_and_copies():
    net = from_preset("tiny", base_channels=8, num_groups=4, num_classes=5)
    assert net.config["base_channels"] == 8 and net.config["num_classes"] == 5
    assert PRESETS["tiny"]["base_channels"] == 16 and "num_classes" not in PRESETS["tiny"]  # untouched
    assert count_parameters(net) < count_parameters(from_preset("tiny"))


def test_config_errors_list_valid_choices():
    with pytest.raises(ValueError, match="tiny.*digits"):
        from_preset("nope")
    with pytest.raises(ValueError, match="base_chanels.*valid keys.*base_channels"):
        from_preset("tiny", base_chanels=8)
    with pytest.raises(ValueError, match="MLP.*UNet"):
        build_network({"architecture": "Transformer"})
    with pytest.raises(ValueError, match="MLP.*UNet"):
        build_network({"dim": 2})
    with pytest.raises(ValueError, match="widht.*hidden"):
        build_network({"architecture": "MLP", "dim": 2, "widht": 3})


def test_describe_and_counts():
    net = from_preset("tiny")
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())
    line = describe(net)
    assert "\n" not in line and line.startswith("UNet") and snn.format_count(count_parameters(net)) in line
    assert snn.format_count(35_746_307) == "35.75M" and snn.format_count(12_345) == "12.3k"
    assert describe(from_preset("toy2d")).startswith("MLP")
    assert describe(torch.nn.Linear(3, 2)) == "Linear: 8 parameters"


# ---- training and sampling plumbing -----------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "toy2d"])
def test_gradients_reach_every_parameter(preset):
    """From the real (zero-output) initialisation: after a few Adam steps every parameter,
    each class row included, gets a non-zero gradient."""
    torch.manual_seed(0)
    net = from_preset(preset, num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t = _inputs(net, batch=8)
    y = torch.tensor([0, 1, 2, 3] * 2)
    for _ in range(4):
        opt.zero_grad()
        loss = (net(x, t, y) - x).square().mean()
        loss.backward()
        opt.step()
    opt.zero_grad()
    (net(x, t, y) - x).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("preset", ["tiny", "toy2d"])
def test_denoiser_and_sample_keep_the_shape(preset):
    torch.manual_seed(0)
    net = _awake(from_preset(preset, num_classes=2))
    sde = sd.VPSDE.linear()
    shape = _inputs(net, batch=3)[0].shape
    x = sd.sample(net, sde, shape=shape, solver="euler", steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == shape and torch.isfinite(x).all()
    y = torch.tensor([0, 1, 2])
    wrapped = sd.Denoiser(lambda x, t: net(x, t, y), sde)
    x2 = sd.sample(wrapped, sde, shape=shape, solver="euler", steps=3, generator=torch.Generator().manual_seed(0))
    assert x2.shape == shape and not torch.allclose(x, x2)  # the labels reach the network
    xt = torch.randn(shape)
    torch.testing.assert_close(sd.Denoiser(net, sde).eps(xt, 0.3), net(xt, torch.full((3,), 0.3)))


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    net = _awake(from_preset("tiny", num_classes=3))
    x, t = _inputs(net)
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert low.shape == x.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_forward_has_no_graph_breaks():
    """torch.compile-friendly: one graph, no data-dependent Python control flow."""
    import torch._dynamo as dynamo
    for net, y in [(from_preset("tiny", num_classes=3), torch.tensor([0, 1, 3, 2])),
                   (from_preset("toy2d", time_embedding="fourier"), None)]:
        x, t = _inputs(net)
        dynamo.reset()
        report = dynamo.explain(net)(x, t, y)
        assert report.graph_break_count == 0, report.break_reasons
    dynamo.reset()


# ---- bad input ------------------------------------------------------------------------------------
TINY = dict(PRESETS["tiny"])
TINY.pop("architecture")


@pytest.mark.parametrize("change, name", [
    (dict(image_size=10), "image_size"),  # 10 is not divisible by 2**(3-1) with mults (1, 2, 2)
    (dict(attention_resolutions=[3]), "attention_resolutions"),
    (dict(attention_resolutions=[16]), "attention_resolutions"),
    (dict(num_groups=5), "num_groups"),
    (dict(time_embedding="learned"), "time_embedding"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(num_classes=0), "num_classes"),
    (dict(channel_mults=[]), "channel_mults"),
    (dict(base_channels=0), "base_channels"),
    (dict(time_scale=0.0), "time_scale"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_res_blocks=True), "num_res_blocks"),
])
def test_bad_unet_arguments_name_the_argument(change, name):
    kwargs = {**TINY, "channel_mults": [1, 2, 2], **change}
    with pytest.raises(ValueError, match=name):
        UNet(**kwargs)


@pytest.mark.parametrize("change, name", [(dict(dim=0), "dim"), (dict(layers=0), "layers"),
                                          (dict(dropout=2), "dropout"), (dict(time_embedding="x"), "time_embedding"),
                                          (dict(hidden=7), "hidden")])
def test_bad_mlp_arguments_name_the_argument(change, name):
    with pytest.raises(ValueError, match=name):
        MLP(**{"dim": 2, **change})


def test_bad_forward_inputs_name_the_argument():
    net = from_preset("tiny", num_classes=3)
    x, t = _inputs(net)
    for bad_x in (torch.randn(4, 3, 8, 8), torch.randn(4, 1, 16, 16), torch.randn(1, 8, 8)):
        with pytest.raises(ValueError, match=r"x: expected shape \(batch, 1, 8, 8\).*got"):
            net(bad_x, t)
    for bad_t in (torch.rand(3), torch.rand(4, 1)):
        with pytest.raises(ValueError, match=r"t: expected shape \(4,\)"):
            net(x, bad_t)
    with pytest.raises(ValueError, match=r"y: expected shape \(4,\)"):
        net(x, t, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="y: expected .* integer"):
        net(x, t, torch.zeros(4))
    mlp = from_preset("toy2d")
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 2\)"):
        mlp(torch.randn(4, 3), t)
    with pytest.raises(TypeError, match="x"):
        mlp(torch.zeros(4, 2, dtype=torch.long), t)


def test_sinusoidal_embedding_follows_ho_et_al():
    """[sin(s w_k), cos(s w_k)] with w_k = 10000^(-k/(half-1)): w_0 = 1, w_last = 1e-4."""
    s = torch.tensor([0.0, 1.0, 500.0], dtype=torch.float64)
    emb = snn.sinusoidal_embedding(s, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    w = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4], dtype=torch.float64)
    torch.testing.assert_close(emb[2], torch.cat([torch.sin(500 * w), torch.cos(500 * w)]))
    # the network sees t * time_scale: t = 0.5 with time_scale 1000 is s = 500
    te = snn.TimeEmbedding("sinusoidal", 8, 1000.0)
    torch.testing.assert_close(te(torch.tensor([0.5]), torch.float64)[0], emb[2])
