"""The shipped digits model: a classifier trained on the real digits recognises its samples
confidently, and every digit appears in a fair share."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import scoresde as sd
from scoresde.pretrained import DEFAULT_MODEL


@pytest.fixture(scope="module")
def classifier():
    """Logistic regression on the real digits (pixel values 0..16, as scikit-learn gives them)."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.3,
                                                        random_state=0, stratify=digits.target)
    clf = LogisticRegression(max_iter=3000).fit(x_train, y_train)
    real_confidence = clf.predict_proba(x_test).max(1).mean()
    assert clf.score(x_test, y_test) > 0.93  # the judge itself is sound
    return clf, real_confidence


@pytest.fixture(scope="module")
def samples():
    model = sd.load_model()
    # One thread: on a loaded machine two threads stall on each other, many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = sd.sample(model.denoiser, model.sde, shape=(600, *model.sample_shape), solver="heun", steps=20,
                      generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    return model.to_data_units(x).numpy().reshape(600, 64)


def judge(clf, pixels):
    proba = clf.predict_proba(np.clip(pixels, 0, 16) / 16.0)
    return proba.max(1).mean(), np.bincount(proba.argmax(1), minlength=10) / len(pixels)


def test_shipped_files_are_small():
    size = (DEFAULT_MODEL / "model.safetensors").stat().st_size
    assert size < 8 * 2**20, size  # "a few MB at most"


def test_samples_are_recognised_confidently(classifier, samples):
    """Mean top-class probability at least 85 % of what real held-out digits get; pure noise in the
    same units (the negative control) falls far below that."""
    clf, real_confidence = classifier
    confidence, _ = judge(clf, samples)
    assert confidence >= 0.85 * real_confidence, (confidence, real_confidence)
    noise = np.random.default_rng(0).uniform(0, 16, size=samples.shape)
    assert judge(clf, noise)[0] < 0.85 * real_confidence


def test_every_digit_appears_in_a_fair_share(classifier, samples):
    """Each class at least 4 % of 600 samples (a tenth would be 10 %; 4 % is 4.9 binomial standard
    errors below it), and none above 20 %: no mode dropped, none dominating."""
    _, shares = judge(classifier[0], samples)
    assert shares.min() >= 0.04 and shares.max() <= 0.20, shares.round(3)


def test_samples_stay_in_the_data_range(samples):
    """Sampled pixels in data units (0..16, a little overshoot allowed): left in model units
    ([-1, 1]) or scaled wrongly, their range and mean move far out."""
    assert -4.0 < samples.min() and samples.max() < 20.0 and samples.max() > 12.0
    assert 3.0 < samples.mean() < 7.0  # the real digits' mean pixel is about 4.9
