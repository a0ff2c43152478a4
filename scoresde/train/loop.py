"""The training loop, read top to bottom: one process or many (torchrun + DDP), CPU or CUDA.

    from scoresde.train import preset, train
    train(preset("digits"))                          # or: scoresde train --preset digits
    torchrun --nproc_per_node 4 -m scoresde.cli train --preset cifar10 --set data=/data/cifar-10-batches-py

One run writes to a run folder at a time (rank 0 holds the folder's lock for the whole run), and a
fresh run does not start over a folder that holds another run's checkpoints unless told to resume
it or to overwrite it. SIGINT or SIGTERM stops the run after the current step with a checkpoint of
that step (`TrainingInterrupted`), on every rank at the same step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import _dist, nn as networks
from .._lock import FolderLockedError, folder_lock  # noqa: F401 (FolderLockedError: what train raises)
from ..prediction import Denoiser
from ..solvers import SOLVERS, sample
from .. import checkpoint as ckpt
from . import data as datasets
from .config import TrainConfig
from .ema import EMA
from .objective import diffusion_loss, noised_lowres


# ---- processes and devices -----------------------------------------------------------------
@contextlib.contextmanager
def _processes():
    """(rank, world size, local rank) from torchrun's environment for the `with` block; one process
    without it. The process group (`scoresde._dist.process_group`) is left in order: after a run that
    ended together on every rank (finished, refused by rank 0, or stopped by a signal at the same
    step), each rank waits for the others before leaving, since gloo aborts a process whose peer
    closes the connection under it."""
    def stopped_together(error: BaseException) -> bool:
        # A second signal stops one rank at once: no waiting for the others then.
        return isinstance(error, TrainingInterrupted) and error.saved

    with _dist.process_group(ended_together=stopped_together) as (rank, world):
        yield rank, world, int(os.environ.get("LOCAL_RANK", 0))


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


# ---- the run folder: one writer, no mixing of runs ----------------------------------------------
def _old_run(out: Path) -> list[Path]:
    """What an earlier run left in `out`: its checkpoints (`latest`, step directories, a crashed
    save's leftovers), the log and the sample pictures (nothing else in the folder is ours to delete)."""
    made_here = [p for p in out.iterdir()
                 if p.name == ckpt.LOG or (p.name.startswith("samples_") and p.suffix == ".png")]
    return ckpt.checkpoint_files(out) + made_here


def _checkpoint_step(path: Path | None) -> str:
    return "none complete" if path is None else str(int(path.name.split("step_")[1].split(".")[0]))


def _prepare_folder(out: Path, resume: bool, overwrite: bool) -> bool:
    """Rank 0, holding the folder's lock: whether to resume. A fresh run into a folder that holds
    checkpoints is refused unless `overwrite`, which deletes the old run's files first."""
    latest = ckpt.latest_checkpoint(out)
    if resume:
        if latest is None:
            print(f"no checkpoint in {out}: starting a fresh run")
        return latest is not None
    old = _old_run(out)
    saved = [p for p in ckpt.checkpoint_files(out) if not p.name.startswith(".")]  # leftovers alone: no run
    if saved and not overwrite:
        raise ValueError(f"out={str(out)!r} holds the checkpoints of another run (latest step: "
                         f"{_checkpoint_step(latest)}): continue it with --resume (resume=True), or delete it "
                         "and start afresh with --overwrite (overwrite=True), or choose another folder")
    if overwrite and old:
        for path in sorted(old, key=lambda p: p.name != ckpt.LATEST):  # `latest` first: no half-deleted run
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"overwrite: deleted the earlier run in {out} (latest step: {_checkpoint_step(latest)})")
    return False


@contextlib.contextmanager
def _run_folder(out: Path, resume: bool, overwrite: bool):
    """Hold `out`'s writer's lock (rank 0: the one that writes) for the `with` block; yields whether
    to resume."""
    with contextlib.ExitStack() as held:
        def claim():
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(folder_lock(out))
            return _prepare_folder(out, resume, overwrite)

        yield _dist.on_main(claim)


# ---- stopping on a signal ------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM.

    Attributes:
        signum: the signal.
        step: the step reached.
        checkpoint: the checkpoint to resume from (None on ranks other than 0, or if there is none).
        saved: True if `checkpoint` was written at `step` on the way out; False after a second
            signal, which stops at once and leaves the last complete checkpoint.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, saved: bool):
        self.signum, self.step, self.checkpoint, self.saved = signum, step, checkpoint, saved
        name = signal.Signals(signum).name
        if saved:
            message = f"stopped by {name} at step {step}; checkpoint saved: {checkpoint}"
        else:
            last = f"the last complete checkpoint: {checkpoint}" if checkpoint else "there is no checkpoint yet"
            message = f"stopped at once by a second {name} at step {step}, without saving; {last}"
        super().__init__(message)


class _StopRequest:
    """A signal handler: the first signal asks the loop to stop after the current step; the same
    signal again stops at once (KeyboardInterrupt; saves are atomic, so a save cut short leaves the
    checkpoint before it). Another signal meanwhile is ignored: torchrun answers the terminal's
    SIGINT by sending SIGTERM to the workers, which are stopping already."""

    def __init__(self):
        self.signum, self.step = 0, 0  # the signal received, the step the loop reached

    def __call__(self, signum, frame):
        if signum == self.signum:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum


@contextlib.contextmanager
def _stop_on_signals(request: _StopRequest):
    """Route SIGINT and SIGTERM to `request` for the `with` block (main thread only: Python runs
    signal handlers there), then restore the handlers found."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {s: signal.getsignal(s) for s in signals}
    try:
        for s in signals:
            signal.signal(s, request)
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def _step_status(grad_norm: torch.Tensor, request: _StopRequest, world: int) -> tuple[bool, int]:
    """(whether the gradient is finite, the signal to stop on or 0).

    One process reads its stop flag on the host, adding no sync. In a distributed run the flag rides
    along with the finiteness in one all-reduce (max), so that every rank stops at the same step (a
    signal may reach one rank only) and save()'s gather finds them all.
    """
    finite = torch.isfinite(grad_norm)
    if world == 1:
        # sync: one scalar per step, so that a non-finite step is skipped before it reaches the weights.
        return bool(finite.item()), request.signum
    status = torch.stack([finite.logical_not().to(torch.int64),
                          torch.tensor(request.signum, dtype=torch.int64, device=grad_norm.device)])
    dist.all_reduce(status, op=dist.ReduceOp.MAX)
    not_finite, signum = status.tolist()  # sync: the same one read, with the flag beside it
    return not not_finite, signum


# ---- the pieces ----------------------------------------------------------------------------------
def _network(config: TrainConfig, data: datasets.Data) -> torch.nn.Module:
    """The preset network, checked against the data: its sample shape and its classes."""
    net = networks.from_preset(config.model, **config.model_overrides)
    arch = net.config
    if arch["architecture"] == "UNet":
        expects = (arch["in_channels"], arch["image_size"], arch["image_size"])
        hint = "model.in_channels / model.image_size"
    else:
        expects, hint = (arch["dim"],), "model.dim"
    if tuple(data.sample_shape) != expects:
        raise ValueError(f"model preset {config.model!r} takes samples of shape {expects}, but data "
                         f"{data.name!r} has {tuple(data.sample_shape)}: choose another preset or set {hint}")
    if config.lowres and (arch.get("cond_channels", 0) < 1 or arch.get("cond_size") != config.lowres):
        raise ValueError(f"lowres={config.lowres}: model preset {config.model!r} takes "
                         + (f"a {arch['cond_size']}x{arch['cond_size']} conditioning image" if arch.get("cond_channels")
                            else "no conditioning image") + ": choose a super-resolution preset such as "
                         "'digits_sr' or set model.cond_channels / model.cond_size")
    if arch.get("cond_channels") and not config.lowres:
        raise ValueError(f"lowres=0: model preset {config.model!r} is conditioned on a {arch['cond_size']}x"
                         f"{arch['cond_size']} image; set lowres={arch['cond_size']}")
    classes = arch.get("num_classes")
    if classes is not None and data.num_classes is not None and classes != data.num_classes:
        raise ValueError(f"model preset {config.model!r} has {classes} classes, data {data.name!r} has "
                         f"{data.num_classes}: set model.num_classes={data.num_classes}")
    return net


def checkpoint_config(config: TrainConfig, net: torch.nn.Module, data: datasets.Data) -> dict:
    """What a checkpoint says about itself: enough to rebuild the network, the schedule and the
    data's units, and the training configuration that made it."""
    return {
        "architecture": net.config,
        "schedule": config.schedule_config(),
        "prediction": config.target,
        "data": {"name": data.name, "sample_shape": list(data.sample_shape), "num_classes": data.num_classes,
                 "data_range": list(data.data_range), "units": dataclasses.asdict(data.to_data_units)},
        "train": dataclasses.asdict(config),
    }


def _learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to config.lr, then constant (Ho et al. 2020)."""
    return config.lr * min(1.0, (step + 1) / max(config.warmup, 1))  # warmup=0: no warm-up


def _drop_labels(y, num_classes, p, generator):
    """Replace each label by the null class `num_classes` with probability p (for guidance)."""
    if y is None or p == 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def _pooled(data: datasets.Data, size: int) -> datasets.Data:
    """The images of `data` average-pooled to size x size (`resolution`: a cascade's base)."""
    if len(data.sample_shape) != 3 or data.sample_shape[-1] % size or data.sample_shape[-2] % size:
        raise ValueError(f"resolution={size}: expected a size that divides the images of data {data.name!r}, "
                         f"of shape {tuple(data.sample_shape)}")
    x = torch.nn.functional.adaptive_avg_pool2d(data.x, size)
    return datasets.Data(x, data.y, data.num_classes, data.name, data.to_data_units, data.data_range)


def lowres_cond(config: TrainConfig, sde, x: torch.Tensor, level, generator=None) -> dict:
    """The conditioning of a super-resolution network for images x (batch, C, H, W): their low-res
    version noised to `level` (a float or a (batch,) tensor), and that level."""
    s = level if isinstance(level, torch.Tensor) else torch.full((x.shape[0],), float(level), device=x.device)
    return {"cond": noised_lowres(sde, x, config.lowres, s, generator=generator), "cond_t": s.to(x.dtype)}


def _save_samples(net, ema, config, data, sde, path, device):
    """A picture of what the EMA weights generate now (rank 0); a super-resolution network
    upsamples the first `sample_n` training images' low-res versions."""
    from ..plotting import save_image_grid, save_scatter

    sampler = copy.deepcopy(net).eval()
    ema.copy_to(sampler)
    cond = None
    if config.lowres:
        x = data.x[:config.sample_n].to(device)
        cond = lowres_cond(config, sde, x, config.lowres_aug_sample,
                           torch.Generator(device).manual_seed(config.seed))
    denoiser = Denoiser(sampler, sde, prediction=config.target, cond=cond)
    steps = None if SOLVERS[config.sample_solver].adaptive else config.sample_steps  # adaptive: no steps
    n = config.sample_n if cond is None else cond["cond"].shape[0]
    x = sample(denoiser, sde, shape=(n, *data.sample_shape), solver=config.sample_solver,
               steps=steps, generator=torch.Generator().manual_seed(config.seed), device=device)
    if len(data.sample_shape) == 3:
        lo, hi = data.data_range
        save_image_grid((data.to_data_units(x.cpu()) - lo) / (hi - lo), str(path))
    else:
        save_scatter(x.cpu(), str(path), title=f"EMA samples, {path.stem}", lim=3.0)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a network on `config.data` with the denoising objective; returns the last checkpoint.

    Args:
        config: the training configuration; `config.out` is the run folder.
        resume: continue from the run folder's latest checkpoint (with none there, say so and start
            a fresh run).
        overwrite: delete an earlier run's checkpoints, log and pictures in the run folder first.
            Without it (or `resume`), a fresh run into a folder holding checkpoints is refused.

    Raises:
        FolderLockedError: another process is writing to the run folder (an OSError).
        TrainingInterrupted: SIGINT or SIGTERM arrived (handled in the main thread only); the run
            stopped after the current step with a checkpoint of it.
    """
    config.validate()
    if resume and overwrite:
        raise ValueError(f"resume=True and overwrite=True: choose one (resume continues the run in "
                         f"{config.out!r}, overwrite deletes it)")
    with _processes() as (rank, world, local_rank):
        device = _device(config, local_rank)
        if config.batch_size % (world * config.grad_accum):
            raise ValueError(f"batch_size={config.batch_size} must be a multiple of processes x grad_accum "
                             f"= {world} x {config.grad_accum}")
        stop = _StopRequest()
        with _run_folder(Path(config.out), resume, overwrite) as resume:
            try:
                return _train(config, resume, rank, world, device, stop)
            except KeyboardInterrupt:
                if not stop.signum:  # not ours: Ctrl-C before the loop began
                    raise
                latest = ckpt.latest_checkpoint(config.out) if rank == 0 else None
                raise TrainingInterrupted(stop.signum, stop.step, latest, saved=False) from None


def _train(config: TrainConfig, resume: bool, rank: int, world: int, device: torch.device,
           stop: _StopRequest) -> Path:
    main = rank == 0
    out = Path(config.out)
    micro_batch = config.batch_size // (world * config.grad_accum)
    cuda = device.type == "cuda"
    if config.bf16 and not cuda:
        config = dataclasses.replace(config, bf16=False)  # bf16 autocast is for CUDA only

    # ---- data, network, schedule, optimiser ----
    torch.manual_seed(config.seed)  # the same initial weights on every process
    if config.split == "train":  # evaluate's training split: its held-out images never seen
        from ..evaluate import split_data

        data = split_data(config.data)[0]
    else:
        data = datasets.load_data(config.data, seed=config.seed)
    if config.resolution:
        data = _pooled(data, config.resolution)
    stream = datasets.BatchStream(data, micro_batch, seed=config.seed, rank=rank, world_size=world)
    net = _network(config, data).to(device)
    if cuda and config.channels_last and len(data.sample_shape) == 3:
        net = net.to(memory_format=torch.channels_last)
    sde, objective = config.sde(), config.objective()
    ema = EMA(net, config.ema_decay, config.ema_warmup)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    noise = torch.Generator(device).manual_seed(config.seed * 1000 + rank)  # t, eps and label dropout
    saved_config = checkpoint_config(config, net, data)
    labelled = data.num_classes is not None and net.config.get("num_classes") is not None
    step = 0

    # ---- resume: weights, optimiser, EMA, step, every random state, the data stream's position ----
    if resume:  # rank 0 found a checkpoint
        found = ckpt.load_checkpoint(out, map_location=device)
        # How t is drawn (continuous, or the indices of an N-step chain) belongs to the schedule too.
        ckpt.check_compatible(found, saved_config, keys=("architecture", "schedule", "prediction", "data",
                                                          "train.time", "train.num_steps"))
        net.load_state_dict(found.model_state)
        optimizer.load_state_dict(found.state["optimizer"])
        ema.load_state_dict(found.ema_state, found.state["ema_updates"])
        step = found.state["step"]
        own = found.state["processes"][rank]
        ckpt.set_rng_state(own["rng"])
        noise.set_state(own["noise"])
        stream.load_state_dict(found.state["stream"])
        if main:
            print(f"resumed from {found.path} at step {step}")

    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    if config.compile:
        model = torch.compile(model)
    if main:
        print(f"{networks.describe(net)}; data {data.name} {tuple(data.sample_shape)} x {len(data)}; "
              f"{world} process(es) on {device}")

    def save() -> Path | None:
        """A checkpoint of this step (every rank takes part; rank 0 writes it and gets its path)."""
        states = [None] * world
        local = {"rng": ckpt.rng_state(), "noise": noise.get_state()}
        if world > 1:
            dist.all_gather_object(states, local)
        else:
            states = [local]
        if main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "ema_updates": ema.num_updates,
                     "stream": stream.state_dict(), "processes": states}
            return ckpt.save_checkpoint(out, step, model_state=net.state_dict(), ema_state=ema.state_dict(),
                                        config=saved_config, state=state, keep=config.keep)
        return None

    # ---- the loop ----
    batches = iter(stream)
    nan_run, images, tick = 0, 0, time.perf_counter()
    saved, path = (step, found.path) if resume else (-1, None)  # the last checkpoint written, and when
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=config.steps, initial=step, disable=not main, unit="step",
                                       dynamic_ncols=True))
        # A fresh run starts its log afresh; a resumed one appends.
        log = stack.enter_context(open(out / ckpt.LOG, "a" if step else "w")) if main else None
        stop.step = step
        stack.enter_context(_stop_on_signals(stop))
        while step < config.steps:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            for micro in range(config.grad_accum):
                x, y = next(batches)
                x = x.to(device, non_blocking=True)
                if cuda and config.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True) if labelled else None
                y = _drop_labels(y, data.num_classes, config.cond_drop, noise)
                cond = None
                if config.lowres:  # noise-conditioning augmentation: s ~ U(0, lowres_aug), given to the net
                    level = torch.rand(x.shape[0], generator=noise, device=device) * config.lowres_aug
                    cond = lowres_cond(config, sde, x, level, noise)
                # DDP averages gradients across processes on the last micro-batch only.
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last or world == 1 else model.no_sync():
                    with autocast:
                        loss = diffusion_loss(model, sde, x, objective, y=y, generator=noise, cond=cond)
                    (loss / config.grad_accum).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            finite, signum = _step_status(grad_norm, stop, world)
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                nan_run += 1
                warnings.warn(f"step {step}: non-finite loss or gradient ({loss.item():.3g}); step skipped")
                if nan_run >= config.max_nan_steps:
                    raise FloatingPointError(
                        f"{nan_run} non-finite steps in a row at step {step}: stopping. The last good "
                        f"checkpoint is in {out}; lower lr (now {config.lr}) or check the data")
            else:
                nan_run = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update()
                step += 1
                stop.step = step
                images += config.batch_size
                bar.update()
                if main and (step % config.log_every == 0 or step == config.steps):
                    now = time.perf_counter()  # sync: loss.item() below waits for the step; only at log points
                    record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                              "lr": optimizer.param_groups[0]["lr"], "images_per_s": images / (now - tick)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                    images, tick = 0, now
                if main and step % config.sample_every == 0:
                    _save_samples(net, ema, config, data, sde, out / f"samples_{step:08d}.png", device)
                if step % config.ckpt_every == 0 or step == config.steps:
                    saved, path = step, save()
            if signum and step < config.steps:  # asked to stop: this step saved, then out
                if saved != step:  # the same on every rank: save() is collective
                    saved, path = step, save()
                raise TrainingInterrupted(signum, step, path, saved=True)
    return ckpt.latest_checkpoint(out)
