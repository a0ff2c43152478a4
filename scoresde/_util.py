"""Small shared helpers: float64 time tensors, per-sample broadcasting, host scalars, and the
argument checks that public entry points share (each raises a TypeError or ValueError naming the
argument, its value and what is allowed)."""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch

F64 = torch.float64

# The most steps a grid or a chain may have: far more than any sampler needs (a float64 grid of them
# is 80 MB), and it stops an absurd count from failing deep inside an allocation or looping for days.
MAX_STEPS = 10**7
# The most steps of one sampling run: a solver plans every step's coefficients before its first model
# call, in host memory that grows with the steps (gigabytes at MAX_STEPS); 10^5 is far beyond any sampler.
MAX_SAMPLING_STEPS = 10**5
# The longest DDPM chain an index time may refer to: n/N and t N stay exact in float64.
MAX_CHAIN = 2**53
MAX_SEED = 2**32 - 1  # seeds are 32-bit ints, as numpy's legacy seeding takes them


def as_time(t, device=None, name: str = "t") -> torch.Tensor:
    """Any time input (float, sequence, tensor) as a float64 tensor."""
    if isinstance(t, torch.Tensor):
        if t.is_complex():
            raise TypeError(f"{name}: expected real times, got a {t.dtype} tensor")
        return t.to(dtype=F64, device=device if device is not None else t.device)
    if isinstance(t, (bool, str, bytes)):  # torch would read True as 1.0 and choke on strings
        raise TypeError(f"{name}={t!r}: expected a float, a sequence of floats or a tensor of times")
    try:
        return torch.as_tensor(t, dtype=F64, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise TypeError(f"{name}={t!r}: expected a float, a sequence of floats or a tensor of times "
                        f"({err})") from None


def as_path(name: str, value) -> Path:
    """A path argument (str or os.PathLike) as a Path."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}={value!r}: expected a path (str or os.PathLike)")
    return Path(value)


def check_count(name: str, value, *, minimum: int = 1, maximum: int | None = MAX_STEPS) -> int:
    """An int (not a bool) in [minimum, maximum]: step counts, chain lengths, probe counts."""
    allowed = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected {allowed}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}={value!r}: expected {allowed}")
    return value


def show_bound(bound: float) -> str:
    """A bound as people write it: 0 and 1 rather than 0.0 and 1.0, 10000000 rather than 1e+07."""
    if isinstance(bound, numbers.Integral) or (float(bound).is_integer() and abs(bound) < 1e16):
        return str(int(bound))
    return repr(float(bound))


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """' in [0, 1]', ' > 0', ' <= 3', or '' for the whole line."""
    if high == math.inf:
        return "" if low == -math.inf else f" {'>' if low_open else '>='} {show_bound(low)}"
    if low == -math.inf:
        return f" {'<' if high_open else '<='} {show_bound(high)}"
    return f" in {'(' if low_open else '['}{show_bound(low)}, {show_bound(high)}{')' if high_open else ']'}"


def check_number(name: str, value, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, finite: bool = True) -> float:
    """A real number (not a bool, not a tensor) in the interval, as a Python float."""
    allowed = f"expected a {'finite ' if finite else ''}number{interval(low, high, low_open, high_open)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: {allowed}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        x = math.inf if value > 0 else -math.inf
    inside = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)  # NaN: False
    if not inside or (finite and math.isinf(x)):
        raise ValueError(f"{name}={value!r}: {allowed}")
    return x


def check_flag(name: str, value) -> bool:
    """True or False, nothing that merely converts to one (a tensor, a string, a number)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected True or False")
    return value


def check_tensor(name: str, value, *, min_ndim: int = 1) -> torch.Tensor:
    """A floating tensor with at least `min_ndim` dimensions (the batch first)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim < min_ndim:
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise TypeError(f"{name}: expected a floating tensor of shape (batch, ...), got {got}")
    return value


def check_batch_time(t, x: torch.Tensor, name: str = "t"):
    """t for a batch x: a number, or a tensor of shape (), (1,) or (batch,) with values to read on
    x's device. Shapes and devices only: no host read, so it may run on every solver step."""
    if isinstance(t, torch.Tensor):
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"{name}: expected a number or a tensor of shape () or (batch,) = ({x.shape[0]},), "
                             f"got shape {tuple(t.shape)}")
        if t.device.type == "meta" and x.device.type != "meta":
            raise ValueError(f"{name}: a meta tensor holds no times to move to x's device {x.device}")
        if t.is_complex():
            raise TypeError(f"{name}: expected real times, got a {t.dtype} tensor")
    elif isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{name}={t!r}: expected a float or a tensor of shape () or (batch,)")
    else:
        check_number(name, t, low=0.0)  # a host time: finite and >= 0 (free to check: no device read)
    return t


def check_shape(name: str, value) -> tuple:
    """A shape: a non-empty tuple (or list, torch.Size) of ints >= 1, the batch first."""
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) < 1 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value):
        raise ValueError(f"{name}={value!r}: expected a tuple of ints >= 1, batch first")
    if math.prod(value) > 2**63 - 1:  # torch counts elements in int64 (memory runs out long before)
        raise ValueError(f"{name}={tuple(value)}: more than 2**63 - 1 elements")
    return tuple(value)


def check_device(name: str, value) -> torch.device:
    """A torch.device (or its name, e.g. "cpu", "cuda:1") that this machine has; "meta" passes."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name}={value!r}: expected a torch.device or a device name such as 'cpu' or 'cuda:0'")
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{name}={value!r}: not a device ({err})") from None
    try:
        torch.empty(0, device=device)  # no data, no kernel: fails only where the device is missing
    except (RuntimeError, AssertionError) as err:  # torch asserts when it was built without CUDA
        raise ValueError(f"{name}={value!r}: this device is not available here ({err})") from None
    return device


def per_sample(coef, x: torch.Tensor):
    """Broadcast a per-sample coefficient of shape (batch,) against x (batch, ...).

    Python floats and 0-d tensors pass through unchanged; tensors are cast to x's dtype.
    """
    if not isinstance(coef, torch.Tensor):
        return coef
    coef = coef.to(dtype=x.dtype, device=x.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def host_floats(values: torch.Tensor) -> list:
    """Per-step coefficients as Python floats, computed once before a sampling loop.

    The schedule math runs on CPU in float64, so this is no device synchronisation; Python
    floats then enter each step as kernel arguments, with no tensor indexing in the loop.
    """
    if values.device.type != "cpu":
        raise ValueError("host_floats expects CPU schedule tensors")
    return values.tolist()  # sync: none, CPU tensor


def positive_int_argument(text: str) -> int:
    """argparse `type` of the commands' counts (--n, --steps, --batch-size, --threads): an int >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def seed_argument(text: str) -> int:
    """argparse `type` of the commands' --seed: an int in [0, MAX_SEED]."""
    import argparse

    try:
        return check_count("--seed", int(text), minimum=0, maximum=MAX_SEED)
    except ValueError as err:  # int() of a non-number, or out of range
        message = str(err) if str(err).startswith("--seed") else f"--seed={text!r}: not an int"
        raise argparse.ArgumentTypeError(message) from None


def device_argument(text: str) -> str:
    """argparse `type` of the commands' --device: a device this machine has, not "meta" (a command
    writes real numbers)."""
    import argparse

    try:
        device = check_device("--device", text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(f"--device={text!r}: a meta tensor holds no numbers to write; "
                                         "use cpu or cuda")
    return text

