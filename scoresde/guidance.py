"""Guidance and conditioning as transforms of predictions: classifier-free and classifier
guidance, inpainting by replacement, and an x0 correction hook (dynamic thresholding).

Each transform is a `PredictionModel`: it takes the `Prediction` of the model it wraps and gives
a new one, made in the kind that needs no conversion (classifier-free guidance combines in the
network's own kind, `X0Correction` gives x0), so the solver converts at most once, to the kind it
reads. Every solver runs with a transform unchanged, calling one still gives eps, and transforms
compose: `X0Correction(Inpaint(ClassifierFreeGuidance(net, sde, cond=3, scale=2.0), sde, known=...,
mask=...), sde, dynamic_threshold())`. Arguments are checked when a transform is built, before any
model call; a call reads nothing back to the host, so transforms run inside sync-free loops.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Callable

import torch

from ._util import per_sample
from .prediction import PREDICTIONS, Denoiser, Prediction, PredictionModel, as_model, score_to_eps
from .sde import VPSDE

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "Inpaint", "X0Correction",
           "dynamic_threshold", "static_threshold", "inpaint_result"]


_INT64_MAX = 2**63 - 1  # labels are int64 tensors


# ---- shared checks and helpers ----------------------------------------------------------------
def _check_sde(sde):
    if not isinstance(sde, VPSDE):
        raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")


def _check_scale(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected a finite number >= 0")
    if not 0 <= value <= sys.float_info.max:  # not math.isfinite: huge ints overflow it
        raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
    return float(value)


def _check_labels(name, value, num_classes, null=None):
    """An int label, or a 1-D integer tensor of per-sample labels, in [0, num_classes) and != null.
    Returns (int or CPU long tensor, the largest label)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex() or value.ndim != 1 \
                or value.numel() == 0:
            raise TypeError(f"{name}: expected an int or a non-empty (batch,) integer tensor of labels, "
                            f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        labels = value.detach().to("cpu", torch.long)  # sync: once, when the wrapper is built
        lo, hi = int(labels.min()), int(labels.max())
        bad_null = null is not None and bool((labels == null).any())
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        labels = lo = hi = int(value)
        bad_null = null is not None and labels == null
    else:
        raise TypeError(f"{name}={value!r}: expected an int or a (batch,) integer tensor of labels")
    allowed = f"[0, {num_classes})" if num_classes is not None else f"labels in [0, {_INT64_MAX}]"
    if lo < 0 or hi > _INT64_MAX or (num_classes is not None and hi >= num_classes):
        shown = value if not isinstance(value, torch.Tensor) else f"tensor with labels in [{lo}, {hi}]"
        raise ValueError(f"{name}={shown}: out of range; expected {allowed}")
    if bad_null:
        raise ValueError(f"{name}: holds the null label {null}, which is no condition; expected {allowed}")
    return labels, hi


def _batch_time(t, x) -> torch.Tensor:
    """t (a float, a 0-d or a (batch,) tensor) as a (batch,) tensor on x's device."""
    if isinstance(t, torch.Tensor):
        return t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


class _Labels:
    """Per-sample labels for a batch, built once per (batch size, device) and kept."""

    def __init__(self, name, labels):
        self.name, self.labels, self._cache = name, labels, {}

    def get(self, batch: int, device, extra=None) -> torch.Tensor:
        """(batch,) labels, followed by `batch` copies of `extra` when it is given."""
        key = (batch, str(device))
        if key not in self._cache:
            if isinstance(self.labels, torch.Tensor):
                if len(self.labels) != batch:
                    raise ValueError(f"{self.name}: {len(self.labels)} labels for a batch of {batch}")
                y = self.labels.to(device)
            else:
                y = torch.full((batch,), self.labels, dtype=torch.long, device=device)
            if extra is not None:
                y = torch.cat([y, torch.full((batch,), extra, dtype=torch.long, device=device)])
            self._cache[key] = y
        return self._cache[key]


# ---- classifier-free guidance -----------------------------------------------------------------
class ClassifierFreeGuidance(PredictionModel):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps(x, null) + scale (eps(x, cond) - eps(x, null)).

    Cost: each guided call is ONE network call on a doubled batch (the conditional and the null
    halves concatenated), so the solver's NFE equals the number of network calls, each on 2x the
    batch — about twice the arithmetic of an unguided call, whatever the scale.

    Args:
        net: a conditional network net(x, time, y) (e.g. `scoresde.nn.UNet(num_classes=C)` or a
            diffusers UNet2DModel with class labels), y a (batch,) long tensor of labels, `null`
            meaning "no label".
        sde: the schedule it was trained on.
        cond: the label to guide towards, an int for every sample or a (batch,) tensor of labels.
        scale: a finite number >= 0: 1 gives the conditional model, 0 the unconditional one,
            larger values sharpen the conditional. Ho & Salimans' w is scale - 1.
        null: the null label; default `num_classes` (the convention of scoresde.nn networks).
        num_classes: the number of real labels, for checking `cond`; default `net.num_classes`.
        prediction: what the network outputs, as for `Denoiser`. The combination is made in that
            kind, with no conversion: it is the same combination for eps, x0, v and score, as
            each is affine in eps at a given (x, t).
        time_input: which time the network takes, as for `Denoiser`.
        num_steps: the chain length of an index-time network, as for `Denoiser`.
    """

    def __init__(self, net: Callable, sde: VPSDE, *, cond: int | torch.Tensor, scale: float,
                 null: int | None = None, num_classes: int | None = None, prediction: str = "eps",
                 time_input: str | Callable = "t", num_steps: int | None = None):
        if not callable(net):
            raise TypeError(f"net={net!r}: expected a conditional network net(x, time, y)")
        _check_sde(sde)
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or not 1 <= num_classes <= _INT64_MAX):
            raise ValueError(f"num_classes={num_classes!r}: expected an int in [1, {_INT64_MAX}] or None")
        if null is None:
            if num_classes is None:
                raise ValueError("null=None: give the null label (null=...) or num_classes= (null = num_classes)")
            null = num_classes
        if isinstance(null, bool) or not isinstance(null, numbers.Integral) or not 0 <= null <= _INT64_MAX:
            raise ValueError(f"null={null!r}: expected the null label, an int in [0, {_INT64_MAX}]")
        if not isinstance(prediction, str) or prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")
        self.scale = _check_scale("scale", scale)
        labels, _ = _check_labels("cond", cond, num_classes, int(null))
        # The network with this call's labels; checks time_input and num_steps with the Denoiser's messages.
        self._both = Denoiser(self._labelled_net, sde, prediction=prediction, time_input=time_input,
                              num_steps=num_steps)
        self.net, self.sde, self.null, self.num_classes = net, sde, int(null), num_classes
        self._labels, self._y = _Labels("cond", labels), None

    def __repr__(self):
        return f"ClassifierFreeGuidance({type(self.net).__name__}, scale={self.scale}, null={self.null})"

    def _labelled_net(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.net(x, time, self._y)

    def forward(self, x: torch.Tensor, t, alpha=None, sigma=None) -> Prediction:
        batch = x.shape[0]
        self._y = self._labels.get(batch, x.device, extra=self.null)  # cond labels, then null labels
        both_t = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
        cond, null = self._both.forward(torch.cat([x, x]), both_t).value.split(batch)
        # = lerp; huge scales overflow to inf, no error
        return Prediction(self._both.prediction, null + self.scale * (cond - null), x, t, self.sde, alpha, sigma)


# ---- classifier guidance ------------------------------------------------------------------------
class ClassifierGuidance(PredictionModel):
    """Classifier guidance (Dhariwal & Nichol 2021): score += scale * grad_x log p(target | x_t, t).

    In eps: eps = model(x, t) - scale * sigma_t * grad_x log p(target | x_t, t). The gradient is
    taken under torch.enable_grad(), so sampling under torch.no_grad() or torch.inference_mode()
    works. Each call costs one model call, one classifier forward and one backward through the
    classifier.

    Args:
        model: a `Denoiser`, another transform, or a callable model(x, t) -> eps.
        sde: its schedule.
        classifier: classifier(x, t) -> logits (batch, classes) of a classifier trained on noisy
            x_t (t a (batch,) tensor of times); log-probabilities work too (log_softmax leaves them
            unchanged). It must treat samples independently (no batch statistics): the gradient is
            taken of the batch sum.
        target: an int for every sample, or a (batch,) tensor of labels.
        scale: a finite number >= 0.
    """

    def __init__(self, model: Callable, sde: VPSDE, classifier: Callable, *, target: int | torch.Tensor,
                 scale: float):
        _check_sde(sde)
        self.model = as_model(model, sde)
        if not callable(classifier):
            raise TypeError(f"classifier={classifier!r}: expected a callable classifier(x, t) -> logits")
        self.scale = _check_scale("scale", scale)
        labels, self._max_label = _check_labels("target", target, None)
        self.sde, self.classifier, self._labels = sde, classifier, _Labels("target", labels)

    def __repr__(self):
        return f"ClassifierGuidance({type(self.classifier).__name__}, scale={self.scale})"

    def grad_log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """grad_x log p(target | x, t), shape of x."""
        y = self._labels.get(x.shape[0], x.device)
        t = _batch_time(t, x)
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)  # a clone: x may be an inference tensor
            logits = self.classifier(x_in, t.clone())
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"classifier returned {got}; expected logits of shape ({x.shape[0]}, classes)")
            if not logits.requires_grad or not logits.is_floating_point():
                raise ValueError("classifier: its logits must be floating and depend on x through autograd (no "
                                 "torch.no_grad or .detach() inside it): guidance is their gradient in x")
            if self._max_label >= logits.shape[1]:
                raise ValueError(f"target: label {self._max_label} is out of range for a classifier "
                                 f"of {logits.shape[1]} classes")
            log_p = torch.log_softmax(logits, dim=1).gather(1, y.clone()[:, None])
            (grad,) = torch.autograd.grad(log_p.sum(), x_in)
        return grad.to(x.dtype)

    def forward(self, x: torch.Tensor, t, alpha=None, sigma=None) -> Prediction:
        grad = self.grad_log_prob(x, t)  # first: a bad classifier fails before the model is called
        p = self.model.forward(x, t, alpha, sigma)
        return p.replaced("eps", p.eps + score_to_eps(self.scale * grad, p.sigma))


# ---- inpainting -----------------------------------------------------------------------------------
def inpaint_result(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with the known coordinates (mask True) set to their known values exactly."""
    return torch.where(mask.to(device=x.device, dtype=torch.bool), known.to(device=x.device, dtype=x.dtype), x)


class Inpaint(PredictionModel):
    """Inpainting / imputation by replacement (Song et al. 2021, Appendix I.2).

    The model sees x with its known coordinates (mask True) replaced by the forward-noised known
    values alpha_t known + sigma_t z; the solver carries the free coordinates, and
    `finalize(x)` (or `inpaint_result`) sets the known coordinates of the final sample exactly.

    z is drawn ONCE, when the wrapper is built, and kept for every call: the known coordinates
    then run along one forward path x_t = alpha_t known + sigma_t z, which has the exact law
    q(x_t | x_0 = known) at every t, while the model stays a deterministic function of (x, t),
    as the solvers and their noise source assume (a fresh z per call would make the ODE solvers
    stochastic and a run no longer repeat from its seed). Build one wrapper per sampling run.

    Limits: replacement is exact for the free coordinates when they are independent of the known
    ones under the data (e.g. a Gaussian with independent coordinates): their score then does not
    depend on the known coordinates at all. Otherwise it only approximates the conditional law:
    the free coordinates follow the score of p_t(free, known_t) at one noisy draw of the known
    values, not the score of p_t(free | known_0), and may commit to a mode that does not match the
    known values before those become informative (Lugmayr et al. 2022 and Chung et al. 2022 improve
    on this).

    Args:
        model: a `Denoiser`, another transform, or a callable model(x, t) -> eps.
        sde: its schedule.
        known: the known values, a tensor of the sample's full shape (batch, ...); values at free
            positions are ignored.
        mask: a bool (or 0/1) tensor broadcastable to known.shape, True where the value is known.
        generator: seeds z.
    """

    def __init__(self, model: Callable, sde: VPSDE, *, known: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None):
        _check_sde(sde)
        self.model, self.sde = as_model(model, sde), sde
        if not isinstance(known, torch.Tensor) or not known.is_floating_point() or known.ndim < 1:
            got = f"a {known.dtype} tensor" if isinstance(known, torch.Tensor) else type(known).__name__
            raise TypeError(f"known: expected a floating tensor of the sample's shape (batch, ...), got {got}")
        if not isinstance(mask, torch.Tensor) or mask.is_complex():
            raise TypeError(f"mask: expected a bool (or 0/1) tensor broadcastable to {tuple(known.shape)}, "
                            f"got {type(mask).__name__}")
        for name, value in (("known", known), ("mask", mask)):
            if value.device.type == "meta":
                raise ValueError(f"{name}: a meta tensor holds no values to inpaint with")
        try:
            shape = torch.broadcast_shapes(mask.shape, known.shape)
        except RuntimeError:
            shape = None
        if shape != known.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to known's {tuple(known.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):  # sync: once, when the wrapper is built
                raise ValueError("mask: expected bool or 0/1 values (True / 1 where the value is known)")
            mask = mask != 0
        mask = mask.to(known.device).expand(known.shape)
        if not bool(torch.isfinite(known[mask]).all()):  # sync: once, when the wrapper is built
            raise ValueError("known: NaN or inf at a known position (mask True)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r}: expected a torch.Generator or None")
        where = generator.device if generator is not None else known.device
        self.z = torch.randn(known.shape, generator=generator, dtype=known.dtype, device=where).to(known.device)
        self.known = torch.where(mask, known, torch.zeros((), dtype=known.dtype, device=known.device))
        self.mask = mask
        self._copies = {}  # (device, dtype) -> (known, z, mask) there: no host-to-device copy per call

    def _like(self, x: torch.Tensor):
        key = (str(x.device), x.dtype)
        if key not in self._copies:
            self._copies[key] = (self.known.to(device=x.device, dtype=x.dtype),
                                 self.z.to(device=x.device, dtype=x.dtype), self.mask.to(x.device))
        return self._copies[key]

    def __repr__(self):
        return f"Inpaint(shape={tuple(self.known.shape)})"

    def noised_known(self, t, like: torch.Tensor) -> torch.Tensor:
        """alpha_t known + sigma_t z: the known values forward-noised to time t, like `like`."""
        known, z, _ = self._like(like)
        return self.sde.marginal(known, _batch_time(t, like), z)

    def forward(self, x: torch.Tensor, t, alpha=None, sigma=None) -> Prediction:
        if x.shape != self.known.shape:
            raise ValueError(f"Inpaint: x has shape {tuple(x.shape)}, but known has {tuple(self.known.shape)}")
        p = self.model.forward(torch.where(self._like(x)[2], self.noised_known(t, x), x), t, alpha, sigma)
        # The same prediction, read at x: the free coordinates are x's; the known ones are set at the end.
        return p.replaced(p.kind, p.value, x)

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """The final sample with its known coordinates set exactly."""
        return inpaint_result(x, self.known, self.mask)


# ---- the x0 correction hook -----------------------------------------------------------------------
class X0Correction(PredictionModel):
    """Correct the model's x0 estimate at every call: the prediction becomes x0 = fn(x0_hat), x0_hat
    the model's x0. Imagen's dynamic thresholding (Saharia et al. 2022) is one such fn.

    As a transform it is honoured by every solver: data-prediction solvers (DDIM, ancestral,
    DPM-Solver++ ...) see fn(x0_hat) as their x0 estimate exactly, the others the eps it implies;
    `sample(..., final_denoise=True)` then returns fn's output exactly.

    Args:
        model: a `Denoiser`, another transform, or a callable model(x, t) -> eps.
        sde: its schedule.
        fn: fn(x0) -> x0 of the same shape, e.g. `dynamic_threshold()` or `static_threshold()`.
    """

    def __init__(self, model: Callable, sde: VPSDE, fn: Callable):
        _check_sde(sde)
        self.model, self.sde = as_model(model, sde), sde
        if not callable(fn):
            raise TypeError(f"fn={fn!r}: expected a callable fn(x0) -> x0, e.g. dynamic_threshold()")
        self.fn = fn

    def __repr__(self):
        return f"X0Correction({getattr(self.fn, '__name__', type(self.fn).__name__)})"

    def forward(self, x: torch.Tensor, t, alpha=None, sigma=None) -> Prediction:
        p = self.model.forward(x, t, alpha, sigma)
        x0 = self.fn(p.x0)
        if not isinstance(x0, torch.Tensor) or x0.shape != x.shape:
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"fn returned {got}; expected an x0 of the input's shape {tuple(x.shape)}")
        return p.replaced("x0", x0)


def _check_finite(name, value, lo=-math.inf, hi=math.inf, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(value) <= sys.float_info.max \
            or value < lo or value > hi or (lo_open and value == lo):
        raise ValueError(f"{name}={value!r}: expected a finite number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(value)


def dynamic_threshold(percentile: float = 0.995, max_value: float = 1.0) -> Callable:
    """Imagen's dynamic thresholding (Saharia et al. 2022), for data in [-max_value, max_value].

    Per sample, s = max(the `percentile` quantile of |x0|, max_value); x0 is clipped to [-s, s] and
    scaled by max_value / s. The result lies in [-max_value, max_value], and an x0 already inside
    is left unchanged (s = max_value). (diffusers' `sample_max_value` is an upper cap on s instead.)

    Args:
        percentile: the quantile of |x0| that sets s, in (0, 1].
        max_value: the data's bound, > 0.

    Returns:
        fn(x0) -> x0, for `X0Correction`.
    """
    percentile = _check_finite("percentile", percentile, 0.0, 1.0, lo_open=True)
    max_value = _check_finite("max_value", max_value, 0.0, math.inf, lo_open=True)

    def threshold(x0: torch.Tensor) -> torch.Tensor:
        flat = x0.abs().flatten(1)
        kept = torch.quantile(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat,
                              percentile, dim=1).to(x0.dtype)
        s = per_sample(kept.clamp(min=max_value), x0)
        return torch.minimum(torch.maximum(x0, -s), s) * (max_value / s)

    threshold.__name__ = f"dynamic_threshold(percentile={percentile}, max_value={max_value})"
    return threshold


def static_threshold(lo: float = -1.0, hi: float = 1.0) -> Callable:
    """Static thresholding: clip x0 to [lo, hi] (Ho et al. 2020's clipping of x0 to the data range).

    Args:
        lo: the lower bound.
        hi: the upper bound, > lo.

    Returns:
        fn(x0) -> x0, for `X0Correction`.
    """
    lo = _check_finite("lo", lo)
    hi = _check_finite("hi", hi)
    if not lo < hi:
        raise ValueError(f"lo={lo!r}, hi={hi!r}: expected lo < hi")

    def threshold(x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(lo, hi)

    threshold.__name__ = f"static_threshold(lo={lo}, hi={hi})"
    return threshold
