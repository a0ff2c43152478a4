"""Training throughput: images/s of the real training loop, and the fraction of step time spent
outside the model's forward and backward passes (data, optimiser, EMA, bookkeeping).

    python benchmarks/train_speed.py --preset digits --model tiny --steps 60          # CPU
    python benchmarks/train_speed.py --preset cifar10 --model cifar10 --data random --steps 60   # GPU

It runs `scoresde.train.train` itself: images/s come from the loop's own log over the timed steps
(after a warm-up, compilation included), and the loss (forward) and `backward()` calls are timed
from the outside; on CUDA each timed region is bracketed by synchronisations, which only the
benchmark pays.
Every configuration runs with torch.compile off and on, and (CUDA) bf16 off and on.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scoresde.train import loop
from scoresde.train.config import apply_overrides, preset


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
    watch = Stopwatch(cuda, skip=warm)
    real_loss, real_backward = loop.diffusion_loss, torch.Tensor.backward
    loop.diffusion_loss = watch.wrap(real_loss, False)
    torch.Tensor.backward = watch.wrap(real_backward, True)
    try:
        loop.train(config)
    finally:
        loop.diffusion_loss, torch.Tensor.backward = real_loss, real_backward
    last = json.loads((Path(config.out) / "log.jsonl").read_text().splitlines()[-1])
    window = (config.steps - warm) * config.batch_size / last["images_per_s"]
    return {"images_per_s": last["images_per_s"], "step_ms": 1e3 * window / (config.steps - warm),
            "outside_forward_backward": 1 - watch.inside / window}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--model", default=None, help="network preset (default: the training preset's)")
    parser.add_argument("--data", default=None, help="data set; 'random' makes a 50k-image .npy of noise")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="results/train_speed")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    rows, work = [], Path(tempfile.mkdtemp())
    data = args.data
    if data == "random":
        shape = {"cifar10": (3, 32, 32)}.get(args.model or args.preset, (1, 8, 8))
        data = str(work / "random.npy")
        np.save(data, np.random.default_rng(0).uniform(-1, 1, size=(50_000, *shape)).astype(np.float32))
    for compile_ in (False, True):
        for bf16 in ((False, True) if cuda else (False,)):
            warm = args.steps  # logs at `warm` and at 2 warm: the last record spans exactly the timed steps
            items = [f"batch_size={args.batch}", f"compile={compile_}", f"bf16={bf16}", "warmup=1",
                     f"steps={warm + args.steps}", f"log_every={warm}", f"sample_every={10**9}",
                     f"ckpt_every={10**9}"]
            items += [f"model={args.model}"] if args.model else []
            items += [f"data={data}"] if data else []
            config = apply_overrides(preset(args.preset), items)
            config.out = str(work / f"run_{compile_}_{bf16}")
            row = {"compile": compile_, "bf16": bf16, **measure(config, cuda, warm)}
            rows.append(row)
            print(row, flush=True)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                        f"{torch.get_num_threads()} threads)"
    lines = [f"Command: `python benchmarks/train_speed.py {' '.join(f'--{k} {v}' for k, v in vars(args).items() if v is not None and k != 'out')}`",
             f"Device: {device}; torch {torch.__version__}", "",
             "| torch.compile | bf16 | images/s | ms/step | time outside forward+backward |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['compile']} | {r['bf16']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | "
              f"{100 * r['outside_forward_backward']:.1f} % |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    (out / "train_speed.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
