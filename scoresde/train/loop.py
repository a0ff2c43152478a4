"""The training loop, read top to bottom: one process or many (torchrun + DDP), CPU or CUDA.

    from scoresde.train import preset, train
    train(preset("digits"))                          # or: scoresde train --preset digits
    torchrun --nproc_per_node 4 -m scoresde.cli train --preset cifar10 --set data=/data/cifar-10-batches-py
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import nn as networks
from ..prediction import Denoiser
from ..solvers import SOLVERS, sample
from . import checkpoint as ckpt
from . import data as datasets
from .config import TrainConfig
from .ema import EMA
from .objective import diffusion_loss


# ---- processes and devices -----------------------------------------------------------------
def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; one process without it."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


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


def _save_samples(net, ema, config, data, sde, path, device):
    """A picture of what the EMA weights generate now (rank 0)."""
    from ..plotting import save_image_grid, save_scatter

    sampler = copy.deepcopy(net).eval()
    ema.copy_to(sampler)
    denoiser = Denoiser(sampler, sde, prediction=config.target)
    with torch.no_grad():
        steps = None if SOLVERS[config.sample_solver].adaptive else config.sample_steps  # adaptive: no steps
        x = sample(denoiser, sde, shape=(config.sample_n, *data.sample_shape), solver=config.sample_solver,
                   steps=steps, generator=torch.Generator().manual_seed(config.seed), device=device)
    if len(data.sample_shape) == 3:
        lo, hi = data.data_range
        save_image_grid((data.to_data_units(x.cpu()) - lo) / (hi - lo), str(path))
    else:
        save_scatter(x.cpu(), str(path), title=f"EMA samples, {path.stem}", lim=3.0)


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train a network on `config.data` with the denoising objective; returns the last checkpoint."""
    config.validate()
    rank, world, local_rank = _distributed()
    device = _device(config, local_rank)
    main = rank == 0
    out = Path(config.out)
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of processes x grad_accum "
                         f"= {world} x {config.grad_accum}")
    micro_batch = config.batch_size // (world * config.grad_accum)
    cuda = device.type == "cuda"
    if config.bf16 and not cuda:
        config = dataclasses.replace(config, bf16=False)  # bf16 autocast is for CUDA only

    # ---- data, network, schedule, optimiser ----
    torch.manual_seed(config.seed)  # the same initial weights on every process
    data = datasets.load_data(config.data, seed=config.seed)
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
    if resume and ckpt.latest_checkpoint(out) is not None:
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
        out.mkdir(parents=True, exist_ok=True)
        print(f"{networks.describe(net)}; data {data.name} {tuple(data.sample_shape)} x {len(data)}; "
              f"{world} process(es) on {device}")

    def save():
        states = [None] * world
        local = {"rng": ckpt.rng_state(), "noise": noise.get_state()}
        if world > 1:
            dist.all_gather_object(states, local)
        else:
            states = [local]
        if main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "ema_updates": ema.num_updates,
                     "stream": stream.state_dict(), "processes": states}
            ckpt.save_checkpoint(out, step, model_state=net.state_dict(), ema_state=ema.state_dict(),
                                 config=saved_config, state=state, keep=config.keep)

    # ---- the loop ----
    batches = iter(stream)
    bar = tqdm(total=config.steps, initial=step, disable=not main, unit="step", dynamic_ncols=True)
    log = open(out / "log.jsonl", "a") if main else None
    nan_run, images, tick = 0, 0, time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
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
            # DDP averages gradients across processes on the last micro-batch only.
            last = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last or world == 1 else model.no_sync():
                with autocast:
                    loss = diffusion_loss(model, sde, x, objective, y=y, generator=noise)
                (loss / config.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        # sync: one scalar per step, so that a non-finite step is skipped before it reaches the weights.
        if not torch.isfinite(grad_norm).item():
            optimizer.zero_grad(set_to_none=True)
            nan_run += 1
            warnings.warn(f"step {step}: non-finite loss or gradient ({loss.item():.3g}); step skipped")
            if nan_run >= config.max_nan_steps:
                raise FloatingPointError(
                    f"{nan_run} non-finite steps in a row at step {step}: stopping. The last good "
                    f"checkpoint is in {out}; lower lr (now {config.lr}) or check the data")
            continue
        nan_run = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        step += 1
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
            save()
    bar.close()
    if log is not None:
        log.close()
    return ckpt.latest_checkpoint(out)
