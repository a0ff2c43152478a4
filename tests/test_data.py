"""Training data: every source read into model units and back, clear errors for bad input, a
restricted unpickler that runs no code, and a batch stream that shards, reshuffles and resumes."""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch

import scoresde as sd
from scoresde.train import data as D

PIL = pytest.importorskip("PIL")
from PIL import Image

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _check_image_range(data):
    """data_range is in the data's own units: where to_data_units sends the model's -1 and 1."""
    ends = data.to_data_units(torch.tensor([-1.0, 1.0]))
    assert tuple(ends.tolist()) == data.data_range


# ---- named sets -----------------------------------------------------------------------------


def test_digits_shapes_labels_and_exact_inverse():
    data = D.load_data("digits")
    bunch = sklearn_datasets.load_digits()
    assert data.x.shape == (1797, 1, 8, 8) and data.x.dtype == torch.float32
    assert len(data) == 1797 and data.sample_shape == (1, 8, 8)
    assert data.x.min() == -1 and data.x.max() == 1 and data.data_range == (0.0, 16.0)
    _check_image_range(data)
    assert data.num_classes == 10 and data.y.dtype == torch.int64
    assert torch.equal(data.y, torch.as_tensor(bunch.target))
    back = data.to_data_units(data.x).squeeze(1).double()
    assert torch.equal(back, torch.as_tensor(bunch.images))  # exactly the integers 0..16


def test_subset_of_a_finite_set():
    full = D.load_data("digits")
    part = D.load_data("digits", n=100, seed=3)
    assert part.x.shape == (100, 1, 8, 8)
    # every kept row is a row of the full set, with its label, and no row comes twice
    flat_full, flat_part = full.x.flatten(1), part.x.flatten(1)
    match = (flat_part[:, None, :] == flat_full[None]).all(-1)  # (100, 1797)
    rows = match.float().argmax(1)
    assert match.any(1).all() and torch.equal(part.y, full.y[rows]) and len(set(rows.tolist())) == 100
    assert not torch.equal(part.x, D.load_data("digits", n=100, seed=4).x)
    assert torch.equal(part.x, D.load_data("digits", n=100, seed=3).x)


@pytest.mark.parametrize("name", ["moons", "swissroll"])
def test_toy_sets_standardised_and_inverted(name):
    data = D.load_data(name, n=2000, seed=1)
    if name == "moons":
        raw, labels = sklearn_datasets.make_moons(n_samples=2000, noise=0.05, random_state=1)
    else:
        raw3, _ = sklearn_datasets.make_swiss_roll(n_samples=2000, noise=0.3, random_state=1)
        raw, labels = raw3[:, [0, 2]], None
    assert data.x.shape == (2000, 2) and data.x.dtype == torch.float32
    assert data.x.mean(0).abs().max() < 1e-5
    assert abs(data.x.double().pow(2).mean().sqrt().item() - 1.0) < 1e-5  # one scalar scale
    # the aspect ratio of the raw shape is kept (one scale for both coordinates)
    ratio = data.x.std(0)[0] / data.x.std(0)[1]
    assert abs(ratio.item() - raw[:, 0].std() / raw[:, 1].std()) < 1e-3
    assert torch.allclose(data.to_data_units(data.x).double(), torch.as_tensor(raw), atol=1e-4)
    if labels is None:
        assert data.y is None and data.num_classes is None
    else:
        assert torch.equal(data.y, torch.as_tensor(labels)) and data.num_classes == 2
    assert data.data_range == (raw.min(), raw.max())  # in the data's own units


def test_toy_default_size_and_seed():
    a, b = D.load_data("moons"), D.load_data("moons", seed=1)
    assert len(a) == 10_000 and not torch.equal(a.x, b.x)
    assert torch.equal(a.x, D.load_data("moons").x)


def test_mixture_is_the_librarys_ring():
    data = D.load_data("mixture", n=3000, seed=5)
    mix = sd.GaussianMixture.ring2d(sd.VPSDE.linear())
    expected = mix.sample(3000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(data.x, expected)
    assert data.num_classes == 6 and data.y.shape == (3000,)
    # labels are the components that drew the points: the nearest mode, for these sharp modes
    nearest = mix.responsibilities(data.x).argmax(1)
    assert (nearest == data.y).float().mean() > 0.999
    freq = torch.bincount(data.y, minlength=6).double() / 3000
    assert (freq - mix.weights).abs().max() < 0.04
    assert torch.equal(data.to_data_units(data.x), data.x)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown data set") as err:
        D.load_data("mnist")
    for name in D.DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs, error", [({"n": 0}, ValueError), ({"n": 2.5}, TypeError),
                                            ({"n": 5000}, ValueError), ({"seed": "a"}, TypeError)])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        D.load_data("digits", **kwargs)


def test_source_of_wrong_type():
    with pytest.raises(TypeError, match="source"):
        D.load_data(3)


# ---- image folders --------------------------------------------------------------------------


def _write_images(folder, arrays, mode=None, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(arrays):
        Image.fromarray(arr, mode=mode).save(folder / f"img{i:02d}{suffix}")
    return folder


def test_rgb_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)  # height 4, width 6
    folder = _write_images(tmp_path / "rgb", pixels)
    (folder / "notes.txt").write_text("not an image")
    data = D.load_data(str(folder))
    assert data.x.shape == (5, 3, 4, 6) and data.x.dtype == torch.float32
    assert data.y is None and data.num_classes is None and data.data_range == (0.0, 255.0)
    _check_image_range(data)
    assert data.x.min() >= -1 and data.x.max() <= 1
    back = data.to_data_units(data.x).round().to(torch.uint8)
    assert torch.equal(back, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert torch.equal(D.load_data(folder).x, data.x)  # a Path works as well


def test_grayscale_and_jpeg_folders(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, size=(3, 5, 5), dtype=np.uint8)
    data = D.load_data(str(_write_images(tmp_path / "gray", gray)))
    assert data.x.shape == (3, 1, 5, 5)
    assert torch.equal(data.to_data_units(data.x).round().to(torch.uint8)[:, 0], torch.from_numpy(gray))
    flat = np.full((2, 8, 8, 3), 200, dtype=np.uint8)
    jpeg = D.load_data(str(_write_images(tmp_path / "jpg", flat, suffix=".JPG")))
    assert jpeg.x.shape == (2, 3, 8, 8)
    assert (jpeg.to_data_units(jpeg.x) - 200).abs().max() < 4  # lossy, but close


def test_mixed_sizes_name_two_files(tmp_path):
    folder = _write_images(tmp_path / "mixed", [np.zeros((4, 4, 3), np.uint8)] * 2)
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(folder / "odd.png")
    with pytest.raises(ValueError, match="different sizes") as err:
        D.load_data(str(folder))
    assert "img00.png" in str(err.value) and "odd.png" in str(err.value)


def test_mixed_colour_modes(tmp_path):
    folder = _write_images(tmp_path / "modes", [np.zeros((4, 4, 3), np.uint8)])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "gray.png")
    with pytest.raises(ValueError, match="colour modes") as err:
        D.load_data(str(folder))
    assert "gray.png" in str(err.value)


def test_alpha_channel_refused(tmp_path):
    folder = _write_images(tmp_path / "alpha", [np.zeros((4, 4, 4), np.uint8)])
    with pytest.raises(ValueError, match="alpha") as err:
        D.load_data(str(folder))
    assert "img00.png" in str(err.value)


@pytest.mark.parametrize("content", [b"this is not a png", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_corrupt_image(tmp_path, content):
    folder = _write_images(tmp_path / "bad", [np.zeros((4, 4, 3), np.uint8)])
    (folder / "broken.png").write_bytes(content)
    with pytest.raises(ValueError, match="broken.png"):
        D.load_data(str(folder))


def test_truncated_image(tmp_path):
    folder = _write_images(tmp_path / "trunc", [np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)])
    whole = (folder / "img00.png").read_bytes()
    (folder / "img00.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="img00.png"):
        D.load_data(str(folder))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no PNG/JPEG"):
        D.load_data(str(tmp_path / "empty"))


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "images"
    for error in (FileNotFoundError, ValueError):
        with pytest.raises(error, match=re.escape(str(missing))):
            D.load_data(str(missing))


def test_unsupported_file(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"\.csv"):
        D.load_data(str(tmp_path / "x.csv"))


# ---- CIFAR-10 -------------------------------------------------------------------------------


def _cifar_batch(count, offset, rng):
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=count)]
    return {b"batch_label": b"training batch", b"labels": labels, b"data": data,
            b"filenames": [b"f%d.png" % (offset + i) for i in range(count)]}


def _write_cifar(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [_cifar_batch(3, 0, rng), _cifar_batch(4, 3, rng)]
    for k, (batch, protocol) in enumerate(zip(batches, (2, 5)), start=1):  # old and new pickles
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(2, 7, rng), protocol=2))
    (folder / "readme.html").write_text("<html></html>")
    return folder, batches


def test_cifar_batches(tmp_path):
    folder, batches = _write_cifar(tmp_path, np.random.default_rng(0))
    data = D.load_data(str(folder))
    assert data.x.shape == (7, 3, 32, 32) and data.num_classes == 10 and data.data_range == (0.0, 255.0)
    assert torch.equal(data.y, torch.tensor(batches[0][b"labels"] + batches[1][b"labels"]))
    pixels = data.to_data_units(data.x).round().to(torch.uint8)
    # CIFAR rows hold the red plane, then green, then blue, each 32 x 32 row-major
    first = torch.from_numpy(batches[0][b"data"][0])
    assert torch.equal(pixels[0, 0], first[:1024].reshape(32, 32))
    assert torch.equal(pixels[0, 2], first[2048:].reshape(32, 32))
    assert torch.equal(pixels[3].flatten(), torch.from_numpy(batches[1][b"data"][0]))
    assert torch.equal(D.load_data(str(tmp_path)).x, data.x)  # the parent folder works too


def _python2_batch(raw: bytes, label: int) -> bytes:
    """A batch written the way Python 2 and numpy 1 wrote CIFAR-10 (str data, numpy.core globals)."""
    literal = "".join("\\x%02x" % b for b in raw)
    array = ("cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR(I1\n(I1\nI3072\ntcnumpy\n"
             "dtype\n(S'u1'\nI0\nI1\ntR(I3\nS'|'\nNNNI-1\nI-1\nI0\ntbI00\nS'" + literal + "'\ntb")
    return ("(dp0\nS'data'\np1\n" + array + f"sS'labels'\np2\n(lp3\nI{label}\nas.").encode()


def test_cifar_python2_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = bytes(range(256)) * 12
    (folder / "data_batch_1").write_bytes(_python2_batch(raw, 3))
    data = D.load_data(str(folder))
    assert data.x.shape == (1, 3, 32, 32) and data.y.tolist() == [3]
    assert torch.equal(data.to_data_units(data.x).round().to(torch.uint8).flatten(),
                       torch.frombuffer(bytearray(raw), dtype=torch.uint8))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_restricted_unpickler_runs_no_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned.txt"
    evil = {b"data": _Payload(marker), b"labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError, match="refusing to load global") as err:
        D.load_data(str(folder))
    assert "system" in str(err.value) and "data_batch_1" in str(err.value)
    assert not marker.exists()
    # the payload is real: an ordinary unpickler would have run the command
    pickle.loads((folder / "data_batch_1").read_bytes())
    assert marker.exists()


def test_restricted_unpickler_refuses_other_globals():
    blob = pickle.dumps({b"data": np.zeros(3), b"f": sorted})
    with pytest.raises(pickle.UnpicklingError, match="builtins.sorted"):
        import io
        D.RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00(U\x04data", b"garbage that is no pickle",
                                     pickle.dumps([1, 2, 3]), pickle.dumps({b"labels": [1]}),
                                     pickle.dumps({b"data": np.zeros((1, 3072), np.float32), b"labels": [1]})])
def test_bad_cifar_batch(tmp_path, content):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_1"):
        D.load_data(str(folder))


# ---- arrays ---------------------------------------------------------------------------------


def test_npy_uint8_images(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(6, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "img.npy", arr)
    data = D.load_data(str(tmp_path / "img.npy"))
    assert data.x.shape == (6, 3, 4, 4) and data.x.min() >= -1 and data.x.max() <= 1
    assert torch.equal(data.to_data_units(data.x).round().to(torch.uint8), torch.from_numpy(arr))
    assert data.y is None and data.data_range == (0.0, 255.0)


def test_npy_float_vectors_kept(tmp_path):
    arr = np.random.default_rng(1).normal(size=(10, 3)) * 5
    np.save(tmp_path / "vec.npy", arr)
    data = D.load_data(str(tmp_path / "vec.npy"))
    assert torch.equal(data.x, torch.from_numpy(arr.astype(np.float32)))
    assert torch.equal(data.to_data_units(data.x), data.x)


def test_npz_with_labels(tmp_path):
    x = np.random.default_rng(2).uniform(-1, 1, size=(8, 1, 3, 3))
    y = np.arange(8) % 4
    np.savez(tmp_path / "set.npz", x=x, y=y)
    data = D.load_data(str(tmp_path / "set.npz"))
    assert data.x.shape == (8, 1, 3, 3) and torch.equal(data.y, torch.from_numpy(y))
    assert data.num_classes == 4 and data.data_range == (-1.0, 1.0)
    _check_image_range(data)


@pytest.mark.parametrize("arr, match", [
    (np.zeros((0, 3, 4, 4), np.uint8), "no samples"),
    (np.full((2, 1, 4, 4), 2.0), r"\[-1, 1\]"),
    (np.zeros((3, 2), np.int32), "int32"),
    (np.array([1.0, np.nan]).reshape(1, 2), "NaN"),
    (np.zeros(5, np.uint8), "shape"),
])
def test_bad_npy(tmp_path, arr, match):
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ValueError, match=match):
        D.load_data(str(tmp_path / "bad.npy"))


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((100, 2), np.float32))
    whole = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="a.npy"):
        D.load_data(str(tmp_path / "a.npy"))


def test_npz_refuses_pickled_objects_and_missing_x(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="obj.npz"):
        D.load_data(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="'x'") as err:
        D.load_data(str(tmp_path / "nox.npz"))
    assert "images" in str(err.value)
    np.savez(tmp_path / "bady.npz", x=np.zeros((3, 2)), y=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="'y'"):
        D.load_data(str(tmp_path / "bady.npz"))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        D.load_data(str(tmp_path / "junk.npz"))


# ---- batches ---------------------------------------------------------------------------------


def _indexed(n, labelled=True):
    """Data whose x holds each item's own index, so batches reveal which items they hold."""
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = (torch.arange(n) * 7) % 3 if labelled else None
    return D.Data(x, y, 3 if labelled else None, "indexed", D.IDENTITY, (0.0, float(n - 1)))


def _take(stream, count):
    return [next(stream) for _ in range(count)]


def _ids(batch):
    return batch[0][:, 0].long().tolist()


def test_ranks_share_each_epoch_disjointly():
    data, world = _indexed(50), 3
    streams = [D.BatchStream(data, 4, seed=9, rank=r, world_size=world) for r in range(world)]
    assert all(s.batches_per_epoch == 4 for s in streams)  # 50 // 3 = 16 each, 4 full batches
    for epoch in range(2):
        shares = [sum((_ids(b) for b in _take(s, 4)), []) for s in streams]
        seen = [i for share in shares for i in share]
        assert all(len(share) == 16 for share in shares)
        assert len(set(seen)) == 48 and set(seen) <= set(range(50))
        assert all(s.epoch == epoch + 1 and s.position == 0 for s in streams)


def test_labels_follow_their_items_and_unlabelled_data():
    data = _indexed(20)
    x, y = next(D.BatchStream(data, 5, seed=0))
    assert torch.equal(y, (x[:, 0].long() * 7) % 3)
    x, y = next(D.BatchStream(_indexed(20, labelled=False), 5, seed=0))
    assert y is None and x.shape == (5, 1)


def test_reshuffled_each_epoch_and_seeded():
    data = _indexed(24)
    stream = D.BatchStream(data, 6, seed=1)
    epochs = [sum((_ids(b) for b in _take(stream, 4)), []) for _ in range(3)]
    assert all(sorted(e) == list(range(24)) for e in epochs)  # each epoch a permutation
    assert epochs[0] != epochs[1] != epochs[2]
    again = D.BatchStream(data, 6, seed=1)
    assert [_ids(b) for b in _take(again, 12)] == [e[i:i + 6] for e in epochs for i in range(0, 24, 6)]
    other = D.BatchStream(data, 6, seed=2)
    assert [_ids(b) for b in _take(other, 4)] != [epochs[0][i:i + 6] for i in range(0, 24, 6)]


def test_drop_last_false_keeps_the_short_batch():
    data = _indexed(23)
    stream = D.BatchStream(data, 5, seed=0, rank=1, world_size=2, drop_last=False)
    assert stream.batches_per_epoch == 3  # share of 11: 5, 5, 1
    sizes = [len(b[0]) for b in _take(stream, 6)]
    assert sizes == [5, 5, 1, 5, 5, 1]
    full = D.BatchStream(data, 5, seed=0, rank=1, world_size=2)
    assert [len(b[0]) for b in _take(full, 3)] == [5, 5, 5]


def test_resume_gives_the_same_batches():
    data = _indexed(30)
    for rank in range(2):
        straight = D.BatchStream(data, 4, seed=7, rank=rank, world_size=2)  # 3 batches per epoch
        _take(straight, 5)
        state = straight.state_dict()
        expected = [_ids(b) for b in _take(straight, 8)]
        resumed = D.BatchStream(data, 4, seed=7, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert [_ids(b) for b in _take(resumed, 8)] == expected


def test_state_mismatch():
    data = _indexed(30)
    stream = D.BatchStream(data, 4, seed=7)
    _take(stream, 2)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seed"):
        D.BatchStream(data, 4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="30 items"):
        D.BatchStream(_indexed(40), 4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        stream.load_state_dict({"epoch": 1})
    moved = D.BatchStream(data, 5, seed=7)
    with pytest.warns(UserWarning, match="epoch 1"):
        moved.load_state_dict(state)
    assert (moved.epoch, moved.position) == (1, 0)


def test_batch_larger_than_a_share():
    data = _indexed(10)
    with pytest.raises(ValueError, match="batch_size=6") as err:
        D.BatchStream(data, 6, seed=0, world_size=2)
    assert "10" in str(err.value) and "world_size=2" in str(err.value)
    D.BatchStream(data, 5, seed=0, world_size=2)  # exactly a share is fine


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": 2.0}, TypeError, "batch_size"),
    ({"rank": 2, "world_size": 2}, ValueError, "rank"), ({"world_size": 0}, ValueError, "world_size"),
    ({"seed": None}, TypeError, "seed"),
])
def test_bad_stream_arguments(kwargs, error, match):
    args = {"batch_size": 2, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        D.BatchStream(_indexed(10), args.pop("batch_size"), **args)


def test_data_checks_and_device_move():
    with pytest.raises(ValueError, match="float32"):
        D.Data(torch.zeros(4, 2, dtype=torch.float64), None, None, "x", D.IDENTITY, (0.0, 0.0))
    with pytest.raises(ValueError, match="int64"):
        D.Data(torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64), 2, "x", D.IDENTITY, (0.0, 0.0))
    moved = _indexed(6).to("cpu")
    assert len(moved) == 6 and moved.sample_shape == (1,)
    assert pickle.loads(pickle.dumps(D.load_data("moons", n=10))).to_data_units is not None


def test_data_units_apply_per_channel_along_a_samples_first_axis():
    """One Affine serves training (batch first) and sampling (any leading axes): a per-channel scale
    acts on the channels of an image and the coordinates of a point, never on an image's last axis."""
    from scoresde.units import Affine

    units = Affine((1.0, 10.0), (0.0, 5.0))
    images = torch.ones(4, 2, 3, 3)
    out = units(images)
    assert torch.equal(out[:, 0], torch.ones(4, 3, 3)) and torch.equal(out[:, 1], torch.full((4, 3, 3), 15.0))
    assert torch.equal(units(images[None], sample_ndim=3), out[None])  # extra leading axes
    assert torch.equal(units(torch.ones(5, 2)), torch.tensor([[1.0, 15.0]] * 5))  # points: their coordinates
