"""Predictions of a diffusion model, their conversions, and the `Denoiser` model wrapper.

With x = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:
score = -eps / sigma,  x0 = (x - sigma eps) / alpha,  v = alpha eps - sigma x0.
This module is the one place these conversions live. A model's output is a `Prediction`: the
value the network gave, in its own kind, converted to another kind only when asked for it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._util import F64, MAX_CHAIN, as_time, check_batch_time, check_count, check_tensor, per_sample
from .sde import VPSDE

PREDICTIONS = ("eps", "x0", "v", "score")
KINDS = PREDICTIONS + ("alpha_x0",)  # and alpha x0 = x - sigma eps, which multistep plans keep
TIME_INPUTS = ("t", "index")
VARIANCES = (None, "learned_range")
Time = float | torch.Tensor  # a float, a 0-d tensor, or a (batch,) tensor of per-sample times
Coef = float | torch.Tensor | None  # alpha_t or sigma_t: a float, a tensor broadcastable against x, or None


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


def convert(value: torch.Tensor, have: str, want: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """A prediction of kind `have` at x as kind `want`, in one conversion.

    `want` may also be "alpha_x0" = alpha x0 = x - sigma eps: one pass over the state fewer than
    x0, for a plan that folds 1/alpha into the weights that read it. eps to x0 is one fused
    multiply-add, then the division.
    """
    if have == want:
        return value
    if want == "alpha_x0" and have == "x0":
        return value * alpha
    eps = to_eps(have, value, x, alpha, sigma)
    if want not in ("x0", "alpha_x0"):
        return from_eps(want, eps, x, alpha, sigma)
    if isinstance(sigma, float):
        alpha_x0 = torch.add(x, eps, alpha=-sigma)
    else:
        alpha_x0 = torch.addcmul(x, eps, sigma, value=-1.0)
    return alpha_x0 if want == "alpha_x0" else alpha_x0.div_(alpha)


def schedule_at(sde: VPSDE, t, x: torch.Tensor):
    """(alpha_t, sigma_t) for samples x at time t: floats for a host time (float64 math on the CPU,
    no device round trip), else tensors broadcast against x."""
    if isinstance(t, (int, float)):
        alpha, sigma = sde.alpha_sigma(torch.tensor(float(t), dtype=F64))
        return float(alpha), float(sigma)
    alpha, sigma = sde.alpha_sigma(as_time(t, device=x.device))
    return per_sample(alpha, x), per_sample(sigma, x)


class Prediction:
    """A model's prediction at (x, t): the value it gave, in its own kind, converted on first use.

    `eps`, `x0`, `score` and `v` each convert `value` at most once and keep the result. The
    conversions use the alpha_t and sigma_t a solver holds (floats, or tensors that carry a
    grid's gradient), or, when none are given, the schedule's at t.

    Args:
        kind: what `value` is: "eps", "x0", "v" or "score".
        value: the prediction, a tensor of x's shape.
        x: the point x_t it was made at.
        t: its time: a float, a 0-d tensor, or a (batch,) tensor of per-sample times.
        sde: the schedule, for alpha_t and sigma_t when they are not given.
        alpha: alpha_t, a float or a tensor broadcastable against x; None: from `sde` at t.
        sigma: sigma_t, likewise.
        variance: a learned variance (Nichol & Dhariwal 2021's "learned range"): per element, the
            interpolation v in [-1, 1] between the log of the step's beta (v = 1) and of its
            posterior variance (v = -1); None when the model learns none.
    """

    __slots__ = ("kind", "value", "x", "t", "sde", "variance", "_schedule", "_as")

    def __init__(self, kind: str, value: torch.Tensor, x: torch.Tensor, t: Time, sde: VPSDE, alpha: Coef = None,
                 sigma: Coef = None, variance: torch.Tensor | None = None):
        self.kind, self.value, self.x, self.t, self.sde = kind, value, x, t, sde
        self.variance = variance  # a learned variance's interpolation v in [-1, 1] (iDDPM), or None
        self._schedule = None if alpha is None or sigma is None else (alpha, sigma)
        self._as: dict[str, torch.Tensor] = {}

    def __repr__(self):
        return f"Prediction({self.kind!r}, shape={tuple(self.value.shape)})"

    @property
    def alpha(self):
        """alpha_t: a float, or a tensor broadcastable against x."""
        return self.schedule[0]

    @property
    def sigma(self):
        """sigma_t: a float, or a tensor broadcastable against x."""
        return self.schedule[1]

    @property
    def schedule(self) -> tuple:
        """(alpha_t, sigma_t), computed from the schedule once if they were not given."""
        if self._schedule is None:
            self._schedule = schedule_at(self.sde, self.t, self.x)
        return self._schedule

    def as_kind(self, kind: str) -> torch.Tensor:
        """The prediction as `kind` ("eps", "x0", "v", "score", or "alpha_x0" = alpha x0), in x's dtype."""
        got = self._as.get(kind) if type(kind) is str else None
        if got is None:
            got = self._as[kind] = self._converted(kind)
        return got

    def _converted(self, kind: str) -> torch.Tensor:
        value = self.value
        if kind != self.kind:
            if not isinstance(kind, str) or kind not in KINDS:
                raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
            alpha, sigma = self.schedule
            self._check_defined(kind, alpha, sigma)
            value = convert(value, self.kind, kind, self.x, alpha, sigma)
        return value if value.dtype == self.x.dtype else value.to(self.x.dtype)

    def _check_defined(self, kind: str, alpha, sigma):
        """Refuse a conversion that divides by a host alpha or sigma of 0 (floats only: a free check)."""
        if isinstance(sigma, float) and sigma == 0 and (self.kind == "x0" or kind == "score"):
            raise ValueError(f"t={self.t!r}: sigma(t) = 0 (the data end), where a {self.kind} prediction's {kind} "
                             "is undefined; expected t > 0")
        if isinstance(alpha, float) and alpha == 0 and kind in ("x0", "v"):  # both through x0 = (x - sigma eps)/alpha
            raise ValueError(f"t={self.t!r}: alpha(t) = 0 (no signal left), where a {self.kind} prediction's {kind} "
                             f"is undefined; expected a t where alpha > 0, such as t <= T = {self.sde.T}")

    @property
    def eps(self) -> torch.Tensor:
        """The noise prediction."""
        return self.as_kind("eps")

    @property
    def x0(self) -> torch.Tensor:
        """The data prediction (x - sigma eps) / alpha."""
        return self.as_kind("x0")

    @property
    def score(self) -> torch.Tensor:
        """The score -eps / sigma."""
        return self.as_kind("score")

    @property
    def v(self) -> torch.Tensor:
        """The velocity alpha eps - sigma x0."""
        return self.as_kind("v")

    def replaced(self, kind: str, value: torch.Tensor, x: torch.Tensor | None = None) -> Prediction:
        """A prediction of `kind` with `value` at the same time (and at `x` when given): what a
        transform of predictions returns."""
        at = self.x if x is None else x
        return Prediction(kind, value, at, self.t, self.sde, *(self._schedule or (None, None)), variance=self.variance)


def declared_sample_shape(model) -> tuple | None:
    """The per-sample shape a model declares, if it declares one (mixtures, our UNet and MLP)."""
    for obj in (model, getattr(model, "net", None)):
        for attr in ("sample_shape", "event_shape"):
            shape = getattr(obj, attr, None)
            if isinstance(shape, (tuple, list, torch.Size)):
                return tuple(shape)
        config = getattr(obj, "config", None)
        if hasattr(config, "get") and "sample_size" in config:  # a diffusers model: its sizes live in its config
            size, channels = config.get("sample_size"), config.get("in_channels")
            size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
            if isinstance(channels, int) and len(size) == 2 and all(isinstance(n, int) for n in size):
                return (channels, *size)
            continue
        if isinstance(getattr(obj, "in_channels", None), int) and isinstance(getattr(obj, "image_size", None), int):
            return (obj.in_channels, obj.image_size, obj.image_size)
        if isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "dim", None), int):
            return (obj.dim,)
    return None


# ---- models that give predictions -------------------------------------------------------------
class PredictionModel:
    """A model that gives a `Prediction`: `Denoiser`, and the transforms of `scoresde.guidance`.

    A subclass sets `sde` and implements `forward`; solvers call `forward` with the (t, alpha_t,
    sigma_t) they hold and ask the prediction for the kind they need. Calling the model gives
    eps, so it is also a plain eps-model `model(x, t)`.
    """

    sde: VPSDE

    def forward(self, x: torch.Tensor, t: Time, alpha: Coef = None, sigma: Coef = None) -> Prediction:
        """The prediction at (x, t), unchecked (callers check x and t at the door).

        Args:
            x: the samples x_t, (batch, ...).
            t: a float, a 0-d tensor, or a (batch,) tensor of per-sample times.
            alpha: alpha_t as the caller holds it (a float or a tensor broadcastable against x),
                or None: from the schedule at t.
            sigma: sigma_t, likewise.
        """
        raise NotImplementedError

    def predict(self, x: torch.Tensor, t: Time) -> Prediction:
        """The prediction at (x, t), with x and t checked.

        Args:
            x: the samples x_t, a tensor (batch, ...).
            t: a float for every sample, or a 0-d or (batch,) tensor of times.

        Returns:
            A `Prediction`: `.eps`, `.x0`, `.score`, `.v`.
        """
        check_batch_time(t, check_tensor("x", x))
        return self.forward(x, t)

    def eps(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """The noise prediction at (x, t)."""
        return self.predict(x, t).eps

    def x0(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """The data prediction at (x, t)."""
        return self.predict(x, t).x0

    def score(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """The score at (x, t)."""
        return self.predict(x, t).score

    def v(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """The velocity prediction at (x, t)."""
        return self.predict(x, t).v

    def __call__(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        return self.eps(x, t)


def as_model(model, sde: VPSDE, name: str = "model") -> PredictionModel:
    """A `PredictionModel` as it is, or a plain callable model(x, t) -> eps as a `Denoiser`."""
    if isinstance(model, PredictionModel):
        return model
    if not callable(model):
        raise TypeError(f"{name}={model!r}: expected a Denoiser (or another PredictionModel) or a callable "
                        "model(x, t) -> eps")
    return Denoiser(model, sde)


def _check_cond(cond, net) -> dict | None:
    """A Denoiser's `cond` as a dict of keyword arguments; a conditioning image checked against the
    size a network of ours declares (cond_channels, cond_size)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        cond = {"cond": cond}
    if not isinstance(cond, dict) or not all(isinstance(k, str) and k.isidentifier() for k in cond):
        raise TypeError(f"cond: expected a tensor (batch, ...) or a dict of keyword arguments, got "
                        f"{type(cond).__name__}")
    batches = {k: v.shape[0] for k, v in cond.items() if isinstance(v, torch.Tensor) and v.ndim > 0}
    if len(set(batches.values())) > 1:
        raise ValueError(f"cond: its tensors disagree on the batch size: {batches}")
    image, channels = cond.get("cond"), getattr(net, "cond_channels", None)
    if isinstance(image, torch.Tensor) and isinstance(channels, int) and channels > 0:
        size = getattr(net, "cond_size", None)
        want = (channels, size, size)
        if image.ndim != 4 or tuple(image.shape[1:]) != want:
            raise ValueError(f"cond: expected a conditioning image of shape (batch, {', '.join(map(str, want))}) "
                             f"(the network's cond_channels={channels}, cond_size={size}), got {tuple(image.shape)}")
    return dict(cond)


class Denoiser(PredictionModel):
    """Wraps any network as a model on continuous time t in [0, 1].

    `predict(x, t)` gives a `Prediction` (`.eps`, `.x0`, `.score`, `.v`); calling it gives eps,
    and `eps`, `x0`, `score`, `v` give each prediction directly, converted with the schedule's
    alpha_t and sigma_t. A network returning an object with a `.sample` tensor (diffusers'
    UNet2DModel) also works.

    Args:
        net: the network, net(x, time) -> its prediction, of x's shape.
        sde: the schedule it was trained on.
        prediction: what the network outputs: "eps", "x0", "v" or "score".
        time_input: what the network takes as its time argument: "t", continuous t (a (batch,)
            tensor in x's dtype); "index", the 0-based DDPM index t N - 1 (diffusers' convention),
            N = `num_steps` or the discrete sde's chain length; or a callable f(t) -> network
            input, given a float64 (batch,) tensor of t.
        num_steps: the chain length N of an index-time network on a continuous sde.
        variance: None, or "learned_range": the network also outputs a variance (Nichol & Dhariwal
            2021, iDDPM), as many channels again after its prediction (dimension 1): the
            interpolation v in [-1, 1] between the step's beta and posterior variance in log space,
            which `ancestral(variance="learned")` draws with.
        cond: conditioning passed through to every network call as keyword arguments: a tensor
            (batch, ...) is passed as `cond=` (a conditioning image, e.g. the low-resolution input
            of a super-resolution UNet); a dict passes each entry under its own name (e.g.
            `{"cond": low_res, "cond_t": 0.1}`, with the noise level of the conditioning image). A
            tensor's first dimension is the batch: row i conditions sample i, so sample with as
            many samples as it has rows. None: the network is called as net(x, time).

    Raises:
        TypeError, ValueError: an argument that is wrong, named with its value and what is allowed.
    """

    def __init__(self, net: Callable, sde: VPSDE, prediction: str = "eps", time_input: str | Callable = "t",
                 num_steps: int | None = None, variance: str | None = None,
                 cond: torch.Tensor | dict | None = None):
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
        if variance not in VARIANCES:
            raise ValueError(f"variance={variance!r}: expected one of {VARIANCES}")
        self.net, self.sde, self.prediction = net, sde, prediction
        self.time_input, self.num_steps, self.variance = time_input, num_steps, variance
        self.cond, self._cond_batch, self._cond_on = _check_cond(cond, net), None, {}
        for value in (self.cond or {}).values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                self._cond_batch = value.shape[0]

    def conditioned(self, cond: torch.Tensor | dict | None) -> "Denoiser":
        """The same network and settings with other conditioning (see `cond`)."""
        return Denoiser(self.net, self.sde, self.prediction, self.time_input, self.num_steps, self.variance,
                        cond=cond)

    def _cond_kwargs(self, x: torch.Tensor) -> dict:
        """The conditioning's keyword arguments for a call on x: its tensors on x's device (moved once)."""
        if self._cond_batch is not None and x.shape[0] != self._cond_batch:
            raise ValueError(f"cond: {self._cond_batch} conditioning samples for a batch of {x.shape[0]}; "
                             f"sample as many samples as cond has rows")
        key = str(x.device)
        if key not in self._cond_on:
            self._cond_on[key] = {k: v.to(x.device) if isinstance(v, torch.Tensor) else v
                                  for k, v in self.cond.items()}
        return self._cond_on[key]

    def __repr__(self):
        return f"Denoiser({type(self.net).__name__}, prediction={self.prediction!r}, time_input={self.time_input!r})"

    @staticmethod
    def from_sigma(fn: Callable, sde: VPSDE) -> PredictionModel:
        """A denoiser in the variance-exploding convention, fn(x, sigma) -> x0 with x = x0 + sigma eps
        (k-diffusion's and EDM's interface), as a model on `sde` (see `scoresde.paths`).

        Args:
            fn: the denoiser; sigma comes as a (batch,) tensor in x's dtype.
            sde: the VP-SDE to sample with.

        Returns:
            A `scoresde.paths.PathDenoiser`.
        """
        from .paths import PathDenoiser, sigma

        return PathDenoiser(fn, sde, sigma(), prediction="x0")

    @staticmethod
    def from_flow(fn: Callable, sde: VPSDE) -> PredictionModel:
        """A flow-matching velocity model fn(x, t) -> v, x = (1 - t) x0 + t eps, v = eps - x0 (t = 1 is
        noise), as a model on `sde` (see `scoresde.paths`).

        Args:
            fn: the velocity field; t comes as a (batch,) tensor in x's dtype.
            sde: the VP-SDE to sample with.

        Returns:
            A `scoresde.paths.PathDenoiser`.
        """
        from .paths import PathDenoiser, flow

        return PathDenoiser(fn, sde, flow(), prediction="velocity")

    @staticmethod
    def from_path(fn: Callable, sde: VPSDE, path: object | None = None, *, alpha: Callable | None = None,
                  sigma: Callable | None = None, prediction: str = "eps", time: str = "t") -> PredictionModel:
        """A network trained on the path x = a(t) x0 + s(t) eps, as a model on `sde` (see `scoresde.paths`).

        Args:
            fn: the network fn(x, time) -> its prediction, x on its own path.
            sde: the VP-SDE to sample with.
            path: a `scoresde.paths.Path` (`paths.ve(...)`, `paths.subvp(...)`, ...); or give
            alpha: a(t) (float64 tensors in and out), with `sigma`, for a path on t in [0, 1].
            sigma: s(t), likewise.
            prediction: "eps", "x0", "score" (of the path's marginal) or "velocity" (eps - x0).
            time: the time fn takes: "t" (the path's time) or "sigma" (its s(t), as NCSN++ does).

        Returns:
            A `scoresde.paths.PathDenoiser`.

        Raises:
            ValueError: neither or both of a path and (alpha, sigma) given.
        """
        from .paths import Path, PathDenoiser

        if (path is None) == (alpha is None or sigma is None):
            raise ValueError("from_path: give a path (scoresde.paths.ve(), subvp(), ...) or alpha= and sigma= "
                             "callables, not both or neither")
        if path is None:
            path = Path.from_coefficients(alpha, sigma)
        return PathDenoiser(fn, sde, path, prediction=prediction, time=time)

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

    def forward(self, x: torch.Tensor, t: Time, alpha: Coef = None, sigma: Coef = None) -> Prediction:
        if self.cond is None:
            out = self.net(x, self._net_time(t, x))
        else:
            out = self.net(x, self._net_time(t, x), **self._cond_kwargs(x))
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "sample", out)  # diffusers returns a UNet2DOutput
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"net (the model) returned {type(out).__name__}, expected a tensor")
        if self.variance is None:
            return Prediction(self.prediction, out, x, t, self.sde, alpha, sigma)
        if out.ndim < 2 or out.shape[1] != 2 * x.shape[1]:
            raise ValueError(f"net (the model) returned shape {tuple(out.shape)}; with variance={self.variance!r} "
                             f"expected twice x's {x.shape[1]} channels along dimension 1 (its prediction, then the "
                             "variance's)")
        value, variance = out.chunk(2, dim=1)
        return Prediction(self.prediction, value, x, t, self.sde, alpha, sigma, variance=variance)
