"""Fashion-MNIST from its IDX files: small IDX files written here (gzip and raw) read back exactly,
the ways of naming the folder, and every refusal naming the file. The real data is not needed."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from scoresde import nn as networks
from scoresde.train import data as D
from scoresde.train.config import preset
from scoresde.units import EIGHT_BIT

N = 20
TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(arr: np.ndarray, code: int = 0x08, shape=None) -> bytes:
    """An IDX file's bytes: 00 00 <code> <ndim>, big-endian uint32 sizes, then the values."""
    shape = arr.shape if shape is None else shape
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + arr.tobytes()


def _arrays(seed: int, n: int = N):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, :2] = (0, 255)  # both ends of the range occur
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def _write(folder, names, images, labels, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(names, (images, labels)):
        blob = _idx(arr)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return folder


@pytest.fixture
def no_default(monkeypatch, tmp_path):
    """Neither the environment variable nor the Debian folder: whatever this machine has."""
    monkeypatch.delenv(D.FASHION_ENV, raising=False)
    monkeypatch.setattr(D, "FASHION_SYSTEM_DIR", tmp_path / "no-such-system-dir")


# ---- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_values_labels_and_shape_round_trip_exactly(tmp_path, gz, no_default):
    images, labels = _arrays(0)
    folder = _write(tmp_path / "f", TRAIN, images, labels, gz)
    data = D.load_data(f"fashion:{folder}")
    assert data.x.shape == (N, 1, 28, 28) and data.x.dtype == torch.float32
    assert data.name == "fashion" and data.num_classes == 10 and data.data_range == (0.0, 255.0)
    assert data.to_data_units is EIGHT_BIT
    assert torch.equal(data.x[0, 0, 0, :2], torch.tensor([-1.0, 1.0]))
    back = data.to_data_units(data.x)[:, 0]
    assert torch.equal(back, torch.from_numpy(images).to(torch.float32))  # exact, no rounding needed
    assert torch.equal(data.x, torch.from_numpy(images)[:, None].float() / 127.5 - 1)
    assert data.y.dtype == torch.int64 and torch.equal(data.y, torch.from_numpy(labels).long())


def test_gzip_and_raw_give_the_same_tensor_and_gzip_is_found_by_its_bytes(tmp_path, no_default):
    images, labels = _arrays(1)
    a = D.load_data(f"fashion:{_write(tmp_path / 'gz', TRAIN, images, labels, gz=True)}")
    b = D.load_data(f"fashion:{_write(tmp_path / 'raw', TRAIN, images, labels, gz=False)}")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # gzip bytes under the raw name, raw bytes under the .gz name: the magic bytes decide
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / TRAIN[0]).write_bytes(gzip.compress(_idx(images)))
    (swapped / (TRAIN[1] + ".gz")).write_bytes(_idx(labels))
    c = D.load_data(f"fashion:{swapped}")
    assert torch.equal(c.x, a.x) and torch.equal(c.y, a.y)
    assert np.array_equal(D.read_idx(swapped / TRAIN[0]), images)


def test_splits_and_the_ways_to_name_the_folder(tmp_path, monkeypatch, no_default):
    train, test = _arrays(2), _arrays(3, n=7)
    folder = _write(tmp_path / "fm", TRAIN, *train, gz=True)
    _write(folder, TEST, *test, gz=False)
    expect_train = torch.from_numpy(train[0])[:, None].float() / 127.5 - 1
    expect_test = torch.from_numpy(test[0])[:, None].float() / 127.5 - 1
    held_out = D.load_data(f"fashion-test:{folder}")
    assert held_out.name == "fashion-test" and torch.equal(held_out.x, expect_test)
    assert torch.equal(held_out.y, torch.from_numpy(test[1]).long())
    plain = D.load_data(str(folder))  # a plain folder path: its training split, named by its path
    assert plain.name == str(folder) and torch.equal(plain.x, expect_train)
    assert torch.equal(D.load_data(folder).x, expect_train)
    monkeypatch.setenv(D.FASHION_ENV, str(folder))
    assert torch.equal(D.load_data("fashion").x, expect_train)
    assert D.load_data("fashion-test").name == "fashion-test"
    part = D.load_data("fashion", n=5, seed=0)
    keep = D._subset_indices(N, 5, 0)
    assert torch.equal(part.x, expect_train[keep]) and torch.equal(part.y, torch.from_numpy(train[1]).long()[keep])


def test_the_debian_folder_is_found_without_the_variable(tmp_path, monkeypatch):
    images, labels = _arrays(4)
    system = _write(tmp_path / "usr-share-datasets-fashion-mnist", TRAIN, images, labels, gz=True)
    monkeypatch.delenv(D.FASHION_ENV, raising=False)
    monkeypatch.setattr(D, "FASHION_SYSTEM_DIR", system)
    data = D.load_data("fashion")
    assert data.name == "fashion" and torch.equal(data.y, torch.from_numpy(labels).long())
    assert "fashion" in D.DATASETS and "fashion-test" in D.DATASETS


# ---- refusals -----------------------------------------------------------------------------------


def _refused(path, *fragments, error=ValueError):
    with pytest.raises(error) as caught:
        D.read_idx(path)
    message = str(caught.value)
    for fragment in (repr(str(path)),) + fragments:
        assert fragment in message, (fragment, message)


def test_bad_magic_wrong_type_and_short_header(tmp_path):
    images, _ = _arrays(5, n=2)
    cases = {
        "magic": (b"\x89PNG\r\n\x1a\n" + bytes(40), ("not an IDX file", "starts with 89 50 4e 47")),
        "zero-dims": (bytes([0, 0, 8, 0]) + bytes(8), ("not an IDX file", "starts with 00 00 08 00")),
        "empty": (b"", ("not an IDX file", "(nothing)")),
        "float": (_idx(images.astype(">f4"), code=0x0D), ("type 0x0d (float32)", "only 0x08 (uint8)")),
        "header": (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), ("truncated IDX header", "need 12 bytes", "holds 4")),
    }
    for name, (blob, fragments) in cases.items():
        (tmp_path / name).write_bytes(blob)
        _refused(tmp_path / name, *fragments)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(blob))  # the same inside gzip
        _refused(tmp_path / f"{name}.gz", *fragments)


def test_truncated_and_trailing_bytes(tmp_path):
    images, _ = _arrays(6, n=3)
    blob = _idx(images)  # 16 header bytes + 2352
    (tmp_path / "short").write_bytes(blob[:-5])
    _refused(tmp_path / "short", "truncated IDX file", "shape (3, 28, 28), 2352 bytes", "holds 2347")
    (tmp_path / "long").write_bytes(blob + b"xyz")
    _refused(tmp_path / "long", "trailing bytes", "2352 bytes of data, and 3 bytes follow")
    (tmp_path / "short.gz").write_bytes(gzip.compress(blob[:-5]))
    _refused(tmp_path / "short.gz", "truncated IDX file", "holds 2347")
    (tmp_path / "long.gz").write_bytes(gzip.compress(blob + b"xyz"))
    _refused(tmp_path / "long.gz", "trailing bytes", "and more bytes follow")
    cut = gzip.compress(blob)
    (tmp_path / "cut.gz").write_bytes(cut[: len(cut) // 2])  # the gzip stream itself cut off
    _refused(tmp_path / "cut.gz", "not a readable gzip file", "EOFError")


def test_a_crafted_huge_header_is_refused_by_the_file_size(tmp_path, monkeypatch):
    huge = (2**32 - 1, 2**32 - 1, 28)  # 5e20 bytes promised
    blob = bytes([0, 0, 8, 3]) + struct.pack(">3I", *huge) + bytes(100)
    allocations = []
    real_frombuffer = np.frombuffer
    monkeypatch.setattr(np, "frombuffer", lambda *a, **k: allocations.append(a) or real_frombuffer(*a, **k))
    (tmp_path / "huge").write_bytes(blob)
    _refused(tmp_path / "huge", "truncated IDX file", f"{huge[0] * huge[1] * 28} bytes of data", "holds 100")
    (tmp_path / "huge.gz").write_bytes(gzip.compress(blob))
    size = (tmp_path / "huge.gz").stat().st_size
    _refused(tmp_path / "huge.gz", f"more than a gzip file of {size} bytes can hold")
    # under deflate's bound, but the stream runs out: read in chunks, refused as truncated
    (tmp_path / "big.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 10_000) + bytes(100)))
    _refused(tmp_path / "big.gz", "truncated IDX file", "shape (10000,), 10000 bytes", "holds 100")
    assert allocations == []


def _folder_with(tmp_path, images, labels):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / TRAIN[0]).write_bytes(_idx(images))
    (folder / TRAIN[1]).write_bytes(_idx(labels))
    return folder


def test_label_count_mismatch_names_the_labels_file(tmp_path):
    images, labels = _arrays(7)
    folder = _folder_with(tmp_path, images, labels[:-1])
    with pytest.raises(ValueError) as caught:
        D.load_data(f"fashion:{folder}")
    assert str(caught.value) == (f"{str(folder / TRAIN[1])!r}: expected 20 labels, one per image of "
                                 f"{str(folder / TRAIN[0])!r}, got shape (19,)")


def test_labels_outside_0_to_9(tmp_path):
    images, labels = _arrays(8)
    labels[7], labels[12] = 10, 255
    folder = _folder_with(tmp_path, images, labels)
    with pytest.raises(ValueError) as caught:
        D.load_data(str(folder))
    assert str(caught.value) == f"{str(folder / TRAIN[1])!r}: label 10 at index 7 is outside 0..9 (2 such labels)"


def test_images_that_are_not_n_by_h_by_w(tmp_path):
    images, labels = _arrays(9)
    folder = _folder_with(tmp_path, images.reshape(N, 784), labels)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, height, width\) with N >= 1, got shape "
                                         r"\(20, 784\)") as caught:
        D.load_data(f"fashion:{folder}")
    assert repr(str(folder / TRAIN[0])) in str(caught.value)


def test_missing_files_are_named(tmp_path, no_default):
    images, labels = _arrays(10)
    folder = _write(tmp_path / "half", TRAIN, images, labels, gz=True)
    (folder / (TRAIN[1] + ".gz")).unlink()
    with pytest.raises(D.DataPathError) as caught:
        D.load_data(f"fashion:{folder}")
    assert str(caught.value).startswith(f"{str(folder)!r}: no train-labels-idx1-ubyte[.gz] in this folder")
    with pytest.raises(FileNotFoundError, match=r"no t10k-images-idx3-ubyte\[.gz\] or t10k-labels-idx1-ubyte\[.gz\]"):
        D.load_data(f"fashion-test:{folder}")
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST folder does not exist") as caught:
        D.load_data(f"fashion:{tmp_path / 'nowhere'}")
    assert caught.value.filename == str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"source='fashion:': expected fashion:FOLDER"):
        D.load_data("fashion:")


def test_no_folder_found_says_where_it_looked(tmp_path, monkeypatch, no_default):
    with pytest.raises(D.DataPathError) as caught:
        D.load_data("fashion-test")
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, ValueError)
    for fragment in ("source='fashion-test': no Fashion-MNIST folder found", "SCORESDE_FASHION_MNIST is not set",
                     repr(str(tmp_path / "no-such-system-dir")), "apt install dataset-fashion-mnist",
                     "source='fashion-test:FOLDER'"):
        assert fragment in message, fragment
    monkeypatch.setenv(D.FASHION_ENV, str(tmp_path / "gone"))
    with pytest.raises(D.DataPathError, match="SCORESDE_FASHION_MNIST=.*gone' is not a folder"):
        D.load_data("fashion")


# ---- presets --------------------------------------------------------------------------------------


def test_the_presets_fit_the_data(tmp_path):
    from scoresde.train.loop import _network

    config = preset("fashion").validate()
    assert (config.data, config.model) == ("fashion", "fashion")
    images, labels = _arrays(11)
    data = D.load_data(f"fashion:{_write(tmp_path / 'f', TRAIN, images, labels, gz=False)}")
    torch.manual_seed(0)
    net = _network(config, data)
    assert networks.count_parameters(net) <= 2_500_000  # safetensors of float32 weights <= 10 MB
    assert net.config["image_size"] == 28 and net.config["num_classes"] == 10
    with torch.no_grad():
        out = net(data.x[:2], torch.tensor([0.3, 0.7]), data.y[:2])
    assert out.shape == (2, 1, 28, 28)
