"""Conversions between eps, score, x0 and v predictions, and the `Denoiser` model wrapper.

With x = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:
score = -eps / sigma,  x0 = (x - sigma eps) / alpha,  v = alpha eps - sigma x0.
This module is the one place these conversions live.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._util import F64, MAX_CHAIN, as_time, check_batch_time, check_count, check_tensor, per_sample
from .sde import VPSDE

PREDICTIONS = ("eps", "x0", "v", "score")
TIME_INPUTS = ("t", "index")


# ---- conversions (alpha, sigma: Python floats or tensors broadcastable against x) ----------
def eps_to_x0(x, eps, alpha, sigma):
    return (x - sigma * eps) / alpha


def x0_to_eps(x, x0, alpha, sigma):
    return (x - alpha * x0) / sigma


def eps_to_score(eps, sigma):
    return -eps / sigma


def score_to_eps(score, sigma):
    return -sigma * score


def eps_to_v(x, eps, alpha, sigma):
    return alpha * eps - sigma * eps_to_x0(x, eps, alpha, sigma)


def v_to_eps(x, v, alpha, sigma):
    return alpha * v + sigma * x


def to_eps(prediction: str, out, x, alpha, sigma):
    """A network output of kind `prediction` as eps."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return x0_to_eps(x, out, alpha, sigma)
    if prediction == "v":
        return v_to_eps(x, out, alpha, sigma)
    return score_to_eps(out, sigma)


def from_eps(prediction: str, eps, x, alpha, sigma):
    """eps as a quantity of kind `prediction` (the inverse of `to_eps`)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return eps_to_x0(x, eps, alpha, sigma)
    if prediction == "v":
        return eps_to_v(x, eps, alpha, sigma)
    return eps_to_score(eps, sigma)


def declared_sample_shape(model) -> tuple | None:
    """The per-sample shape a model declares, if it declares one (mixtures, our UNet and MLP)."""
    for obj in (model, getattr(model, "net", None)):
        for attr in ("sample_shape", "event_shape"):
            shape = getattr(obj, attr, None)
            if isinstance(shape, (tuple, list, torch.Size)):
                return tuple(shape)
        if isinstance(getattr(obj, "in_channels", None), int) and isinstance(getattr(obj, "image_size", None), int):
            return (obj.in_channels, obj.image_size, obj.image_size)
        if isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "dim", None), int):
            return (obj.dim,)
    return None


# ---- the wrapper ------------------------------------------------------------------------------
class Denoiser:
    """Wraps any network as an eps-model on continuous time t in [0, 1].

    Calling it gives eps; `x0`, `score`, `v` and `predict(kind, ...)` give the other predictions,
    converted with the schedule's alpha_t and sigma_t. A network returning an object with a
    `.sample` tensor (diffusers' UNet2DModel) also works.

    Args:
        net: the network, net(x, time) -> its prediction, of x's shape.
        sde: the schedule it was trained on.
        prediction: what the network outputs: "eps", "x0", "v" or "score".
        time_input: what the network takes as its time argument: "t", continuous t (a (batch,)
            tensor in x's dtype); "index", the 0-based DDPM index t N - 1 (diffusers' convention),
            N = `num_steps` or the discrete sde's chain length; or a callable f(t) -> network
            input, given a float64 (batch,) tensor of t.
        num_steps: the chain length N of an index-time network on a continuous sde.

    Raises:
        TypeError, ValueError: an argument that is wrong, named with its value and what is allowed.
    """

    def __init__(self, net: Callable, sde: VPSDE, prediction: str = "eps", time_input: str | Callable = "t",
                 num_steps: int | None = None):
        if not callable(net):
            raise TypeError(f"net={net!r}: expected a callable network net(x, time)")
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
        if not isinstance(prediction, str) or prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")
        if not callable(time_input) and (not isinstance(time_input, str) or time_input not in TIME_INPUTS):
            raise ValueError(f"time_input={time_input!r}: expected one of {TIME_INPUTS} or a callable")
        if num_steps is not None:
            check_count("num_steps", num_steps, maximum=MAX_CHAIN)
        if time_input == "index" and num_steps is None and sde.num_steps is None:
            raise ValueError("time_input='index' needs num_steps=N (the network's training chain length) "
                             "for a continuous sde")
        self.net, self.sde, self.prediction = net, sde, prediction
        self.time_input, self.num_steps = time_input, num_steps

    def __repr__(self):
        return f"Denoiser({type(self.net).__name__}, prediction={self.prediction!r}, time_input={self.time_input!r})"

    def _net_time(self, t, x):
        """The network's time argument for time t (a float or a tensor), as a (batch,) tensor."""
        batch = (x.shape[0],)
        if isinstance(t, (int, float)):  # host scalars: a fill kernel, no host-to-device copy
            if callable(self.time_input):
                return self.time_input(torch.full(batch, float(t), dtype=F64, device=x.device))
            if self.time_input == "index":
                t = self.sde.t_to_index(float(t), self.num_steps) - 1  # 0-based, as diffusers expects
            return torch.full(batch, float(t), dtype=x.dtype, device=x.device)
        t = as_time(t, device=x.device).expand(batch)
        if callable(self.time_input):
            return self.time_input(t)
        if self.time_input == "index":
            t = self.sde.t_to_index(t, self.num_steps) - 1
        return t.to(x.dtype)

    def _alpha_sigma(self, t, x):
        if isinstance(t, (int, float)):  # host floats: CPU float64 math, no device round trip
            alpha, sigma = self.sde.alpha_sigma(torch.tensor(float(t), dtype=F64))
            return float(alpha), float(sigma)
        alpha, sigma = self.sde.alpha_sigma(as_time(t, device=x.device))
        return per_sample(alpha, x), per_sample(sigma, x)

    def _raw(self, x, t):
        check_batch_time(t, check_tensor("x", x))
        return self._net(x, t)

    def _net(self, x, t):
        """The network's output at (x, t), unchecked: for callers that formed x and t themselves."""
        out = self.net(x, self._net_time(t, x))
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "sample", out)  # diffusers returns a UNet2DOutput
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"net (the model) returned {type(out).__name__}, expected a tensor")
        return out

    def predict(self, kind: str, x, t):
        """The model's prediction of `kind` ("eps", "x0", "v", "score") at (x, t)."""
        if not isinstance(kind, str) or kind not in PREDICTIONS:
            raise ValueError(f"kind={kind!r}: expected one of {PREDICTIONS}")
        out = self._raw(x, t)
        if kind == self.prediction:
            return out
        alpha, sigma = self._alpha_sigma(t, x)
        divides_by_sigma = self.prediction == "x0" or kind == "score"
        if isinstance(sigma, float) and sigma == 0 and divides_by_sigma:  # host floats only: a free check
            raise ValueError(f"t={t!r}: sigma(t) = 0 (the data end), where a {self.prediction} model's {kind} is "
                             "undefined; expected t > 0")
        if isinstance(alpha, float) and alpha == 0 and kind in ("x0", "v"):  # both go through x0 = (x - sigma eps)/alpha
            raise ValueError(f"t={t!r}: alpha(t) = 0 (no signal left), where a {self.prediction} model's {kind} is "
                             f"undefined; expected a t where alpha > 0, such as t <= T = {self.sde.T}")
        return from_eps(kind, to_eps(self.prediction, out, x, alpha, sigma), x, alpha, sigma)

    def eps(self, x, t):
        if self.prediction == "eps":  # the common case, on every solver step: skip the conversion
            return self._raw(x, t)
        return self.predict("eps", x, t)

    def x0(self, x, t):
        return self.predict("x0", x, t)

    def score(self, x, t):
        return self.predict("score", x, t)

    def v(self, x, t):
        return self.predict("v", x, t)

    __call__ = eps
