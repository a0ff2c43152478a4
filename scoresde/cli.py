"""The `scoresde` command: sample, tune, train, likelihood, eval, train-features, bench, presets, export."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import GRIDS, SOLVERS, VPSDE, GaussianMixture, _dist, sample
from ._util import device_argument, positive_int_argument, seed_argument


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scoresde", description="Score-based diffusion models on one VP-SDE.")
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser(
        "sample", help="draw samples from the shipped digits model, a checkpoint, or an exact mixture",
        description="Draw samples and write them as a PNG grid (or the raw samples, in the data set's "
                    "own units, to a .npy file). Prints NFE and wall time.")
    s.add_argument("--model", default=None,
                   help="a checkpoint or run folder of ours, an exported model.safetensors, or 'mixture' "
                        "for the exact sharp 2-D Gaussian mixture (default: the shipped digits model)")
    s.add_argument("--solver", default="heun", choices=sorted(SOLVERS), help="solver (default: heun)")
    s.add_argument("--steps", type=positive_int_argument, default=None,
                   help="steps of a fixed-step solver (default: about 50 model calls)")
    s.add_argument("--grid", default=None,
                   help=f"time grid: one of {', '.join(sorted(GRIDS))}, or a tuned grid file (.json, from scoresde "
                        "tune) (default: the solver's; with --steps, a tuned grid shipped with the model when one "
                        "matches the solver and step count)")
    s.add_argument("--n", type=positive_int_argument, default=None, help="number of samples (default: 64; 4000 for mixture)")
    s.add_argument("--seed", type=seed_argument, default=0, help="random seed (default: 0)")
    s.add_argument("--device", default="cpu", type=_process_device_argument,
                   help="torch device (default: cpu; under torchrun, cuda means each process's own GPU)")
    s.add_argument("--out", default="samples.png", type=_out_argument,
                   help="output: .png (a picture), .npy, or a folder (a name ending in '/', or an existing "
                        "folder): the samples in .npy chunks of --batch-size, each written when finished; "
                        "rerun to finish an interrupted run; under torchrun, a folder only, its chunks split "
                        "over the processes (default: samples.png)")
    s.add_argument("--batch-size", type=positive_int_argument, default=None,
                   help="samples per chunk, with a folder --out (default: 1000); the noise of sample i is "
                        "seeded from (seed, i), so it does not depend on the batch size: with the exact mixture "
                        "the samples are identical, with a network they agree to floating-point rounding")
    s.add_argument("--raw", action="store_true",
                   help="write the raw samples in data units without clipping to the data set's range")
    s.add_argument("--from", dest="start_images", default=None, metavar="IMAGES.npy",
                   help="edit these images instead of drawing from noise (SDEdit): a .npy file of (n, *sample_shape) "
                        "in the data set's units, as --out x.npy writes them; needs --t-start")
    s.add_argument("--t-start", type=float, default=None,
                   help="with --from: the time the images are noised to before the solver runs, in (t_end, T]: "
                        "small keeps them, T (1.0) forgets them")

    t = commands.add_parser("train", help="train a network", description="Train a network with the denoising "
                            "objective. Run under torchrun for many processes (DistributedDataParallel).")
    t.add_argument("--preset", default="digits", help="training preset: digits, toy2d, cifar10 (default: digits)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. steps=2000 lr=1e-3 data=/path model.base_channels=32")
    t.add_argument("--out", default=None, help="run folder (default: the preset's)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run's checkpoints, log and pictures in the run folder and start "
                        "afresh (without it, or --resume, a run folder that holds checkpoints is refused)")
    t.add_argument("--device", default=None, type=device_argument,
                   help="torch device (default: cuda if available, else cpu)")

    u = commands.add_parser(
        "tune", help="learn a solver's time grid for a model at a number of model calls",
        description="Learn the time grid of a deterministic fixed-step solver for a model at NFE model calls (the "
                    "final denoising call included), fitted to a tight dopri5 solution from the same starting "
                    "points (scoresde.tune_grid); writes it as JSON for scoresde sample --grid.")
    u.add_argument("--model", default=None, help="as for scoresde sample (default: the shipped digits model)")
    u.add_argument("--solver", default="unipc", choices=sorted(SOLVERS), help="solver (default: unipc)")
    u.add_argument("--nfe", type=positive_int_argument, required=True, help="model calls of a run on the grid")
    u.add_argument("--out", required=True, help="the grid file to write (.json)")
    u.add_argument("--n", type=positive_int_argument, default=128, help="starting points to fit (default: 128)")
    u.add_argument("--iterations", type=positive_int_argument, default=40, help="passes over them (default: 40)")
    u.add_argument("--seed", type=seed_argument, default=0, help="random seed (default: 0)")
    u.add_argument("--device", default="cpu", type=device_argument, help="torch device (default: cpu)")

    commands.add_parser("presets", help="list the network and training presets, with parameter counts")
    _likelihood_parser(commands)
    _eval_parsers(commands)
    commands.add_parser("bench", add_help=False,
                        help="run the benchmark suite: quality per NFE, sampling speed, training (scoresde bench -h)")

    e = commands.add_parser("export", help="write a checkpoint's EMA weights and config for shipping",
                            description="Write CHECKPOINT's EMA weights as OUT/model.safetensors with "
                                        "OUT/config.json (what scoresde/assets holds).")
    e.add_argument("checkpoint", help="a checkpoint directory or run folder")
    e.add_argument("out", help="output folder")
    return parser


def _likelihood_parser(commands):
    from .likelihood import DIVERGENCES, SOLVERS as ODE_SOLVERS

    p = commands.add_parser(
        "likelihood", help="bits/dim of the digits under a model",
        description="Bits per dimension of scikit-learn's 8x8 digits under a model, through the probability-flow "
                    "ODE. The digits' integer levels 0..16 are dequantized uniformly within their bins of width "
                    "1/8 in model units (x = (k + u - 1/2)/8 - 1, centred on the training map k/8 - 1); "
                    "bpd = -log p(x)/(64 ln 2) + 3. Prints the mean log-likelihood (nats), bpd with its standard "
                    "error over the images, NFE and wall time.",
        epilog="Cost: with the defaults (dopri5 at rtol = atol = 1e-5, about 300 model calls per batch, each with "
               "one backward pass for Hutchinson's divergence estimate) the solve costs about 0.4 s per digit on "
               "one CPU core for the default 200 digits (more per digit in small batches): a few minutes on a CPU, "
               "longer on a busy machine. --solver rk4 (200 model calls) is faster still for nearly the same "
               "bits/dim; --solver heun --steps 25 about 10 times but about "
               "0.3 bits low; each extra --probes adds a backward pass per call (--probes 4: twice the time); "
               "--divergence exact takes 64 backward passes per call (over a minute per digit). Measurements: "
               "docs/training.md.")
    p.add_argument("--model", default=None, help="a checkpoint or run folder of ours, or an exported model.safetensors "
                                                 "trained on the digits (default: the shipped digits model)")
    p.add_argument("--n", type=positive_int_argument, default=200,
                   help="number of digits, a fixed random subset (default: 200)")
    p.add_argument("--divergence", default="auto", choices=DIVERGENCES, help="divergence (default: auto)")
    p.add_argument("--probes", type=positive_int_argument, default=1, help="Hutchinson probes per image (default: 1)")
    p.add_argument("--solver", default="dopri5", choices=ODE_SOLVERS, help="ODE solver (default: dopri5)")
    p.add_argument("--steps", type=positive_int_argument, default=None,
                   help="steps of a fixed-step solver (default: ~200 model calls)")
    p.add_argument("--seed", type=seed_argument, default=0,
                   help="seed of the subset, the dequantization and the probes")
    p.add_argument("--device", default="cpu", type=_process_device_argument,
                   help="torch device (default: cpu; under torchrun, cuda means each process's own GPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar with an ETA on stderr (default: on when stderr is a terminal)")


def _eval_parsers(commands):
    v = commands.add_parser(
        "eval", help="measure samples against their data set: Fréchet distance, precision/recall, classes, copies",
        description="Measure samples against their data set in a classifier's feature space (Fréchet distance, "
                    "k-NN precision and recall, class coverage) and in pixel space (a replication check: the share of "
                    "samples nearer a training image than a threshold calibrated on held-out real images), beside "
                    "the same numbers for real held-out images (the floor). Under torchrun the samples' chunks are "
                    "shared among the ranks. Details: scoresde.evaluate.")
    v.add_argument("samples", help="a folder from scoresde sample --out DIR/, or a .npy file of samples")
    v.add_argument("--data", default="digits", help="the data set: a name (digits, fashion) or a path (default: digits)")
    v.add_argument("--features", default=None,
                   help="a feature network folder from scoresde train-features (default: the shipped one for digits)")
    v.add_argument("--units", default="auto", choices=("auto", "data", "model"),
                   help="the samples' units (default: auto: a folder's manifest says; a .npy file holds data units)")
    v.add_argument("--k", type=positive_int_argument, default=3, help="the k of the k-NN balls (default: 3)")
    v.add_argument("--png", default=None, help="write the samples nearest a training image beside it, as a PNG")
    v.add_argument("--json", default=None, help="write the numbers as JSON")
    v.add_argument("--seed", type=seed_argument, default=0, help="seed of the precision/recall subsets (default: 0)")

    f = commands.add_parser(
        "train-features", help="train the feature network scoresde eval measures a data set's samples in",
        description="Train a small classifier on a data set's training split and save it (model.safetensors, "
                    "config.json) for scoresde eval --features; prints its accuracy on the held-out split.")
    f.add_argument("--data", required=True, help="a data set name or path with labels (e.g. fashion, fashion:PATH)")
    f.add_argument("--out", required=True, help="the folder to write")
    f.add_argument("--epochs", type=positive_int_argument, default=None,
                   help="passes over the training split (default: about 60,000 images in all, at least 2)")
    f.add_argument("--seed", type=seed_argument, default=0, help="random seed (default: 0)")


def _eval(args) -> int:
    from . import evaluate

    if args.png is not None and not args.png.endswith(".png"):
        raise ValueError(f"--png {args.png!r}: expected a file name ending in .png")
    start = time.perf_counter()
    ref = evaluate.reference(args.data, args.features, seed=args.seed)
    result = evaluate.evaluate(args.samples, ref, units=args.units, k=args.k, seed=args.seed,
                               progress=sys.stderr.isatty())
    if result is None:  # not rank 0: it printed nothing
        return 0
    floor = evaluate.floor(ref, k=args.k)
    _, units, described = evaluate.sample_chunks(args.samples, args.units)
    print(f"{described} ({units} units) against {ref.data}: {len(ref.train_x)} training images, "
          f"{len(ref.held_x)} held out")
    print(evaluate.report(result, floor, ref))
    if args.png:
        evaluate.save_replicas(result, ref, args.png)
        print(f"wrote {args.png}")
    if args.json:
        evaluate.write_json(result, floor, ref, args.json)
        print(f"wrote {args.json}")
    print(f"wall={time.perf_counter() - start:.2f}s processes={_dist.rank_and_world()[1]}")
    return 0


def _train_features(args) -> int:
    from . import evaluate, metrics

    train, held = evaluate.split_data(args.data)
    if train.y is None or len(train.sample_shape) != 3:
        raise ValueError(f"--data {args.data!r}: a feature network needs labelled images (C, H, W); this data set has "
                         f"{'no labels' if train.y is None else f'items of shape {train.sample_shape}'}")
    command = shlex.join(["scoresde", *args.argv])
    features, accuracy = metrics.train_features(train.x, train.y, held.x, held.y, data=train.name,
                                                num_classes=train.num_classes, seed=args.seed, epochs=args.epochs,
                                                progress=sys.stderr.isatty(), command=command)
    print(f"held-out accuracy {accuracy:.4f} ({len(held)} images); wrote {features.save(args.out)}")
    return 0


DIGITS_LEVELS = 17  # scikit-learn's digits take the integer values 0..16


def _likelihood(args) -> int:
    """`scoresde likelihood`: bits/dim of the digits under the shipped (or a given) model."""
    import math

    from . import likelihood
    from .pretrained import load_model
    from .train.data import load_data

    model = load_model(args.model, device=args.device)
    name = model.config.get("data", {}).get("name")
    if name != "digits" or tuple(model.sample_shape) != (1, 8, 8):
        raise ValueError(f"the model at {model.path} was trained on {name!r} of shape {model.sample_shape}; "
                         "scoresde likelihood evaluates the digits (1, 8, 8)")
    data = load_data("digits", n=args.n, seed=args.seed)
    levels = torch.round((data.x.double() + 1.0) * 8.0).to(torch.int64)  # back to the integers 0..16
    gen = torch.Generator().manual_seed(args.seed)
    # Every rank draws the noise (and under torchrun the probes) of all the images, as one process
    # does, and evaluates its share: image i keeps its dequantization and its probes however the
    # images are split.
    x = likelihood.dequantize(levels, DIGITS_LEVELS, generator=gen).to(args.device)
    start = time.perf_counter()
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with _dist.process_group(args.device) as (rank, world):
        mine, probe_values = list(range(len(x))), None
        if world > 1:
            mine = _dist.shard(mine)
            hutchinson = args.divergence == "hutchinson" or (
                args.divergence == "auto" and x[0].numel() > likelihood.AUTO_EXACT_MAX_DIM)
            if hutchinson:  # the probes log_likelihood would draw for the whole batch, drawn whole
                probe_values = likelihood._draw_probes("rademacher", args.probes, x, x.dtype, gen)[:, mine]

        def evaluate():
            if not mine:
                print(f"scoresde likelihood: rank {rank} of {world} has no image to evaluate ({len(x)} image(s), "
                      f"{world} processes); waiting for the others", file=sys.stderr, flush=True)
                return None
            res = likelihood.log_likelihood(model.denoiser, model.sde, x if world == 1 else x[mine],
                                            divergence=args.divergence, probes=args.probes, solver=args.solver,
                                            steps=args.steps, levels=DIGITS_LEVELS, generator=gen,
                                            progress=progress and rank == 0,
                                            **({} if probe_values is None else {"probe_values": probe_values}))
            if x.device.type == "cuda":
                torch.cuda.synchronize()  # sync: the wall time must include the GPU's work
            return mine, res.nats.cpu(), res.bpd.cpu(), res.nfe, res.t_eps, res.divergence

        shares = [share for share in _dist.on_every_rank(evaluate) if share is not None]
    if rank != 0:
        return 0
    wall = time.perf_counter() - start
    nats, bpd = (torch.cat([share[k] for share in shares]) for k in (1, 2))
    if world > 1:  # back to the images' order
        order = torch.tensor([i for share in shares for i in share[0]]).argsort()
        nats, bpd = nats[order], bpd[order]
    nfe = [share[3] for share in shares]  # per process: the same for a fixed-step solver, not for dopri5
    t_eps, divergence = shares[0][4], shares[0][5]
    n = len(bpd)
    se = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    print(f"digits: {n} images (the shipped model saw all 1,797 in training: a training-set likelihood)")
    print(f"log-likelihood: {float(nats.mean()):.3f} nats per image (t_eps={t_eps:g}, "
          f"divergence={divergence}{f', probes={args.probes}' if divergence == 'hutchinson' else ''})")
    print(f"bits/dim: {float(bpd.mean()):.4f} +- {se:.4f} (standard error over the images)")
    processes = "" if world == 1 else f" processes={world}" + (
        f" (NFE per process: {', '.join(map(str, nfe))})" if len(set(nfe)) > 1 else "")
    print(f"solver={args.solver} NFE={max(nfe)} wall={wall:.2f}s device={args.device}{processes}")
    return 0


MIXTURE = "mixture ring2d"  # the exact mixture's identity in tuned grids


def _sample_mixture(args) -> int:
    from .plotting import save_scatter

    sde = VPSDE.linear()
    mixture = GaussianMixture.ring2d(sde)
    args.tuned = _tuned_grid(args, sde, MIXTURE)
    n = args.n or 4000
    if args.folder:
        return _sample_chunks(mixture, sde, (2,), n, args, meta={"model": "mixture"})
    x, info, wall = _timed_sample(mixture, sde, (n, 2), args, _start_images(args, lambda y: y, (2,)))
    report = mixture.mode_report(x)
    weight_error = (report["weights"] - mixture.weights).abs().max().item()
    print(f"mode weights: largest error {weight_error:.4f}; stray mass {report['stray']:.4f}; "
          f"within-mode std / true std: {report['std_ratio'].min():.3f}..{report['std_ratio'].max():.3f}")
    _write(x, args.out, lambda path: save_scatter(x, path, title=f"{info.solver}, NFE={info.nfe}",
                                                  log_density=mixture.log_prob))
    return 0


def _sample_model(args) -> int:
    from .plotting import save_image_grid, save_scatter
    from .pretrained import load_model

    model = load_model(args.model, device=args.device)
    args.tuned = _tuned_grid(args, model.sde, model.identity(), model.tuned_grids())
    n = args.n or 64
    clip = not args.raw  # clip to the data set's range, unless --raw
    if args.folder:
        return _sample_chunks(model.denoiser, model.sde, model.sample_shape, n, args,
                              transform=lambda x: model.to_data_units(x.cpu(), clip=clip),
                              meta={"model": str(model.path), "units": "data"})
    x_start = _start_images(args, model.to_model_units, model.sample_shape)
    x, info, wall = _timed_sample(model.denoiser, model.sde, (n, *model.sample_shape), args, x_start)
    data = model.to_data_units(x.cpu(), clip=clip)
    title = f"{info.solver}, NFE={info.nfe}"
    if len(model.sample_shape) == 3:
        lo, hi = model.config["data"]["data_range"]
        picture = lambda path: save_image_grid((data - lo) / (hi - lo), path, title=title)  # noqa: E731
    else:
        picture = lambda path: save_scatter(data, path, title=title, lim=3.0)  # noqa: E731
    _write(data, args.out, picture)
    return 0


def _solver_options(args) -> dict:
    return {} if SOLVERS[args.solver].adaptive else {"steps": args.steps, "grid": args.tuned or args.grid}


def _tuned_grid(args, sde, model_id: str, shipped=()):
    """--grid as a TunedGrid: a file given (checked against the model here, against the run by
    `sample`), or, with --steps and no --grid, a shipped grid tuned for this model, solver and step
    count. None for a grid name or nothing."""
    from .grids import TunedGrid
    from .solvers.options import validate

    if args.grid is not None and args.grid not in GRIDS:
        if not args.grid.endswith(".json"):
            raise ValueError(f"--grid {args.grid!r}: expected one of {', '.join(sorted(GRIDS))}, or a tuned grid "
                             "file (.json, from scoresde tune)")
        tuned = TunedGrid.load(args.grid)
        tuned.check_model(model_id)
        return tuned
    spec = SOLVERS[args.solver]
    if args.grid is not None or args.steps is None or spec.adaptive or args.start_images is not None:
        return None  # a shipped grid runs from T: not for an edit from --t-start
    options = validate(spec.name, spec.declared, spec.options, {})
    nfe = spec.calls(args.steps, options) + 1
    for path in shipped:
        tuned = TunedGrid.load(path)
        try:
            tuned.check(spec.name, options, nfe, sde, model=model_id)
        except ValueError:
            continue
        if _dist.is_main():  # under torchrun, one line
            print(f"grid: the tuned grid shipped with the model ({path.name}: {spec.name} at NFE {nfe}); --grid "
                  "NAME for a fixed grid")
        return tuned
    return None


def _process_device_argument(text: str) -> str:
    """--device of sample and likelihood: a device this machine has; under torchrun, a plain "cuda" is
    this process's GPU (cuda:LOCAL_RANK)."""
    return _dist.local_device(device_argument(text))


def _out_argument(text: str) -> str:
    """--out of sample: under torchrun with many processes, a folder only (a picture or one .npy
    file cannot be split over processes; a folder's chunks can)."""
    import argparse

    world = _dist.rank_and_world()[1]
    if world > 1 and not (text.endswith(("/", os.sep)) or os.path.isdir(text)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: under torchrun with {world} processes, --out must be a folder (a name ending in '/'), "
            "whose chunks the processes split; a .png or .npy file cannot be split: run one process for it")
    return text


def _check_out(args) -> bool:
    """Check --out before anything is loaded or drawn, creating missing folders; returns whether it
    names a folder of chunks (--batch-size only goes with one)."""
    out = args.out
    folder = out.endswith(("/", os.sep)) or os.path.isdir(out)
    _check_edit(args, folder)
    if args.batch_size is not None and not folder:
        raise ValueError(f"--batch-size goes with a folder --out (a name ending in '/'), not {out!r}")
    if not folder and not out.endswith((".png", ".npy")):
        raise ValueError(f"--out {out!r}: expected a file name ending in .png or .npy, or a folder (a name "
                         "ending in '/')")
    try:
        if folder:
            Path(out).mkdir(parents=True, exist_ok=True)
        else:
            _check_writable(Path(out))
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise OSError(f"--out {out!r}: cannot write there ({e.strerror or e}{where})") from None
    return folder


def _check_edit(args, folder: bool):
    """--from and --t-start go together, with a .png or .npy --out; the images set the count."""
    if (args.start_images is None) != (args.t_start is None):
        given, missing = ("--from", "--t-start") if args.t_start is None else ("--t-start", "--from")
        raise ValueError(f"{given} needs {missing}: --from IMAGES.npy --t-start T edits the images (SDEdit)")
    if args.start_images is None:
        return
    if folder:
        raise ValueError(f"--from goes with a .png or .npy --out, not the folder {args.out!r}")
    if args.n is not None:
        raise ValueError(f"--n {args.n}: with --from the images set the count; drop --n")


def _start_images(args, to_model_units, sample_shape) -> torch.Tensor | None:
    """--from's images in model units, checked against the model's sample shape (None without --from)."""
    if args.start_images is None:
        return None
    import numpy as np

    try:
        images = np.load(args.start_images, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--from {args.start_images!r}: not a readable .npy file ({e})") from None
    if images.ndim < 2 or tuple(images.shape[1:]) != tuple(sample_shape) or not len(images):
        raise ValueError(f"--from {args.start_images!r}: images of shape {images.shape}; the model draws "
                         f"(n, {', '.join(map(str, sample_shape))}) with n >= 1")
    return to_model_units(torch.from_numpy(images.astype(np.float64)).to(torch.get_default_dtype()))


def _check_writable(path: Path):
    """Create `path`'s folder, and write there once (an existing file: open it for appending, which
    changes nothing), so that a run never ends unable to save what it drew."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, "ab"):
            pass
        return
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:  # name the folder, not the probe's random name
        raise OSError(e.errno, e.strerror, str(path.parent)) from None


def _sample_chunks(model, sde, sample_shape, n, args, **kwargs) -> int:
    from .chunked import _chunks_on_disk, sample_to_disk

    start, batch_size = time.perf_counter(), args.batch_size or 1000
    try:
        run = sample_to_disk(model, sde, n, args.out, sample_shape=sample_shape, batch_size=batch_size,
                             seed=args.seed, solver=args.solver, device=args.device, progress=sys.stderr.isatty(),
                             **_solver_options(args), **kwargs)
    except KeyboardInterrupt:
        if _dist.is_main():  # under torchrun, one line from rank 0
            finished = len(_chunks_on_disk(Path(args.out)))
            print(f"scoresde sample: interrupted: {finished} of {-(-n // batch_size)} chunk(s) are finished in "
                  f"{args.out}; rerun the same command to draw the rest", file=sys.stderr)
        return 130
    if not _dist.is_main():  # under torchrun: the run's summary (over every rank) once, from rank 0
        return 0
    print(f"wrote {n} samples in {run.chunks} chunk(s) to {run.out_dir} (drew {run.drawn}, found {run.skipped} "
          f"finished) wall={time.perf_counter() - start:.3f}s; read them with scoresde.load_samples")
    return 0


def _timed_sample(model, sde, shape, args, x_start=None):
    options = _solver_options(args)
    if x_start is not None:  # SDEdit: the images give the shape
        options.update(x_start=x_start.to(args.device), t_start=args.t_start)
    else:
        options.update(shape=shape)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    x, info = sample(model, sde, solver=args.solver, generator=generator, device=args.device,
                     return_info=True, progress=sys.stderr.isatty(), **options)
    shape = tuple(x.shape)
    if x.device.type == "cuda":
        torch.cuda.synchronize()  # sync: the wall time below must include the GPU's work
    wall = time.perf_counter() - start
    edit = "" if x_start is None else f" t_start={info.t_start:g} (edited the --from images)"
    print(f"solver={info.solver} steps={info.steps} NFE={info.nfe} wall={wall:.3f}s n={shape[0]}{edit}")
    return x, info, wall


def _write(data: torch.Tensor, out: str, picture):
    """Write to --out (its suffix checked by `_check_out`: .npy or .png)."""
    if out.endswith(".npy"):
        import numpy as np

        np.save(out, data.detach().cpu().numpy())
    else:
        picture(out)
    print(f"wrote {out}")


def _tune(args) -> int:
    from .tuning import tune_grid

    if not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out!r}: expected a file name ending in .json")
    _check_writable(Path(args.out))
    if args.model == "mixture":
        sde = VPSDE.linear()
        model, shape, model_id = GaussianMixture.ring2d(sde), (2,), MIXTURE
    else:
        from .pretrained import load_model

        loaded = load_model(args.model, device=args.device)
        model, sde, shape, model_id = loaded.denoiser, loaded.sde, loaded.sample_shape, loaded.identity()
    tuned = tune_grid(model, sde, solver=args.solver, nfe=args.nfe, shape=shape, n=args.n, iterations=args.iterations,
                      device=args.device, generator=torch.Generator().manual_seed(args.seed),
                      progress=sys.stderr.isatty(), model_name=model_id)
    start = tuned.validation["initial"]
    print(f"tuned {tuned.solver} at NFE {tuned.nfe} ({tuned.steps} steps) in {tuned.seconds:.1f}s: held-out distance "
          f"to the teacher {tuned.validation['tuned']:.4g}, against {tuned.validation['fixed'][start]:.4g} for the "
          f"best fixed grid ({start}); times {', '.join(f'{t:.4g}' for t in tuned.times.tolist())}")
    print(f"wrote {tuned.save(args.out)}; sample with: scoresde sample --solver {tuned.solver} --grid {args.out}"
          + ("" if args.model is None else f" --model {args.model}"))
    return 0


def _train(args) -> int:
    from .train.config import apply_overrides, preset
    from .train.loop import TrainingInterrupted, train

    config = apply_overrides(preset(args.preset), args.set)
    if args.out:
        config.out = args.out
    if args.device:
        config.device = args.device
    try:
        last = train(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
            print(f"scoresde train: {stop}; resume with: {_resume_command(args.argv)}", file=sys.stderr)
        return 128 + stop.signum
    print(f"last checkpoint: {last}")
    return 0


def _resume_command(argv: list[str]) -> str:
    """The command line that continues this run: this one, with --resume and without --overwrite
    (or its abbreviations, which argparse accepts)."""
    words = [w for w in argv if not (w.startswith("--ov") and "--overwrite".startswith(w))]
    if not any(w.startswith("--r") and "--resume".startswith(w) for w in words):
        words.append("--resume")
    command = shlex.join(["scoresde", *words])
    return f"{command} (under torchrun, as this run)" if "RANK" in os.environ else command


def _presets(args) -> int:
    from . import nn as networks
    from .train.config import PRESETS

    print("networks (model=...):")
    for name in networks.PRESETS:
        print(f"  {name:8s} {networks.describe(networks.from_preset(name))}")
    print("training (scoresde train --preset ...):")
    for name, config in PRESETS.items():
        print(f"  {name:8s} data={config.data} model={config.model} steps={config.steps} "
              f"batch_size={config.batch_size} lr={config.lr}")
    return 0


def _export(args) -> int:
    from .pretrained import export_model

    print(f"wrote {export_model(args.checkpoint, args.out)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark suite's parser lives with it
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        return _run(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        # Bad input (and a full disk, a NaN model, a folder another run writes to) gets its message,
        # not a traceback.
        print(f"scoresde {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        print(f"scoresde {args.command}: error: out of memory ({_first_line(err)}): {_memory_hint(args)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scoresde {args.command}: interrupted{_nothing_lost(args)}", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "sample":
        args.folder = _check_out(args)
        return _sample_mixture(args) if args.model == "mixture" else _sample_model(args)
    if args.command == "train":
        return _train(args)
    if args.command == "likelihood":
        return _likelihood(args)
    if args.command == "presets":
        return _presets(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "train-features":
        return _train_features(args)
    return _export(args)


# What torch's CPU allocator says when an allocation fails (it raises a plain RuntimeError).
_CPU_ALLOCATOR = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def _out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, (MemoryError, oom)) or any(text in str(err) for text in _CPU_ALLOCATOR)


def _first_line(err: BaseException, limit: int = 120) -> str:
    """The allocator's first line, without c10's "[enforce fail at alloc_cpu.cpp:N] data." prefix."""
    lines = re.sub(r"^\[enforce fail at [^\]]*\]\s*(data\.\s*)?", "", str(err).strip()).splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _memory_hint(args) -> str:
    """What to make smaller after running out of memory."""
    if args.command == "train":
        return ("lower batch_size (--set batch_size=...), or raise grad_accum (--set grad_accum=...) to split "
                "each batch into smaller ones; sample_n sizes the pictures' batch")
    if args.command == "sample" and getattr(args, "folder", False):
        return f"lower --batch-size (now {args.batch_size or 1000})"
    if args.command == "sample":
        given = f" (now {args.n})" if args.n else ""
        return f"lower --n{given}, or draw in chunks: --out DIR/ --batch-size 100"
    if args.command == "likelihood":
        return f"lower --n (now {args.n}), or use --divergence hutchinson"
    return "use a smaller input"


def _nothing_lost(args) -> str:
    if args.command in ("sample", "tune"):  # tune: Ctrl-C during its iterations writes the best grid so far
        return ": nothing written"
    if args.command == "train":
        return " before the first step: nothing saved"
    return ""


if __name__ == "__main__":
    sys.exit(main())
