"""scoresde.evaluate and the k-NN metrics: precision/recall and neighbours against brute-force loops,
streamed evaluation equal to one pass, the replication check on copies and on new real images, class
coverage on one class, units and bad input, and train-features + eval on a data set the test writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scoresde import evaluate as E
from scoresde import metrics as M
from scoresde.chunked import sample_to_disk
from scoresde.cli import main


def _brute_radii(x, k):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0: the point itself


def _brute_within(q, c, r):
    return np.array([any(np.linalg.norm(qi - cj) <= rj for cj, rj in zip(c, r)) for qi in q])


def test_precision_and_recall_match_a_loop_over_the_balls():
    g = np.random.default_rng(0)
    real = g.normal(size=(60, 3))
    fake = g.normal(size=(45, 3)) * 0.5 + np.array([1.0, 0, 0])  # narrower, shifted: precision != recall
    k = 3
    precision = _brute_within(fake, real, _brute_radii(real, k)).mean()
    recall = _brute_within(real, fake, _brute_radii(fake, k)).mean()
    got = M.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k)
    assert got == pytest.approx((precision, recall), abs=1e-12)
    assert abs(precision - recall) > 0.1  # the case separates the two
    np.testing.assert_allclose(M.kth_neighbour_radii(torch.from_numpy(real), 5, block=7).numpy(),
                               _brute_radii(real, 5), rtol=1e-9)


def test_precision_and_recall_of_a_narrow_and_a_far_set():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 2, generator=g, dtype=torch.float64)
    narrow = real[real[:, 0] > 1.0]  # real points, one corner of the support
    precision, recall = M.precision_recall(real, narrow)
    assert precision == 1.0 and recall < 0.4
    assert M.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_nearest_matches_argmin_over_all_pairs():
    g = torch.Generator().manual_seed(2)
    pool, queries = torch.randn(50, 1, 4, 4, generator=g), torch.randn(23, 1, 4, 4, generator=g)
    distance, index = M.nearest(queries, pool, block=5)
    d = (queries.flatten(1)[:, None].double() - pool.flatten(1)[None].double()).norm(dim=-1)
    assert torch.equal(index, d.argmin(1))
    torch.testing.assert_close(distance, d.min(1).values, rtol=1e-9, atol=1e-9)


def test_merged_statistics_equal_one_update():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = M.FeatureStats(5).update(x)
    merged = M.FeatureStats(5).update(x[:100]).merge(M.FeatureStats(5).update(x[100:]))
    assert merged.n == 300
    torch.testing.assert_close(merged.covariance, whole.covariance, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def ref():
    return E.reference("digits")


def test_streamed_chunks_equal_one_pass(ref, monkeypatch):
    """Chunks of 1000 and of 7 samples: the same numbers (the statistics merge exactly; the float32
    network rounds differently in batches of another size)."""
    x = ref.held_x[:60]
    whole = E.evaluate(x, ref)
    monkeypatch.setattr(E, "CHUNK", 7)
    chunked = E.evaluate(x, ref)
    assert len(E.sample_chunks(x)[0]) == 9
    for key in ("n", "precision", "recall", "class_share", "replication_share"):
        assert getattr(chunked, key) == getattr(whole, key), key
    assert chunked.frechet == pytest.approx(whole.frechet, rel=1e-6)  # float32 features: batch-size rounding
    assert torch.equal(chunked.nearest_index, whole.nearest_index)


def test_copies_of_training_images_are_replicas_and_new_real_images_are_not(ref, tmp_path):
    copies = ref.train_x[:40]
    result = E.evaluate(copies, ref, closest=4)
    assert result.replication_share == 1.0
    assert torch.equal(result.nearest_index, torch.arange(40))
    assert [c[1] for c in result.closest] == [0, 1, 2, 3] and all(c[0] == 0.0 for c in result.closest)
    floor = E.floor(ref)
    assert floor.replication_share < 4 * ref.quantile  # calibrated on the other half: about `quantile`
    calibration = E.evaluate(ref.held_x[::2], ref)
    assert calibration.replication_share == pytest.approx(ref.quantile, abs=1.5 / len(ref.held_x[::2]))
    E.save_replicas(result, ref, tmp_path / "r.png", count=4)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_images_score_near_the_floor_and_noise_far_from_it(ref):
    floor = E.floor(ref)
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    bad = E.evaluate(noise, ref)
    assert floor.precision > 0.8 and floor.recall > 0.8 and floor.coverage == 1.0
    assert bad.precision < 0.1 and bad.recall < 0.1
    assert bad.frechet > 10 * floor.frechet
    assert bad.frechet_matched == pytest.approx(bad.frechet, rel=0.2)  # 360 of 360: the same set's distance


def test_one_class_covers_a_tenth(ref):
    zeros = ref.held_x[ref.held_y == 0]
    result = E.evaluate(zeros, ref)
    assert result.coverage == pytest.approx(0.1)
    assert result.class_share[0] > 0.9
    assert result.class_distance == pytest.approx(1 - float(ref.class_share[0]), abs=0.1)


def test_data_units_files_and_folders_read_as_model_units(ref, tmp_path):
    x = ref.held_x[:30]
    expected = E.evaluate(x, ref)
    np.save(tmp_path / "s.npy", ref.to_data_units(x).numpy())  # digits: 0..16
    from_file = E.evaluate(tmp_path / "s.npy", ref)
    sample_to_disk(lambda z, t: torch.zeros_like(z), _sde(), 30, tmp_path / "run", sample_shape=(1, 8, 8),
                   batch_size=8, solver="ddim", steps=2, progress=False, meta={"units": "data"},
                   transform=lambda z: ref.to_data_units(x[:len(z)]))
    # every chunk of this run holds the first len(chunk) digits: compare with that tensor
    folder_x = torch.cat([x[:8], x[:8], x[:8], x[:6]])
    from_folder = E.evaluate(tmp_path / "run", ref)
    assert from_file.nearest_index.tolist() == expected.nearest_index.tolist()
    assert from_folder.nearest_index.tolist() == E.evaluate(folder_x, ref).nearest_index.tolist()
    assert from_file.frechet == pytest.approx(expected.frechet, rel=1e-4)


def _sde():
    from scoresde import VPSDE
    return VPSDE.linear()


def test_bad_samples_are_refused_naming_the_problem(ref, tmp_path):
    with pytest.raises(ValueError, match=r"shape \(1, 28, 28\) per sample; 'digits' images are \(1, 8, 8\)"):
        E.evaluate(torch.zeros(5, 1, 28, 28), ref)
    with pytest.raises(ValueError, match=r"values span \[0, 255\].*\[0, 16\] in data units"):
        E.evaluate(torch.full((5, 1, 8, 8), 255.0).index_fill_(0, torch.tensor([0]), 0.0), ref, units="model")
    with pytest.raises(ValueError, match="NaN or inf"):
        E.evaluate(torch.full((5, 1, 8, 8), float("nan")), ref)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json: an empty folder"):
        E.evaluate(tmp_path / "empty", ref)
    np.save(tmp_path / "none.npy", np.zeros((0, 1, 8, 8)))
    with pytest.raises(ValueError, match="holds no samples"):
        E.evaluate(tmp_path / "none.npy", ref)
    with pytest.raises(ValueError, match="units='pixels'"):
        E.evaluate(ref.held_x[:5], ref, units="pixels")
    with pytest.raises(ValueError, match="quantile=1.5"):
        E.reference("digits", quantile=1.5)


def test_an_unfinished_folder_is_refused(ref, tmp_path):
    out = tmp_path / "run"
    sample_to_disk(lambda z, t: torch.zeros_like(z), _sde(), 20, out, sample_shape=(1, 8, 8), batch_size=8,
                   solver="ddim", steps=2, progress=False)
    (out / "chunk_000001.npy").unlink()
    with pytest.raises(ValueError, match=r"unfinished \(1 chunk\(s\) missing, e.g. chunk_000001.npy\)"):
        E.evaluate(out, ref)


def _write_set(path, n=120, size=8, seed=0):
    """Labelled 8-bit images: class c is a bright square at position c (so a classifier can learn it)."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = g.integers(0, 40, size=(n, 1, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 0, 2 * c:2 * c + 2, :] = 250
    np.savez(path, x=x, y=y)
    return x, y


def test_train_features_then_eval_on_a_written_data_set(tmp_path, capsys):
    data = tmp_path / "squares.npz"
    x, _ = _write_set(data)
    assert main(["train-features", "--data", str(data), "--out", str(tmp_path / "feat"), "--epochs", "3"]) == 0
    record = json.loads((tmp_path / "feat" / "config.json").read_text())
    assert record["data"] == str(data) and record["sample_shape"] == [1, 8, 8] and record["num_classes"] == 4
    assert record["accuracy_held_out"] == 1.0  # four bright rows: an easy task
    np.save(tmp_path / "s.npy", x[1::5].astype(np.float32))  # held-out images, in data units (0..255)
    assert main(["eval", str(tmp_path / "s.npy"), "--data", str(data), "--features", str(tmp_path / "feat"),
                 "--json", str(tmp_path / "e.json"), "--png", str(tmp_path / "e.png")]) == 0
    out = capsys.readouterr().out
    assert "24 samples from" in out and "(data units)" in out and "replication share" in out
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert numbers["samples"]["coverage"] == 1.0 and numbers["held_out_real"]["n"] == 24
    assert (tmp_path / "e.png").is_file()


def test_features_of_another_data_set_are_refused(tmp_path, capsys):
    net = M.Features(M.FeatureNet((1, 28, 28), 10), "fashion", (1, 28, 28), 10, {})
    net.save(tmp_path / "feat")
    assert main(["eval", "x.npy", "--features", str(tmp_path / "feat")]) == 2
    err = capsys.readouterr().err
    assert "data: trained on 'fashion', given 'digits'" in err and "image shape: trained on (1, 28, 28)" in err
    with pytest.raises(ValueError, match="not a feature network folder"):
        M.load_features(tmp_path)
    with pytest.raises(ValueError, match="no feature network ships for"):
        E.reference(str(tmp_path / "squares.npz")) if _write_set(tmp_path / "squares.npz") is not None else None


def test_train_features_needs_labelled_images(tmp_path, capsys):
    np.save(tmp_path / "points.npy", np.zeros((50, 2), dtype=np.float32))
    assert main(["train-features", "--data", str(tmp_path / "points.npy"), "--out", str(tmp_path / "f")]) == 2
    assert "needs labelled images (C, H, W); this data set has no labels" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_print_the_numbers_of_one(tmp_path):
    """`torchrun --nproc_per_node=2 -m scoresde eval`: chunks shared between two gloo ranks, rank 0
    gathers; the JSON equals one process's."""
    from test_distributed import torchrun

    out = tmp_path / "run"
    sample_to_disk(lambda z, t: torch.zeros_like(z), _sde(), 45, out, sample_shape=(1, 8, 8), batch_size=10,
                   solver="ddim", steps=2, progress=False, transform=lambda z: z.clamp(-1, 1))  # 5 chunks
    assert main(["eval", str(out), "--json", str(tmp_path / "one.json")]) == 0
    run = torchrun(2, "-m", "scoresde", "--", "eval", str(out), "--json", str(tmp_path / "two.json"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("replication share") == 1 and "processes=2" in run.stdout
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert two == one


def test_the_shipped_fashion_features_describe_themselves():
    """Without the data set here, what can be checked: the record, the network it loads into, and the
    refusal of another data set's images."""
    features = M.load_features("fashion")
    assert features.data == "fashion" and features.sample_shape == (1, 28, 28) and features.num_classes == 10
    assert features.record["held_out_images"] == 10_000 and 0.85 < features.record["accuracy_held_out"] < 1
    assert "train-features --data fashion --out scoresde/assets/fashion_features" in features.record["command"]
    assert features.features(torch.zeros(3, 1, 28, 28)).shape == (3, 64)
    with pytest.raises(ValueError, match="data: trained on 'fashion', given 'digits'"):
        features.check("digits", (1, 8, 8))
