"""Reading diffusers: a scheduler's chain (`VPSDE.from_diffusers`) against diffusers' own
alphas_cumprod, and a saved DDPMPipeline (`load_diffusers`, `load_model`, `scoresde sample`)
sampled by our DDIM against diffusers' DDIMScheduler loop on the same network."""
import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import scoresde as sd
from scoresde import cli
from scoresde.diffusers_io import load_diffusers
from scoresde.files import CheckpointError

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

F64 = torch.float64
# scoresde reads a diffusers UNet's sizes from its config: diffusers' FutureWarning for reading them
# off the module itself must not appear.
pytestmark = pytest.mark.filterwarnings("error:Accessing config attribute:FutureWarning")

SCHEDULES = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"beta_schedule": "linear"},  # trained_betas (added below) take precedence
}


class _Float64Torch(types.ModuleType):
    """torch, with torch.float32 reading float64: diffusers' scheduler module computes its tables
    with this in place of torch, so its own formulas run in float64."""

    def __getattr__(self, name):
        return F64 if name == "float32" else getattr(torch, name)


def _schedulers(monkeypatch, N, kind):
    """The same DDPMScheduler twice: as diffusers builds it (float32 tables) and with diffusers'
    own code run in float64."""
    kwargs = dict(num_train_timesteps=N, **SCHEDULES[kind])
    if kind == "trained_betas":
        kwargs["trained_betas"] = np.random.default_rng(0).uniform(1e-4, 0.05, N).tolist()
    plain = diffusers.DDPMScheduler(**kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(scheduling_ddpm, "torch", _Float64Torch("torch"))
        exact = diffusers.DDPMScheduler(**kwargs)
    assert plain.alphas_cumprod.dtype == torch.float32 and exact.alphas_cumprod.dtype == F64
    return plain, exact


def _alpha_bar(sde, N):
    """alpha(n/N)^2 for n = 1..N: diffusers' alphas_cumprod[n - 1]."""
    return sde.alpha(torch.arange(1, N + 1, dtype=F64) / N) ** 2


@pytest.mark.parametrize("N", [10, 1000])
@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_from_diffusers_reproduces_alphas_cumprod(monkeypatch, tmp_path, N, kind):
    plain, exact = _schedulers(monkeypatch, N, kind)
    plain.save_config(tmp_path)
    parsed = json.loads((tmp_path / "scheduler_config.json").read_text())
    sources = {"scheduler": plain, "config": dict(plain.config), "frozen config": plain.config,
               "scheduler_config.json": parsed}
    for name, source in sources.items():
        sde = sd.VPSDE.from_diffusers(source)
        assert sde.num_steps == N, name
        got = _alpha_bar(sde, N)
        # diffusers' formulas evaluated in float64: the same chain to round-off.
        torch.testing.assert_close(got, exact.alphas_cumprod, rtol=0, atol=1e-12, msg=name)
        # diffusers' float32 tables: the same to float32 round-off (over a cumulative product).
        torch.testing.assert_close(got, plain.alphas_cumprod.to(F64), rtol=1e-5, atol=1e-6, msg=name)
    if kind == "squaredcos_cap_v2" and N == 10:
        assert sd.VPSDE.from_diffusers(plain).schedule.betas[-1].item() == 0.999  # capped, as diffusers caps it


def test_from_diffusers_reads_any_scheduler():
    """Anything with a .config mapping: a DDIMScheduler's chain is its DDPM twin's."""
    ddim = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear")
    assert torch.equal(sd.VPSDE.from_diffusers(ddim).schedule.betas, sd.VPSDE.from_diffusers(ddpm).schedule.betas)


LINEAR = {"num_train_timesteps": 3, "beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.2}


@pytest.mark.parametrize("config, error, fragments", [
    (42, TypeError, ["scheduler_or_config=42", "a .config mapping"]),
    (types.SimpleNamespace(config=None), TypeError, ["scheduler_or_config=", "a .config mapping"]),
    ({}, ValueError, ["'num_train_timesteps'"]),
    ({**LINEAR, "num_train_timesteps": 3.0}, TypeError, ["num_train_timesteps=3.0", "an int"]),
    ({**LINEAR, "num_train_timesteps": 0}, ValueError, ["num_train_timesteps=0"]),
    ({"num_train_timesteps": 3}, ValueError, ["'beta_schedule'", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"]),
    ({**LINEAR, "beta_schedule": "sigmoid"}, ValueError,
     ["beta_schedule='sigmoid'", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"]),
    ({**LINEAR, "beta_schedule": 1}, TypeError, ["beta_schedule=1"]),
    ({k: v for k, v in LINEAR.items() if k != "beta_end"}, ValueError, ["'beta_end'"]),
    ({**LINEAR, "beta_start": "0.1"}, TypeError, ["beta_start='0.1'"]),
    ({**LINEAR, "beta_end": 1.5}, ValueError, ["beta_end=1.5", "(0, 1)"]),
    ({**LINEAR, "beta_start": 0.0}, ValueError, ["beta_start=0.0"]),
    ({**LINEAR, "trained_betas": "abc"}, TypeError, ["trained_betas='abc'"]),
    ({**LINEAR, "trained_betas": [0.1, "x", 0.2]}, TypeError, ["trained_betas="]),
    ({**LINEAR, "trained_betas": [0.1, 0.2]}, ValueError, ["trained_betas", "3 numbers", "shape (2,)"]),
    ({**LINEAR, "trained_betas": [0.1, 0.0, 0.2]}, ValueError, ["trained_betas[1]=0.0"]),
    ({**LINEAR, "trained_betas": [0.1, float("nan"), 0.2]}, ValueError, ["trained_betas[1]=nan"]),
    ({**LINEAR, "rescale_betas_zero_snr": True}, ValueError, ["rescale_betas_zero_snr=True"]),
])
def test_bad_scheduler_configs_are_refused(config, error, fragments):
    with pytest.raises(error) as info:
        sd.VPSDE.from_diffusers(config)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ---- a saved DDPMPipeline -------------------------------------------------------------------------------
N_TRAIN = 1000


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """One seeded random UNet saved as a DDPMPipeline with each prediction type."""
    root = tmp_path_factory.mktemp("pipelines")
    unet = _unet()
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN, prediction_type=kind)
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / kind, safe_serialization=True)
    return root


def _copy(pipelines, tmp_path, kind="epsilon"):
    return shutil.copytree(pipelines / kind, tmp_path / "pipe")


@pytest.mark.parametrize("final_denoise", [True, False])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers_ddim_loop(pipelines, kind, final_denoise):
    """diffusers' DDIM (eta 0, "leading" timesteps 900, 800, ..., 0) calls the UNet at timestep n,
    our chain's time (n + 1)/N: our DDIM on the grid of those times makes the same steps. Its last
    step goes to alpha_bar = 1 (set_alpha_to_one): x0_hat at the last time, our final denoising;
    or to alphas_cumprod[0], the last time itself, where we stop without one. diffusers' float32
    table is replaced by the chain's float64 one (as tests/test_unipc_edm.py does), so that only
    the float32 arithmetic of the samples differs."""
    model = load_diffusers(pipelines / kind)
    assert model.denoiser.prediction == {"epsilon": "eps", "v_prediction": "v"}[kind]
    sched = diffusers.DDIMScheduler.from_config(model.config["diffusers"]["scheduler"], clip_sample=False,
                                                set_alpha_to_one=final_denoise)
    sched.alphas_cumprod = _alpha_bar(model.sde, N_TRAIN)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if final_denoise else sched.alphas_cumprod[0]
    sched.set_timesteps(10)
    timesteps = [int(n) for n in sched.timesteps]
    assert timesteps[0] == 900 and timesteps[-1] == 0
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    with torch.no_grad():
        for n in sched.timesteps:
            x = sched.step(model.denoiser.net(x, n).sample, n, x, eta=0.0).prev_sample
    grid = torch.tensor([(n + 1) / N_TRAIN for n in timesteps], dtype=F64)
    ours, info = sd.sample(model.denoiser, model.sde, x_T=x_T, solver="ddim", eta=0.0, grid=grid,
                           final_denoise=final_denoise, return_info=True)
    assert info.nfe == len(timesteps) - (not final_denoise)
    assert ours.dtype == x.dtype == torch.float32
    scale = x.abs().max().item()
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * scale)  # float32 round-off over 10 steps
    assert (x - x_T).abs().max() > 0.1 * scale  # the samples moved


def test_load_diffusers_gives_a_pretrained(pipelines, tmp_path):
    folder = _copy(pipelines, tmp_path)
    model = load_diffusers(folder)
    assert model.sample_shape == (3, 8, 8) and model.path == folder
    assert model.sde.num_steps == N_TRAIN and model.denoiser.time_input == "index"
    # The network is the saved one: the index time is diffusers' timestep.
    unet = _unet().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = unet(x, torch.tensor([499, 9])).sample
        got = model.denoiser.net(x, torch.tensor([499, 9])).sample
        assert torch.equal(got, want)
        torch.testing.assert_close(model.denoiser.eps(x, torch.tensor([0.5, 0.01], dtype=F64)), want)
    # Data units: [-1, 1] -> [0, 1] as DDPMPipeline shows images, clipped unless asked not to.
    x = torch.tensor([-1.0, 0.0, 1.0, 1.5]).repeat(1, 3, 8, 2)
    assert model.to_data_units(x)[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.0] * 2
    assert model.to_data_units(x, clip=False)[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.25] * 2
    # Its identity: the folder's name and a digest of the weights, the same through load_model.
    again = sd.load_model(folder)
    assert again.identity() == model.identity() and model.identity().startswith("pipe sha256:")
    assert model.tuned_grids() == []
    # sample_size may be a pair (height, width).
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": [8, 16]}))
    wide = load_diffusers(folder)
    assert wide.sample_shape == (3, 8, 16)
    assert sd.sample(wide.denoiser, wide.sde, shape=(1, 3, 8, 16), solver="ddim", steps=2).shape == (1, 3, 8, 16)


def test_sample_prediction_type(pipelines):
    model = load_diffusers(pipelines / "sample")
    assert model.denoiser.prediction == "x0"
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser.x0(x, 0.5), model.denoiser.net(x, 499).sample)


def test_cli_samples_a_pipeline_folder(pipelines, tmp_path, capsys):
    folder = _copy(pipelines, tmp_path)
    out = tmp_path / "x.npy"
    code = cli.main(["sample", "--model", str(folder), "--solver", "ddim", "--steps", "5", "--n", "2",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    x = np.load(out)
    assert x.shape == (2, 3, 8, 8) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_pickled_weights_are_refused(pipelines, tmp_path):
    folder = _copy(pipelines, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(_unet().state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    for load in (load_diffusers, sd.load_model):
        with pytest.raises(CheckpointError, match=r"pickled weights \(diffusion_pytorch_model.bin\).*only "
                                                  r"safetensors.*arbitrary code"):
            load(folder)


def test_a_folder_that_is_not_a_pipeline_is_refused(pipelines, tmp_path):
    folder = _copy(pipelines, tmp_path)
    shutil.rmtree(folder / "scheduler")
    expected = "unet/ with config.json and diffusion_pytorch_model.safetensors, and scheduler/ with " \
               "scheduler_config.json"
    for load in (load_diffusers, sd.load_model):  # load_model: model_index.json marks a pipeline
        with pytest.raises(CheckpointError) as info:
            load(folder)
        assert "no scheduler/scheduler_config.json" in str(info.value) and expected in str(info.value)
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="no unet/config.json"):
        load_diffusers(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_diffusers(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="folder=3"):
        load_diffusers(3)


@pytest.mark.parametrize("file, edit, fragments", [
    ("scheduler/scheduler_config.json", {"prediction_type": "flow"},
     ["prediction_type='flow'", "'epsilon', 'sample', 'v_prediction'"]),
    ("scheduler/scheduler_config.json", {"beta_schedule": "laplace"},
     ["beta_schedule='laplace'", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"]),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": None}, ["num_train_timesteps=None"]),
    ("unet/config.json", {"_class_name": "UNet2DConditionModel"}, ["_class_name='UNet2DConditionModel'"]),
    ("unet/config.json", {"out_channels": 6}, ["out_channels=6", "variance"]),
    ("unet/config.json", {"sample_size": "8"}, ["sample_size='8'"]),
    ("unet/config.json", {"block_out_channels": [16, 32]}, ["do not fit", "conv_in.weight"]),
])
def test_bad_pipeline_configs_are_refused_naming_file_and_field(pipelines, tmp_path, file, edit, fragments):
    folder = _copy(pipelines, tmp_path)
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CheckpointError) as info:
        load_diffusers(folder)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_diffusers_is_needed_only_to_build_the_unet(pipelines, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    config = json.loads((pipelines / "epsilon" / "scheduler" / "scheduler_config.json").read_text())
    assert sd.VPSDE.from_diffusers(config).num_steps == N_TRAIN
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_diffusers(pipelines / "epsilon")


def test_importing_scoresde_does_not_import_diffusers():
    code = ("import sys, scoresde, scoresde.diffusers_io; "
            "scoresde.VPSDE.from_diffusers({'num_train_timesteps': 10, 'beta_schedule': 'squaredcos_cap_v2'}); "
            "assert 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_learned_variance_pipeline_samples_as_diffusers_ddpm(tmp_path):
    """iDDPM's learned range: a UNet with twice the channels and a scheduler with variance_type
    'learned_range' loads as a Denoiser with variance='learned_range', and our ancestral sampling with
    variance='learned' on the full 10-step chain makes diffusers' DDPMScheduler steps, noise for noise."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=6, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=10, variance_type="learned_range", clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    model = load_diffusers(tmp_path / "pipe")
    assert model.denoiser.variance == "learned_range"
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sd.sample(model.denoiser, model.sde, x_T=x_T, solver="ancestral", variance="learned",
                     grid=torch.arange(10, 0, -1, dtype=torch.float64) / 10, generator=torch.Generator().manual_seed(2))
    scheduler.set_timesteps(10)
    x, generator = x_T.clone(), torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    # the same network taken as a plain eps-model: its doubled output is refused at the first call
    with pytest.raises(ValueError, match=r"model output has shape \(2, 6, 8, 8\), expected the input's \(2, 3, 8, 8\)"):
        sd.sample(sd.Denoiser(unet, model.sde, time_input="index"), model.sde, x_T=x_T, solver="ancestral", steps=3)
