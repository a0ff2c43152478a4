"""Time grids for fixed-step solvers: float64 CPU tensors running from t_start down to t_end.

Every grid is a function grid(sde, steps, t_start, t_end) -> times of length steps + 1, so a
user's own spacing is one more function (functools.partial(karras, rho=5) works too).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._util import F64, check_count, check_number
from .files import CheckpointError, config_differences, read_bytes, read_json, write_atomic
from .sde import VPSDE


def _fraction(steps: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, dtype=F64)


def _check_grid(sde, steps, t_start, t_end):
    """The shared contract of every grid: 0 < t_end < t_start <= sde.T and 1 <= steps <= MAX_STEPS."""
    if not isinstance(sde, VPSDE):
        raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
    check_count("steps", steps)
    t_start = check_number("t_start", t_start, low=0.0, high=sde.T, low_open=True)
    t_end = check_number("t_end", t_end, low=0.0, high=t_start, low_open=True, high_open=True)
    return t_start, t_end


def _pin_ends(times, t_start, t_end):
    """Exact end points, whatever rounding or the round trip through another variable did."""
    times[0], times[-1] = t_start, t_end
    return times


def uniform(sde, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """Equal steps in t (DDPM's and Song et al.'s choice)."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    return _pin_ends(t_start + (t_end - t_start) * _fraction(steps), t_start, t_end)


def quadratic(sde, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """Steps growing quadratically away from the data: t - t_end ~ (1 - i/steps)^2 (DDIM)."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    return _pin_ends(t_end + (t_start - t_end) * (1.0 - _fraction(steps)) ** 2, t_start, t_end)


def log_snr(sde, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """Equal steps in the half log-SNR lambda (DPM-Solver's choice)."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    lam = sde.log_snr(torch.tensor([t_start, t_end], dtype=F64))
    lams = lam[0] + (lam[1] - lam[0]) * _fraction(steps)
    return _pin_ends(sde.t_from_log_snr(lams), t_start, t_end)


def karras(sde, steps: int, t_start: float, t_end: float, rho: float = 7.0) -> torch.Tensor:
    """Equal steps in (sigma/alpha)^(1/rho) (Karras et al. 2022), dense near the data."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    rho = check_number("rho", rho, low=0.0, low_open=True)
    # In logs throughout: (sigma/alpha) itself overflows for chains with alpha_bar_N < 1e-616.
    root = torch.exp(-sde.log_snr(torch.tensor([t_start, t_end], dtype=F64)) / rho)
    lams = -rho * torch.log(root[0] + (root[1] - root[0]) * _fraction(steps))
    return _pin_ends(sde.t_from_log_snr(lams), t_start, t_end)


GRIDS = {"uniform": uniform, "quadratic": quadratic, "log_snr": log_snr, "karras": karras}


# ---- learned grids --------------------------------------------------------------------------------
TUNED_FORMAT = "scoresde.tuned_grid/1"


def schedule_id(sde: VPSDE) -> str:
    """The schedule as a tuned grid records it: its repr and a digest of log alpha on 1025 times (two
    chains of one length have one repr, not one digest)."""
    log_alpha = sde.log_alpha(torch.linspace(0.0, sde.T, 1025, dtype=F64))
    return f"{sde.schedule!r} sha256:{hashlib.sha256(log_alpha.numpy().tobytes()).hexdigest()[:16]}"


@dataclass
class TunedGrid:
    """A time grid learned for one solver at one number of model calls, by `scoresde.tune_grid`.

    `sample(..., grid=tuned)` checks that the run is the one the grid was tuned for (solver, its
    options, model calls, schedule) and refuses another, naming the difference;
    `sample(..., grid=tuned.times)` takes the times as they are.

    Attributes:
        times: float64 CPU tensor of the steps + 1 times, from T down to the learned end time.
        solver: the solver it was tuned for.
        options: the solver's options it was tuned with.
        nfe: model calls of a run on it, the final denoising call included.
        schedule: the schedule it was tuned on (`schedule_id`).
        model: what it was tuned for (free text: the command line writes the model's path and the
            digest of its weights), or None.
        teacher: how the reference samples were made, and their model calls each.
        loss: the tuning loss at each iteration.
        validation: held-out distances to the teacher's samples: "initial" (the grid tuning
            started from), "tuned", and "fixed" (per fixed grid, same solver and model calls).
        seconds: wall time of the tuning.
    """

    times: torch.Tensor
    solver: str
    options: dict
    nfe: int
    schedule: str
    model: str | None = None
    teacher: str = ""
    loss: list = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def identity(self) -> dict:
        """What a run must match to use this grid."""
        return {"solver": self.solver, "options": self.options, "nfe": self.nfe, "schedule": self.schedule}

    def check(self, solver: str, options: dict, nfe: int, sde: VPSDE, model: str | None = None):
        """Refuse a run that is not the one this grid was tuned for.

        Args:
            solver: the run's solver.
            options: its options (with the defaults filled in).
            nfe: its model calls on this grid, the final denoising call included.
            sde: its schedule.
            model: what the run samples, when the caller knows (compared when both sides say).

        Raises:
            ValueError: naming every field that differs, with both values.
        """
        run = {"solver": solver, "options": options, "nfe": nfe, "schedule": schedule_id(sde)}
        saved = self.identity()
        if model is not None and self.model is not None:
            run["model"], saved["model"] = model, self.model
        if solver != self.solver:  # another solver's options differ too: name the solver alone
            saved, run = {"solver": self.solver}, {"solver": solver}
        diffs = config_differences(saved, run)
        if diffs:
            raise ValueError(f"grid: a TunedGrid for another run ({'; '.join(diffs).replace('expected', 'this run')}): "
                             "tune a grid for this one (scoresde.tune_grid)")

    def check_model(self, model: str):
        """Refuse a model other than the one this grid was tuned for (when the grid names one).

        Args:
            model: the model's identity (`Pretrained.identity()` for a loaded model).

        Raises:
            ValueError: naming both models.
        """
        if self.model is not None and self.model != model:
            raise ValueError(f"grid: tuned for the model {self.model!r}, not this one ({model!r}): tune a grid for "
                             "this model (scoresde tune)")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the grid to a JSON file (atomically); the times keep every bit.

        Args:
            path: the file to write.

        Returns:
            The path written.
        """
        record = {"format": TUNED_FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        record["times"] = self.times.tolist()
        path = Path(path)
        write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TunedGrid:
        """Read a grid written by `save`.

        Args:
            path: the JSON file.

        Returns:
            The TunedGrid.

        Raises:
            CheckpointError: the file is not a tuned grid (named, with what is wrong).
        """
        path = Path(path)
        record = read_json(path, read_bytes(path))
        if record.get("format") != TUNED_FORMAT:
            raise CheckpointError(f"{path}: format {record.get('format')!r}, expected {TUNED_FORMAT!r} (a file "
                                  "written by TunedGrid.save or `scoresde tune`)")
        fields = cls.__dataclass_fields__
        wrong = sorted(set(record) - set(fields) - {"format"}) + sorted(k for k in ("times", "solver", "options", "nfe",
                                                                                   "schedule") if k not in record)
        if wrong:
            raise CheckpointError(f"{path}: fields {wrong} unknown or missing; expected {sorted(fields)}")
        times = record.pop("times")
        del record["format"]
        if not isinstance(times, list) or len(times) < 2 or not all(isinstance(v, (int, float)) for v in times):
            raise CheckpointError(f"{path}: times must be a list of at least 2 numbers")
        kinds = {"solver": str, "options": dict, "nfe": int, "schedule": str, "teacher": str, "loss": list,
                 "validation": dict, "seconds": (int, float), "model": (str, type(None))}
        bad = [k for k, kind in kinds.items() if k in record and (not isinstance(record[k], kind)
                                                                  or isinstance(record[k], bool))]
        if bad:
            raise CheckpointError(f"{path}: field(s) {bad} of the wrong type")
        grid = cls(times=torch.tensor(times, dtype=F64), **record)
        values = grid.times.tolist()
        if not all(a > b for a, b in zip(values, values[1:])) or not values[-1] > 0:
            raise CheckpointError(f"{path}: times must be positive and strictly decreasing")
        return grid
