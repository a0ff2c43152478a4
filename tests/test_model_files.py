"""Model files that load_model and `scoresde sample --model` accept: verified or refused.

A checkpoint folder is verified against its manifest, and one without a manifest is refused
rather than taken for an exported model; an exported model is verified against the digest its
config.json records, and refused without one. A hand-edited config.json is checked field by field
and against the weights' shapes before the network takes any memory. Samples in data units stay
in an image set's range unless asked for the raw affine values.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import scoresde as sd
from scoresde import cli
from scoresde.nn import build_network
from scoresde.pretrained import DEFAULT_MODEL, Pretrained, export_model
from scoresde.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TOY_UNITS = {"scale": 0.5, "shift": [0.5, 0.25]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small MLP checkpoint (as a training run leaves it) and its export."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    net = build_network({"architecture": "MLP", "dim": 2, "hidden": 32, "layers": 2})
    config = {"architecture": net.config, "prediction": "eps",
              "schedule": {"schedule": "linear", "beta_min": 0.1, "beta_max": 20.0},
              "data": {"name": "moons", "sample_shape": [2], "num_classes": None, "data_range": [-1.5, 2.5],
                       "units": TOY_UNITS}}
    ema = {k: v + 0.01 for k, v in net.state_dict().items()}
    step = save_checkpoint(root / "run", 3, model_state=net.state_dict(), ema_state=ema, config=config,
                           state={"step": 3})
    (root / "run" / "log.jsonl").write_text('{"step": 3}\n')
    export_model(step, root / "exported")
    return root


def _copy(saved, tmp_path, which):
    shutil.copytree(saved / which, tmp_path / which)
    return tmp_path / which


def _flip(path):
    """Flip one bit in the last tensor's data (past the header: the file still parses)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _edit(path, edit):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _cli_sample(model, tmp_path, capsys, out="x.png"):
    """`scoresde sample --model MODEL`: its exit code and what it printed to stderr."""
    capsys.readouterr()
    code = cli.main(["sample", "--model", str(model), "--n", "2", "--steps", "2", "--out", str(tmp_path / out)])
    return code, capsys.readouterr().err.strip().splitlines()


# ---- a checkpoint folder without its manifest ------------------------------------------------------------
@pytest.mark.parametrize("damage", ["bit flipped", "intact", "state.pt deleted too"])
def test_a_checkpoint_folder_without_its_manifest_is_refused(saved, tmp_path, capsys, damage):
    """Deleting manifest.json does not turn a checkpoint into an exported model that loads
    unverified, flipped bit or not."""
    run = _copy(saved, tmp_path, "run")
    folder = run / "step_00000003"
    load_checkpoint(folder)  # as saved, it loads
    (folder / "manifest.json").unlink()
    if damage == "bit flipped":
        _flip(folder / "model.safetensors")
    if damage == "state.pt deleted too":
        (folder / "state.pt").unlink()
    for path in (folder, folder / "model.safetensors"):
        with pytest.raises(CheckpointError, match="manifest.json is missing") as info:
            sd.load_model(path)
        assert str(info.value).startswith(f"{folder}: ")
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(folder / "model.safetensors")
    code, lines = _cli_sample(folder, tmp_path, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert str(folder) in lines[0] and "manifest.json" in lines[0]


def test_weights_inside_a_checkpoint_are_verified_by_its_manifest(saved, tmp_path):
    """Naming one weights file of a checkpoint verifies it against the manifest; a file the
    manifest does not list is not part of the checkpoint and is refused."""
    folder = _copy(saved, tmp_path, "run") / "step_00000003"
    assert load_checkpoint(folder / "ema.safetensors").step == 3
    shutil.copy(folder / "ema.safetensors", folder / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra.safetensors not in its manifest.json"):
        load_checkpoint(folder / "extra.safetensors")
    _flip(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: SHA-256 .* manifest's .*corrupted"):
        sd.load_model(folder / "model.safetensors")


def test_an_exported_model_next_to_a_run_is_refused(saved, tmp_path):
    """Weights and config at the top of a run folder (a run's log and `latest` beside them) are a
    checkpoint's files moved around, not an exported model."""
    run = _copy(saved, tmp_path, "run")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(run / "step_00000003" / name, run / name)
    with pytest.raises(CheckpointError, match=r"manifest.json is missing.*log.jsonl, latest, step_00000003"):
        sd.load_model(run / "model.safetensors")


# ---- exported models carry a digest --------------------------------------------------------------------
def test_an_exported_model_records_its_digest_loads_and_samples(saved, tmp_path, capsys):
    exported = _copy(saved, tmp_path, "exported")
    data = (exported / "model.safetensors").read_bytes()
    config = json.loads((exported / "config.json").read_text())
    assert config["weights"] == {"file": "model.safetensors", "size": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    ema = load_checkpoint(saved / "run").ema_state
    for path in (exported, exported / "model.safetensors"):
        model = sd.load_model(path)
        for name, value in model.denoiser.net.state_dict().items():
            assert torch.equal(value, ema[name]), name
    x = sd.sample(model.denoiser, model.sde, shape=(4, 2), solver="ddim", steps=2,
                  generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 2) and torch.isfinite(x).all()
    assert _cli_sample(exported, tmp_path, capsys, out="x.npy")[0] == 0
    again = export_model(exported, tmp_path / "again")  # an exported model exports again, verified
    assert (again / "model.safetensors").read_bytes() == data


@pytest.mark.parametrize("damage, match", [
    (_flip, r"SHA-256 \w+\.\.\. does not match \S*config.json's \w+\.\.\.: the file is corrupted"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"bytes, but \d+ were written: the file is truncated"),
])
def test_a_damaged_exported_model_is_refused(saved, tmp_path, capsys, damage, match):
    exported = _copy(saved, tmp_path, "exported")
    damage(exported / "model.safetensors")
    for path in (exported, exported / "model.safetensors"):
        with pytest.raises(CheckpointError, match=match) as info:
            sd.load_model(path)
        assert str(info.value).startswith(f"{exported / 'model.safetensors'}: ")
    code, lines = _cli_sample(exported, tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and str(exported / "model.safetensors") in lines[0], lines


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("weights"), r'no "weights" digest.*scoresde export CHECKPOINT OUT.*"sha256"'),
    (lambda c: c["weights"].update(sha256="ABC"), r'weights=.*expected .*64 lowercase hex digits'),
    (lambda c: c["weights"].pop("size"), r'weights=.*"size": bytes'),
    (lambda c: c["weights"].update(file="other.safetensors"), r"weights.file='other.safetensors': the digest is"),
])
def test_an_exported_model_without_a_valid_digest_is_refused_with_the_fix(saved, tmp_path, capsys, edit, match):
    exported = _copy(saved, tmp_path, "exported")
    _edit(exported / "config.json", edit)
    with pytest.raises(CheckpointError, match=match) as info:
        sd.load_model(exported)
    assert str(info.value).startswith(f"{exported / 'config.json'}: ")
    code, lines = _cli_sample(exported, tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and str(exported / "config.json") in lines[0], lines


def test_the_shipped_model_carries_the_digest_of_its_weights(tmp_path):
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    data = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    assert config["weights"] == {"file": "model.safetensors", "size": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    assert sd.load_model().sample_shape == (1, 8, 8)
    shipped = tmp_path / "digits"
    shutil.copytree(DEFAULT_MODEL, shipped)
    _flip(shipped / "model.safetensors")
    with pytest.raises(CheckpointError, match="corrupted"):
        sd.load_model(shipped)


# ---- hand-edited configs --------------------------------------------------------------------------------
def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(config):
        for key in keys[:-1]:
            config = config[key]
        config[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, field", [
    (_set("data", "units", "scale", [1, 2, 3]), r"data.units.scale=\[1, 2, 3\]: expected .* list of 1 "),
    (lambda c: c["data"]["units"].pop("scale"), r"data.units.scale=\(missing\)"),
    (_set("data", "units", "scale", 0), r"data.units.scale=0: expected a finite nonzero number"),
    (_set("data", "units", "shift", float("nan")), r"data.units.shift=nan"),
    (_set("data", "units", "shift", "8"), r"data.units.shift='8'"),
    (lambda c: c["data"].pop("units"), r"data.units=\(missing\)"),
    (_set("data", "sample_shape", [1, 0, 8]), r"data.sample_shape=\[1, 0, 8\]: expected a non-empty list"),
    (_set("data", "sample_shape", [1, 16, 16]), r"data.sample_shape=\[1, 16, 16\]: expected \[1, 8, 8\]"),
    (_set("data", "data_range", [16.0, 0.0]), r"data.data_range=\[16.0, 0.0\]: expected two finite numbers"),
    (_set("prediction", "velocity"), r"config.json: prediction='velocity': expected one of"),
    (_set("architecture", "base_channels", 64), r"architecture.base_channels=64, but the weights were made "
                                                r"with 32 .*size mismatch for"),
    (_set("architecture", "num_res_blocks", 2), r"missing from the weights: down.1.res"),
])
def test_a_hand_edited_config_is_refused_naming_the_file_and_field(tmp_path, capsys, edit, field):
    shipped = tmp_path / "digits"
    shutil.copytree(DEFAULT_MODEL, shipped)
    _edit(shipped / "config.json", edit)
    with pytest.raises(CheckpointError, match=field) as info:
        sd.load_model(shipped)
    assert str(shipped / "config.json") in str(info.value)
    code, lines = _cli_sample(shipped, tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and str(shipped / "config.json") in lines[0], lines


_LOAD_UNDER_A_MEMORY_LIMIT = textwrap.dedent("""
    import json, re, resource, sys
    import scoresde as sd
    from scoresde.checkpoint import CheckpointError

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    # A real allocation of the edited network would need tens of GB: with the address space
    # capped at 1 GiB above the current one it fails at once instead of swamping the machine.
    size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = []
    for path in sys.argv[1:]:
        before = peak_kib()
        try:
            sd.load_model(path)
            outcome = ("loaded", "")
        except Exception as e:
            outcome = (type(e).__name__, str(e))
        results.append([*outcome, (peak_kib() - before) / 1024])
    print(json.dumps(results))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_a_huge_size_in_the_config_is_refused_before_any_memory_is_spent(saved, tmp_path):
    """hidden=200000 (an MLP of 960 GB) and base_channels=32000 (a UNet of 4.4 TB): refused
    naming the field, with the peak memory of the loading process grown by under 200 MB."""
    exported = _copy(saved, tmp_path, "exported")
    _edit(exported / "config.json", _set("architecture", "hidden", 200000))
    shipped = tmp_path / "digits"
    shutil.copytree(DEFAULT_MODEL, shipped)
    _edit(shipped / "config.json", _set("architecture", "base_channels", 32000))
    run = subprocess.run([sys.executable, "-c", _LOAD_UNDER_A_MEMORY_LIMIT, str(exported), str(shipped)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for (kind, message, grown_mb), folder, field in zip(
            json.loads(run.stdout), (exported, shipped), ("hidden=200000", "base_channels=32000"), strict=True):
        assert kind == "CheckpointError", message
        assert f"architecture.{field}, but the weights were made with" in message
        assert str(folder / "config.json") in message
        assert grown_mb < 200, grown_mb


# ---- data units ----------------------------------------------------------------------------------------
def test_image_samples_in_data_units_are_clipped_to_the_data_range_unless_raw():
    model = sd.load_model()
    x = torch.linspace(-3.0, 3.0, 128).reshape(2, 1, 8, 8)  # model units; [-1, 1] is the data's range
    raw = x * 8.0 + 8.0
    assert raw.min() < -8 and raw.max() > 24  # the premise: the raw map leaves 0..16
    assert torch.equal(model.to_data_units(x, clip=False), raw)
    clipped = model.to_data_units(x)
    assert torch.equal(clipped, raw.clamp(0.0, 16.0))
    assert clipped.min() == 0.0 and clipped.max() == 16.0


def test_toy_samples_are_never_clipped(saved):
    """A toy set's data_range is only the range its training points covered."""
    model = sd.load_model(saved / "exported")
    x = torch.tensor([[-20.0, 30.0], [0.0, 0.0]])
    raw = x * 0.5 + torch.tensor([0.5, 0.25])
    assert raw[0, 0] < -1.5 and raw[0, 1] > 2.5  # outside the recorded data_range
    assert torch.equal(model.to_data_units(x), raw) and torch.equal(model.to_data_units(x, clip=False), raw)


def test_per_channel_units_apply_to_the_channel_axis():
    config = {"data": {"sample_shape": [3, 2, 2], "data_range": [0.0, 255.0],
                       "units": {"scale": [1.0, 2.0, 3.0], "shift": [100.0, 110.0, 120.0]}}}
    model = Pretrained(None, None, (3, 2, 2), config, DEFAULT_MODEL)
    x = torch.ones(5, 3, 2, 2)
    expected = torch.tensor([101.0, 112.0, 123.0]).reshape(1, 3, 1, 1).expand(5, 3, 2, 2)
    assert torch.equal(model.to_data_units(x), expected)
    assert model.to_data_units(100 * x)[:, 2].eq(255.0).all()  # 420 clipped to the range
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 3, 2, 2\)"):
        model.to_data_units(torch.ones(5, 2, 2, 3))
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        model.to_data_units(torch.ones(5, 3, 2, 2, dtype=torch.int64))


def test_exporting_a_model_into_its_own_folder_is_refused(tmp_path):
    """It would rewrite the model it reads: `scoresde export scoresde/assets/digits scoresde/assets/digits`
    once rewrote the shipped config (a random command line of the fuzz tests can draw it)."""
    shipped = tmp_path / "digits"
    shutil.copytree(DEFAULT_MODEL, shipped)
    before = {p.relative_to(shipped): p.read_bytes() for p in shipped.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"is the folder of the model being exported"):
        export_model(shipped, shipped)
    assert {p.relative_to(shipped): p.read_bytes() for p in shipped.rglob("*") if p.is_file()} == before


def test_python_dash_m_scoresde_is_the_scoresde_command():
    done = subprocess.run([sys.executable, "-m", "scoresde", "presets"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "networks (model=...)" in done.stdout, done.stderr
