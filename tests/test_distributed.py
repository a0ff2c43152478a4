"""Many processes under torchrun: `sample_to_disk` (and `scoresde sample --out DIR/`) splits its
chunks over the ranks and writes the folder one process writes, bit for bit; `scoresde likelihood`
splits the images and prints what one process prints; rank 0's refusals and one rank's failure reach
every rank. The torchrun tests launch real processes on the gloo backend (`slow`: each launch costs
several seconds of start-up on a small machine); the rest run in process."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import scoresde as sd
from scoresde import _dist, chunked, cli
from scoresde._lock import folder_lock

ROOT = Path(__file__).resolve().parents[1]
# A cheap run: 5 chunks of the exact mixture (rank 0 of 2 draws chunks 0, 2, 4; rank 1 draws 1, 3).
SAMPLE = ["sample", "--model", "mixture", "--n", "50", "--batch-size", "10", "--solver", "heun", "--steps", "2"]


def torchrun(nproc: int, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=nproc ARGS` (a free port of its
    own), one thread per process. Module arguments go after `--`: torchrun's own parser would take
    `--n` for an abbreviation of its `--nnodes`/`--nproc-per-node`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def files(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` (hidden ones too: no lock or temporary file may stay behind)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, bytes]:
    """The folder one process writes (in this process: the same code as `python -m scoresde`)."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli.main([*SAMPLE, "--out", f"{out}/"]) == 0
    return files(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    run = torchrun(2, "-m", "scoresde", "--", *SAMPLE, "--out", f"{out}/")
    return out, run


# ---- in process ----------------------------------------------------------------------------------
def test_rank_world_and_shard_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _dist.rank_and_world() == (0, 1) and _dist.is_main()
    assert _dist.shard(range(5)) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _dist.rank_and_world() == (1, 3) and not _dist.is_main()
    assert _dist.shard(list(range(8))) == [1, 4, 7] and _dist.shard("abcdefg") == ["b", "e"]
    assert _dist.local_device("cuda") == "cuda:1" and _dist.local_device("cpu") == "cpu"
    assert _dist.local_device("cuda:0") == "cuda:0"  # an explicit index is the caller's choice
    monkeypatch.setenv("RANK", "2")
    assert _dist.shard(range(2)) == []  # more ranks than items: an empty share


def test_one_process_helpers_are_plain_calls(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    thing = object()
    assert _dist.gather_to_main(thing) == [thing] and _dist.broadcast_from_main(thing) is thing
    _dist.barrier()
    assert _dist.on_main(lambda: 7) == 7 and _dist.on_every_rank(lambda: 8) == [8]
    error = ValueError("refused")

    def refuse():
        raise error

    for helper in (_dist.on_main, _dist.on_every_rank):
        with pytest.raises(ValueError) as raised:
            helper(refuse)
        assert raised.value is error  # the error itself, not a copy
    with _dist.process_group() as (rank, world):
        assert (rank, world) == (0, 1)


def test_split_chunks_in_process_make_the_one_process_folder(tmp_path, monkeypatch, capsys):
    """The chunk -> rank map with the collectives stubbed: ranks 0..3 of 4 run one after another on
    one folder of 3 chunks; rank 3 has none and says so; the folder equals one process's."""
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    kwargs = dict(sample_shape=(2,), batch_size=4, seed=3, solver="heun", steps=2, progress=False)
    sd.sample_to_disk(mixture, sde, 10, tmp_path / "one", **kwargs)
    drawn, decided = [], []

    def on_main(decide):  # rank 0 decides (lock, manifest, the chunks found), the others get its answer
        if not decided:
            decided.append(decide())
        return decided[0]

    for rank in range(4):
        monkeypatch.setattr(_dist, "process_group", lambda device=None, rank=rank: _yield((rank, 4)))
        monkeypatch.setattr(_dist, "on_main", on_main)
        monkeypatch.setattr(_dist, "on_every_rank", lambda work: [work()])
        drawn.append(sd.sample_to_disk(mixture, sde, 10, tmp_path / "four", **kwargs).drawn)
    assert drawn == [1, 1, 1, 0]
    assert capsys.readouterr().err.strip().splitlines() == [
        "sample_to_disk: rank 3 of 4 has no chunk to draw (3 of 3 chunk(s) missing, 4 processes); waiting for "
        "the others"]
    assert files(tmp_path / "four") == files(tmp_path / "one")


def _yield(value):
    import contextlib

    @contextlib.contextmanager
    def context():
        yield value

    return context()


def test_a_file_out_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for out in (["--out", "x.png"], ["--out", "x.npy"], []):  # [] : the default samples.png
        with pytest.raises(SystemExit) as exit_:
            cli.main(["sample", "--model", "mixture", *out])
        assert exit_.value.code == 2
        assert "under torchrun with 2 processes, --out must be a folder" in capsys.readouterr().err


def test_probe_values_split_a_batch_into_shares_that_agree_with_it():
    """What `scoresde likelihood` does per rank: the probes of the whole batch drawn once, each share
    evaluated with its columns, equals the whole batch evaluated with its generator."""
    import torch

    from scoresde import likelihood

    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = dict(divergence="hutchinson", probes=2, solver="heun", steps=3)
    whole = likelihood.log_likelihood(mixture, sde, x, generator=torch.Generator().manual_seed(0), **kwargs)
    z = likelihood._draw_probes("rademacher", 2, x, x.dtype, torch.Generator().manual_seed(0))
    for share in ([0, 2, 4], [1, 3, 5]):
        part = likelihood.log_likelihood(mixture, sde, x[share], probe_values=z[:, share], **kwargs)
        torch.testing.assert_close(part.nats, whole.nats[share], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"probe_values: shape \(2, 3, 2\), expected"):
        likelihood.log_likelihood(mixture, sde, x, probe_values=z[:, :3], **kwargs)
    with pytest.raises(ValueError, match="divergence='exact'"):
        likelihood.log_likelihood(mixture, sde, x, probe_values=z, **{**kwargs, "divergence": "exact"})
    with pytest.raises(TypeError, match="probe_values: expected a float tensor"):
        likelihood.log_likelihood(mixture, sde, x, probe_values=z.long(), **kwargs)


# ---- real processes under torchrun ---------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_write_the_one_process_folder_bit_for_bit(two_processes, one_process):
    out, run = two_processes
    assert run.returncode == 0, run.stderr[-3000:]
    summary = [line for line in run.stdout.splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1 and "in 5 chunk(s)" in summary[0] and "(drew 5, found 0 finished)" in summary[0]
    assert files(out) == one_process  # every chunk's bytes and the manifest; no lock or temporary file left


@pytest.mark.slow
def test_a_half_finished_two_process_folder_is_finished_by_one_process(two_processes, one_process, tmp_path,
                                                                        capsys):
    """A kill leaves finished chunks (each written atomically) and perhaps a temporary file: chunks of
    both ranks missing, a leftover beside them. One process draws the missing ones."""
    out, run = two_processes
    assert run.returncode == 0, run.stderr[-3000:]
    half = tmp_path / "half"
    shutil.copytree(out, half)
    for k in (1, 4):  # one of rank 1's chunks, one of rank 0's
        (half / chunked.chunk_name(k)).unlink()
    (half / ".chunk_000001.npy.tmp-0123abcd").write_bytes(b"half a chunk")
    assert cli.main([*SAMPLE, "--out", f"{half}/"]) == 0
    assert "(drew 2, found 3 finished)" in capsys.readouterr().out
    assert files(half) == one_process


@pytest.mark.slow
def test_more_processes_than_chunks(tmp_path):
    """3 processes, 2 chunks: rank 2 says it has nothing to draw and waits; the folder is one
    process's."""
    args = ["sample", "--model", "mixture", "--n", "20", "--batch-size", "10", "--solver", "heun", "--steps", "2"]
    run = torchrun(3, "-m", "scoresde", "--", *args, "--out", f"{tmp_path / 'three'}/")
    assert run.returncode == 0, run.stderr[-3000:]
    idle = [line for line in run.stderr.splitlines() if "has no chunk to draw" in line]
    assert len(idle) == 1 and "rank 2 of 3" in idle[0] and "waiting for the others" in idle[0]
    assert sum(line.startswith("wrote 20 samples in 2 chunk(s)") for line in run.stdout.splitlines()) == 1
    assert cli.main([*args, "--out", f"{tmp_path / 'one'}/"]) == 0
    assert files(tmp_path / "three") == files(tmp_path / "one")


SCRIPT = r"""
import faulthandler, json, os, sys
faulthandler.dump_traceback_later(120, exit=True)  # a hang: tracebacks and out, not the 300 s timeout
import scoresde as sd
from scoresde.chunked import sample_to_disk

folder, rank = sys.argv[1], int(os.environ["RANK"])
sde = sd.VPSDE.linear()
mixture = sd.GaussianMixture.ring2d(sde)


def nan_on_rank_1(x, t):
    eps = mixture(x, t)
    return eps * float("nan") if rank == 1 else eps


kwargs = dict(sample_shape=(2,), batch_size=10, solver="heun", steps=2, progress=False)
for name, model, seed in (("locked", mixture, 0), ("nan", nan_on_rank_1, 0), ("other", mixture, 1),
                          ("resume", mixture, 0)):
    try:
        run = sample_to_disk(model, sde, 50, os.path.join(folder, name), seed=seed, **kwargs)
        outcome = {"drawn": run.drawn, "skipped": run.skipped, "chunks": run.chunks}
    except Exception as error:
        outcome = {"error": type(error).__name__, "message": str(error), "notes": getattr(error, "__notes__", [])}
    with open(os.path.join(folder, f"outcomes_{rank}.jsonl"), "a") as log:  # not stdout: the ranks share it
        log.write(json.dumps({"rank": rank, "case": name, **outcome}) + "\n")
"""


@pytest.mark.slow
def test_refusals_and_failures_reach_every_rank(tmp_path):
    """Under 2 processes, in one launch (the process group started and ended by each call): rank 0's
    refusals (a folder another process holds; a folder of other arguments) and rank 1's NaN raise on
    both ranks, no rank left waiting; then a half-finished one-process run is finished by the two."""
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    kwargs = dict(sample_shape=(2,), batch_size=10, solver="heun", steps=2, progress=False)
    for name in ("locked", "reference"):
        (tmp_path / name).mkdir()
    sd.sample_to_disk(mixture, sde, 50, tmp_path / "reference", **kwargs)
    sd.sample_to_disk(mixture, sde, 20, tmp_path / "other", **kwargs)  # chunks of another n
    shutil.copytree(tmp_path / "reference", tmp_path / "resume")
    for k in (0, 3):
        (tmp_path / "resume" / chunked.chunk_name(k)).unlink()
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    with folder_lock(tmp_path / "locked"):
        run = torchrun(2, str(tmp_path / "script.py"), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    seen = [json.loads(line) for rank in (0, 1)
            for line in (tmp_path / f"outcomes_{rank}.jsonl").read_text().splitlines()]
    by = {(o["rank"], o["case"]): o for o in seen}
    assert len(by) == 8, seen
    for rank in (0, 1):
        locked, nan, other = by[rank, "locked"], by[rank, "nan"], by[rank, "other"]
        assert locked["error"] == "FolderLockedError" and f"PID {os.getpid()}" in locked["message"]
        assert nan["error"] == "FloatingPointError" and "chunk 1 (samples 10..19)" in nan["message"]
        assert other["error"] == "CheckpointError" and "n: saved 20, expected 50" in other["message"]
        assert by[rank, "resume"] == {"rank": rank, "case": "resume", "drawn": 2, "skipped": 3, "chunks": 5}
    assert by[0, "nan"]["notes"] == ["(raised on rank 1 of 2; this is rank 0)"] and by[1, "nan"]["notes"] == []
    assert by[1, "locked"]["notes"] == ["(raised on rank 0 of 2; this is rank 1)"]
    assert not (tmp_path / "locked" / chunked.MANIFEST).exists()  # refused before anything was written
    assert files(tmp_path / "resume") == files(tmp_path / "reference")


def _numbers(stdout: str) -> dict[str, float]:
    found = {}
    for key, pattern in (("nats", r"log-likelihood: (\S+) nats"), ("bpd", r"bits/dim: (\S+) \+- (\S+)")):
        match = re.search(pattern, stdout)
        assert match, stdout
        found[key] = float(match.group(1))
        if key == "bpd":
            found["se"] = float(match.group(2))
    return found


@pytest.mark.slow
def test_likelihood_under_two_processes_prints_what_one_prints(capsys):
    """5 digits, split 3 + 2: every image keeps its dequantization and its Hutchinson probe (drawn
    whole on every rank), and a fixed-step solver treats the images independently, so the two
    processes' numbers equal one process's up to the printed digits (the network's float rounding at
    another batch size is far below them)."""
    args = ["likelihood", "--n", "5", "--solver", "heun", "--steps", "2", "--no-progress"]
    assert cli.main(args) == 0
    one = capsys.readouterr().out
    run = torchrun(2, "-m", "scoresde", "--", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("bits/dim:") == 1 and "processes=2" in run.stdout and "NFE=4" in run.stdout
    assert "digits: 5 images" in run.stdout
    a, b = _numbers(one), _numbers(run.stdout)
    assert b["nats"] == pytest.approx(a["nats"], abs=2e-3)
    assert b["bpd"] == pytest.approx(a["bpd"], abs=2e-4) and b["se"] == pytest.approx(a["se"], abs=2e-4)
