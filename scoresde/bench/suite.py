"""`scoresde bench`: the whole benchmark suite under one progress bar.

    scoresde bench [--quick] [--out results/bench] [--only quality speed train real] [--threads N] [--device D]

Writes into --out: results.json (every raw number, with the machine, versions, command and date),
results.md (the tables) and PNG plots: quality_<problem>.png (quality against NFE, log-log),
speed.png (time per model call), and with the real part real_fd_time.png and real_fd_nfe.png
(Fréchet distance of the digits network's samples against time per sample and against NFE).
Peers it cannot import are skipped, and it says which. The full suite runs every part; --quick
leaves out real (every fixed-step solver on the shipped digits network, measured by
`scoresde.evaluate`: minutes even in its quick profile) unless --only names it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._util import positive_int_argument
from . import quality, real, speed, training
from .report import Env, machine, versions

PARTS = {"quality": quality, "speed": speed, "train": training, "real": real}
QUICK_PARTS = ("quality", "speed", "train")  # --quick's default: real takes minutes even when quick


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scoresde bench", description="Run the benchmark suite and write "
                                "results.json (raw), results.md (tables) and PNG plots into --out.",
                                epilog="Parts: quality (exact mixtures, against diffusers), speed (real "
                                       "networks: time per sample and per NFE, ratio to bare forwards, "
                                       "peak memory), train (training images/s), real (every fixed-step "
                                       "solver, the shipped tuned grids and diffusers on the shipped digits "
                                       "network: Fréchet distance, precision/recall, coverage and replication "
                                       "against time per sample; --quick runs it only when --only names it).")
    p.add_argument("--quick", action="store_true", help="a small version of every part (quality, speed and "
                                                         "train: under two minutes on 2 CPU cores; real: about "
                                                         "five)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a smoke run, for the tests
    p.add_argument("--out", default="results/bench", help="results folder (default: results/bench)")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=None, metavar="PART",
                   help=f"run only these parts, of {', '.join(PARTS)} (default: all; with --quick: "
                        f"{' '.join(QUICK_PARTS)})")
    p.add_argument("--threads", type=positive_int_argument, default=None,
                   help="torch threads (default: torch's; 1 gives steadier numbers on a busy machine)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    try:
        parts = args.only or (list(PARTS) if profile == "full" else list(QUICK_PARTS))
        return run_parts({name: profile for name in parts}, out=args.out, threads=args.threads,
                         device=args.device, command="scoresde bench", argv=argv, profile=profile)
    except ValueError as err:  # bad input gets its message, not a traceback
        print(f"scoresde bench: error: {err}", file=sys.stderr)
        return 2


def run_parts(parts: dict, *, out, threads=None, device=None, command="scoresde bench", argv=None,
              profile=None) -> int:
    """Run `parts` ({name: a profile name or that part's options}) and write the results to `out`."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads!r}: expected an int >= 1")
        torch.set_num_threads(threads)
    env = Env.detect(device)
    for name, reason in env.skipped.items():
        print(f"skipped peer {name}: {reason}")
    opts = {name: PARTS[name].options(o, env) if isinstance(o, str) else o for name, o in parts.items()}
    meta = {"command": " ".join([command, *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "profile": profile,
            "machine": machine(env), "versions": versions(), "skipped_peers": env.skipped}
    start = time.perf_counter()
    rows = run_units(opts, env)
    meta["seconds"] = time.perf_counter() - start
    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    results = {"meta": meta, **{name: PARTS[name].summarize(rows[name], o) for name, o in opts.items()}}
    write(results, Path(out))
    print(f"wrote {Path(out) / 'results.json'}, results.md and {len(results['meta']['plots'])} plot(s) "
          f"in {meta['seconds']:.0f} s")
    return 0


def run_units(opts: dict, env: Env) -> dict:
    """Every part's units, in order, under one progress bar; the rows each part returned."""
    work = [(name, label, fn) for name, o in opts.items() for label, fn in PARTS[name].units(o, env)]
    rows = {name: [] for name in opts}
    with tqdm(total=len(work), unit="case", desc="scoresde bench", dynamic_ncols=True) as bar:
        for name, label, fn in work:
            bar.set_postfix_str(label, refresh=True)
            rows[name] += fn()
            bar.update()
    return rows


def write(results: dict, out: Path):
    """results.json, the plots, then results.md (which shows them)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [name for name in PARTS if name in results]
    results["meta"]["plots"] = [png for name in parts for png in PARTS[name].plots(results[name], out)]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    """results.md: the run's header, then every part's tables."""
    parts = [name for name in PARTS if name in results]
    return "\n".join(_header(results["meta"]) + [line for name in parts
                                                  for line in PARTS[name].markdown(results[name])])


def _header(meta) -> list[str]:
    m, v = meta["machine"], meta["versions"]
    peers = ", ".join(f"{k} {v[k]}" for k in ("diffusers", "torchdiffeq", "torchsde") if v.get(k))
    skipped = "; ".join(f"{k} ({why})" for k, why in meta["skipped_peers"].items()) or "none"
    load = m.get("load_average")
    return ["# scoresde benchmarks", "",
            f"- Command: `{meta['command']}` ({meta['profile'] or 'custom'} profile), {meta['date']}, "
            f"{meta['seconds']:.0f} s",
            f"- Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s); device "
            f"{m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}",
            f"- Load average (1, 5, 15 min) at the start: {load}; at the end: {meta['load_average_end']}",
            f"- Versions: Python {v['python']}, scoresde {v['scoresde']}, torch {v['torch']}; peers: {peers}",
            f"- Skipped peers: {skipped}", ""]
