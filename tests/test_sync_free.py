"""Fixed-step sampling loops never read a device tensor on the host.

A tensor on PyTorch's "meta" device has a shape and dtype but no data: any host read of it
(.item(), bool(), .tolist(), .cpu(), numpy) raises. Running every fixed-step solver with x_T on
the meta device therefore proves the loop sync-free on any device, CUDA included, without a GPU.
The one deliberate read, the finiteness check after the loop, is switched off here.
"""
import pytest
import torch

import scoresde as sd
from scoresde.solvers.base import ModelRun

FIXED_STEP = [name for name, spec in sd.SOLVERS.items() if not spec.adaptive and name != "torchsde"]
SDES = {
    "linear": sd.VPSDE.linear(),
    "cosine": sd.VPSDE.cosine(),
    "chain": sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)),
}


@pytest.fixture
def no_final_check(monkeypatch):
    monkeypatch.setattr(ModelRun, "check_finite", lambda self: None)


def test_meta_tensors_refuse_host_reads():
    """The premise: reading a meta tensor on the host fails."""
    x = torch.zeros(3, device="meta")
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.tolist()):
        with pytest.raises(Exception):
            read()


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("solver", FIXED_STEP)
@pytest.mark.parametrize("prediction,time_input", [("eps", "t"), ("v", "index")])
def test_fixed_step_loops_do_not_sync(no_final_check, solver, sde_name, prediction, time_input):
    sde = SDES[sde_name]
    net = sd.Denoiser(lambda x, t: 0.5 * x, sde, prediction=prediction, time_input=time_input, num_steps=1000)
    x_T = torch.empty(4, 3, 2, 2, device="meta")
    x = sd.sample(net, sde, x_T=x_T, solver=solver, steps=4, generator=torch.Generator().manual_seed(0))
    assert x.device.type == "meta" and x.shape == x_T.shape


def test_a_syncing_model_is_caught(no_final_check):
    """The check has teeth: a model that reads its input on the host fails on meta tensors."""
    sde = SDES["linear"]

    def syncing_model(x, t):
        return x * float(x.abs().max())

    with pytest.raises(Exception):
        sd.sample(syncing_model, sde, x_T=torch.empty(4, 2, device="meta"), solver="heun", steps=3)
