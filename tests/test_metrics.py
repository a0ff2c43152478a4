"""scoresde.metrics: streamed feature statistics, the Fréchet distance against an independent closed
form, and the shipped digits feature network (accuracy on digits it never saw, distances that tell
real digits from noise)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scoresde import metrics as M

F64 = torch.float64


def test_streamed_statistics_equal_the_whole_sets():
    x = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0), dtype=F64) * torch.arange(1, 8) + 3
    stats = M.FeatureStats(7)
    for part in x.split(128):
        stats.update(part)
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.covariance, torch.from_numpy(np.cov(x.numpy(), rowvar=False)), rtol=1e-10,
                               atol=1e-10)


def _symmetric_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_the_frechet_distance_matches_the_symmetric_form():
    """tr((A B)^(1/2)) = tr((A^(1/2) B A^(1/2))^(1/2)), computed here by eigendecompositions instead."""
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(5, 5, generator=g, dtype=F64)
    a = M.FeatureStats(5).update(torch.randn(400, 5, generator=g, dtype=F64))
    b = M.FeatureStats(5).update(torch.randn(300, 5, generator=g, dtype=F64) @ mix + 0.5)
    cov_a, cov_b = a.covariance.numpy(), b.covariance.numpy()
    root_a = _symmetric_sqrt(cov_a)
    expected = float(((a.mean - b.mean) ** 2).sum()) + np.trace(cov_a + cov_b) \
        - 2 * np.trace(_symmetric_sqrt(root_a @ cov_b @ root_a))
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-8)


def test_the_shipped_digits_classifier_knows_digits_it_never_saw():
    _, _, x_held, y_held = M.digits_split()
    with torch.no_grad():
        accuracy = float((M.load_features("digits").net(x_held).argmax(1) == y_held).float().mean())
    assert accuracy >= 0.95
    record = json.loads((M.DIGITS_FEATURES / "config.json").read_text())
    assert record["accuracy_held_out"] == pytest.approx(accuracy, abs=1e-6)
    assert record["command"] == "python -m scoresde.metrics train-digits"


def test_digits_features_tell_real_digits_from_noise():
    x_train, _, x_held, _ = M.digits_split()
    real = M.frechet_distance(M.digits_features(x_train), M.digits_features(x_held))
    noise = torch.rand(x_held.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert M.frechet_distance(M.digits_features(x_held), M.digits_features(noise)) > 5 * real
