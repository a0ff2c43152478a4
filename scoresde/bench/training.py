"""Training throughput: images/s of the real training loop, and the fraction of step time spent
outside the model's forward and backward passes (data, optimiser, EMA, bookkeeping).

    scoresde bench --only train
    python benchmarks/train_speed.py --preset digits --model tiny --steps 60          # one setting

It runs `scoresde.train.train` itself: images/s come from the loop's own log over the timed steps
(after a warm-up, compilation included), and the loss (forward) and `backward()` calls are timed
from the outside; on CUDA each timed region is bracketed by synchronisations, which only the
benchmark pays. Every setting runs with its torch.compile choices, and on CUDA with bf16 off and on.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from .report import table


@dataclass(frozen=True)
class TrainSetting:
    preset: str = "digits"  # training preset (scoresde.train.config.PRESETS)
    model: str | None = None  # network preset (default: the training preset's)
    data: str | None = None  # data set; "random": uint8 noise images of the network's shape
    batch: int = 128
    steps: int = 60  # timed steps, after as many warm-up steps
    compile: tuple[bool, ...] = (False, True)


@dataclass(frozen=True)
class TrainOptions:
    settings: tuple[TrainSetting, ...]


def options(profile: str, env) -> TrainOptions:
    if profile == "tiny":
        return TrainOptions((TrainSetting(model="tiny", batch=8, steps=1, compile=(False,)),))
    if profile == "quick":
        return TrainOptions((TrainSetting(batch=128, steps=4, compile=(False,)),))
    # The CIFAR-10 network on CPU: a few small steps show the split, not a training speed.
    cifar = TrainSetting("cifar10", "cifar10", "random", *((128, 30) if env.cuda else (8, 2)),
                         compile=(False, True) if env.cuda else (False,))
    return TrainOptions((TrainSetting(steps=30), cifar))


class Stopwatch:
    """Time spent inside the wrapped calls, counted once `skip` backward passes have gone by."""

    def __init__(self, cuda: bool, skip: int):
        self.cuda, self.skip, self.inside, self.backwards = cuda, skip, 0.0, 0

    def wrap(self, fn, is_backward: bool):
        def timed(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            if self.backwards >= self.skip:
                self.inside += time.perf_counter() - start
            self.backwards += is_backward
            return out

        return timed


def measure(config, cuda: bool, warm: int) -> dict:
    """One run of the real loop: `warm` steps (compilation included), then `config.steps - warm`
    timed steps, between the loop's own last two log points (log_every = warm = the timed steps)."""
    from tqdm.auto import tqdm

    from ..train import loop

    watch = Stopwatch(cuda, skip=warm)
    def quiet_bar(*args, **kwargs):  # the suite shows one progress bar, not the loop's too
        return tqdm(*args, **{**kwargs, "disable": True})

    with mock.patch.object(loop, "diffusion_loss", watch.wrap(loop.diffusion_loss, False)), \
            mock.patch.object(torch.Tensor, "backward", watch.wrap(torch.Tensor.backward, True)), \
            mock.patch.object(loop, "tqdm", quiet_bar), contextlib.redirect_stdout(io.StringIO()):
        loop.train(config)
    last = json.loads((Path(config.out) / "log.jsonl").read_text().splitlines()[-1])
    window = (config.steps - warm) * config.batch_size / last["images_per_s"]
    return {"images_per_s": last["images_per_s"], "step_ms": 1e3 * window / (config.steps - warm),
            "outside_forward_backward": 1 - watch.inside / window}


def _random_images(setting: TrainSetting, work: Path) -> str:
    """A small .npy of uint8 noise images of the network's shape (the speed does not care)."""
    from .. import nn as networks

    arch = networks.PRESETS[setting.model or setting.preset]
    shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
    path = work / "random.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(max(1024, 4 * setting.batch), *shape),
                                                     dtype=np.uint8))
    return str(path)


def _run(setting: TrainSetting, compile_: bool, bf16: bool, device: torch.device):
    from ..train.config import apply_overrides, preset

    with tempfile.TemporaryDirectory() as work:
        data = _random_images(setting, Path(work)) if setting.data == "random" else setting.data
        warm = setting.steps  # logs at `warm` and at 2 warm: the last record spans exactly the timed steps
        items = [f"batch_size={setting.batch}", f"compile={compile_}", f"bf16={bf16}", "warmup=1",
                 f"steps={warm + setting.steps}", f"log_every={warm}", f"sample_every={10**9}",
                 f"ckpt_every={10**9}", f"device={device}"]
        items += [f"model={setting.model}"] if setting.model else []
        items += [f"data={data}"] if data else []
        config = apply_overrides(preset(setting.preset), items)
        config.out = str(Path(work) / "run")
        row = measure(config, device.type == "cuda", warm)
    return [{"preset": setting.preset, "model": setting.model or config.model, "data": setting.data or config.data,
             "batch": setting.batch, "timed_steps": setting.steps, "compile": compile_, "bf16": bf16, **row}]


def units(opts: TrainOptions, env):
    return [(f"train {s.preset}/{s.model or s.preset} batch {s.batch} compile={c} bf16={b}",
             partial(_run, s, c, b, env.device))
            for s in opts.settings for c in s.compile for b in ((False, True) if env.cuda else (False,))]


def summarize(rows, opts: TrainOptions) -> dict:
    return {"rows": rows}


def markdown(summary) -> list[str]:
    lines = ["## Training throughput", "",
             "The real training loop (`scoresde.train.train`): images/s over the timed steps after as many "
             "warm-up steps; the rest of each step outside the loss's forward and `backward()`.", ""]
    lines += table(["preset / network", "data", "batch", "timed steps", "torch.compile", "bf16", "images/s",
                    "ms/step", "time outside forward+backward"],
                   [[f"{r['preset']} / {r['model']}", r["data"], r["batch"], r["timed_steps"], r["compile"],
                     r["bf16"], f"{r['images_per_s']:.1f}", f"{r['step_ms']:.1f}",
                     f"{100 * r['outside_forward_backward']:.1f} %"] for r in summary["rows"]],
                   align="llrrllrrr")
    return lines + [""]


def plots(summary, out: Path) -> list[str]:
    return []


def main(argv=None):
    """One training setting alone (the old `python benchmarks/train_speed.py` command)."""
    from . import suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--model", default=None, help="network preset (default: the training preset's)")
    parser.add_argument("--data", default=None, help="data set; 'random' makes a .npy of noise images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="results/train_speed")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    setting = TrainSetting(args.preset, args.model, args.data, args.batch, args.steps)
    return suite.run_parts({"train": TrainOptions((setting,))}, out=args.out, threads=args.threads,
                           command="python benchmarks/train_speed.py", argv=argv)
