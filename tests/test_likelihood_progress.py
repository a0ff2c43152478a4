"""The progress bar of `log_likelihood` and `scoresde likelihood`: it reaches its total (steps for a
fixed-step solver, the log-SNR span for dopri5), shows the model calls, stays off by default, and
the command's help says what a run costs."""
from __future__ import annotations

import pytest
import torch

import scoresde as sd
import scoresde.likelihood as lk
from scoresde import cli

SDE = sd.VPSDE.linear()
X = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.5, 0.9]], dtype=torch.float64)


class RecordingBar:
    """A stand-in for tqdm that records how it was made and every update."""

    made: list["RecordingBar"] = []

    def __init__(self, total=None, disable=False, **kwargs):
        self.total, self.disable, self.kwargs = total, disable, kwargs
        self.n, self.updates, self.postfixes, self.closed = 0, [], [], False
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)
        self.n += n

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        self.postfixes.append(dict(ordered_dict or {}, **kwargs))

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@pytest.fixture
def bars(monkeypatch):
    """The bars `log_likelihood` makes during a test, in order."""
    RecordingBar.made = []
    monkeypatch.setattr(lk, "tqdm", RecordingBar, raising=False)  # a plain failure where lk has no tqdm
    return RecordingBar.made


def model():
    return sd.Gaussian(SDE, [0.0, 0.0], 0.5)


@pytest.mark.parametrize("solver, steps", [("euler", 7), ("heun", 5), ("rk4", 3)])
def test_fixed_step_bar_counts_every_step(bars, solver, steps):
    res = lk.log_likelihood(model(), SDE, X, divergence="exact", solver=solver, steps=steps, progress=True)
    (bar,) = bars
    assert not bar.disable and bar.total == steps and bar.closed
    assert bar.updates == [1] * steps and bar.n == steps
    assert bar.postfixes[-1] == {"nfe": res.nfe}
    assert [p["nfe"] for p in bars[0].postfixes] == [res.nfe // steps * (i + 1) for i in range(steps)]
    assert "3 samples" in bar.kwargs["desc"]


def test_adaptive_bar_follows_log_snr_to_its_end(bars):
    res = lk.log_likelihood(model(), SDE, X, divergence="exact", rtol=1e-4, atol=1e-4, progress=True)
    (bar,) = bars
    lam0, lam1 = (float(v) for v in SDE.log_snr(torch.tensor([res.t_eps, SDE.T], dtype=torch.float64)))
    assert not bar.disable and bar.closed
    assert bar.total == pytest.approx(lam0 - lam1) and bar.total > 10  # 11.93 for the linear schedule from t = 1e-5
    assert bar.n == pytest.approx(bar.total, rel=1e-9)
    assert len(bar.updates) >= 5 and all(u >= 0 for u in bar.updates)
    assert max(bar.updates) < bar.total / 2  # it moves step by step, not in one jump at the end
    nfe = [p["nfe"] for p in bar.postfixes]
    assert nfe == sorted(nfe) and nfe[-1] <= res.nfe and nfe[-1] >= res.nfe - 1


def test_progress_is_off_by_default(bars):
    lk.log_likelihood(model(), SDE, X, divergence="exact", solver="euler", steps=2)
    assert [bar.disable for bar in bars] == [True]


@pytest.mark.parametrize("value", ["yes", 1, None, torch.tensor(True)])
def test_progress_must_be_a_bool(value):
    """A string, a number or a tensor is refused by name, not run as truthy (nor as an unknown keyword)."""
    with pytest.raises(TypeError, match=r"^progress=.*expected True or False"):
        lk.log_likelihood(model(), SDE, X, solver="euler", steps=2, progress=value)


def test_cli_progress_flag_and_default(bars, capsys):
    """--progress turns the bar on; without a flag it follows stderr, here captured (not a terminal)."""
    args = ["--n", "2", "--solver", "euler", "--steps", "2"]
    assert cli.main(["likelihood", *args, "--progress"]) == 0
    assert cli.main(["likelihood", *args]) == 0
    assert [bar.disable for bar in bars] == [False, True]
    assert bars[0].n == 2 and "2 samples" in bars[0].kwargs["desc"]
    assert [cli._parser().parse_args(["likelihood", *flag]).progress
            for flag in ([], ["--progress"], ["--no-progress"])] == [None, True, False]


def test_cli_help_states_the_cost(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["likelihood", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "per digit" in text and "--progress" in text
    assert "hutchinson" in text.lower() and "--steps" in text
