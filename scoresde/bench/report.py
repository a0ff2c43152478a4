"""What the parts of the benchmark suite share: the run's environment (device, peers, machine,
versions), Markdown tables and timing helpers."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

# Libraries the suite runs beside ours. diffusers is optional (the `bench` extra); torchdiffeq and
# torchsde are dependencies of scoresde, checked the same way so that a broken install says so.
PEERS = ("diffusers", "torchdiffeq", "torchsde")
VERSIONS = ("scoresde", "torch", "numpy", "scipy", "matplotlib", *PEERS)


@dataclass
class Env:
    """Where the suite runs: the torch device and the peers that could be imported (None: skipped,
    with the reason in `skipped`)."""

    device: torch.device
    peers: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @classmethod
    def detect(cls, device=None) -> Env:
        try:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r}: expected a torch device such as 'cpu' or 'cuda:0'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available here; use 'cpu'")
        env = cls(device)
        for name in PEERS:
            try:
                env.peers[name] = importlib.import_module(name)
            except ImportError as err:
                env.peers[name] = None
                env.skipped[name] = f"cannot import it ({err}); pip install -e \".[bench]\" from the repository root"
        return env

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def machine(env: Env) -> dict:
    """The hardware and load the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "device": str(env.device),
            "gpu": torch.cuda.get_device_name(env.device) if env.cuda else None}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info


def versions() -> dict:
    """Installed versions of scoresde, torch and the peers (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A Markdown table; `align` holds one letter per column, 'l', 'r' or 'c' (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = [{"l": "---", "r": "---:", "c": ":---:"}[a] for a in align]
    return ["| " + " | ".join(map(str, line)) + " |" for line in [header, rule, *rows]]


def fmt(value, spec: str) -> str:
    """`value` formatted with `spec`, or a dash for a missing value."""
    return "—" if value is None else format(value, spec)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: a wall time must include the GPU's work


def timed(fn, device: torch.device):
    """fn()'s result, its wall time and the process's CPU time (all threads), in seconds."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def median(values):
    return statistics.median(values) if values else None
