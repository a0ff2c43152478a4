"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Alg. 1):
any registered fixed-step solver as the predictor, then Langevin MCMC steps at the time it reached.

The predictor is not copied: its own plan, built on the whole grid with its options
(`predictor_options`), is interleaved with the corrector's steps, so pc with n_corrector=0 is the
predictor, bit for bit. Any one-step plan can predict; the plan itself tells (no step reads a model
output of an earlier step). Multistep plans are refused: the corrector moves x off the trajectory
their history describes.

The corrector is Song et al.'s Langevin corrector for the VP-SDE (their Alg. 6 and score_sde's
LangevinCorrector): at time t, with score g = -eps/sigma and z ~ N(0, I),
    x <- x + e g + sqrt(2 e) z.
Song et al. size the step from a target signal-to-noise ratio `snr` = ||e g|| / ||sqrt(2 e) z||:
    e = 2 a (snr ||z|| / ||g||)^2,
where a = 1 - beta is the alpha of the discrete step (score_sde reads `sde.alphas` of its N-step
chain). Here a is that of the step just taken, alpha(t_i)^2 / alpha(t_{i+1})^2: on a chain's own grid it
is the chain's 1 - beta_n, and on any grid it is 1 - beta(t) dt to first order.

Two step-size rules (`step_size`):
- "schedule" (the default): e = 2 a (snr sigma_t)^2, the step Song et al.'s rule takes in expectation
  when ||eps|| ~ sqrt(d), i.e. ||z||^2 ~ d and ||g||^2 ~ d / sigma_t^2 (images: the network predicts
  most of the noise). It depends on t alone, so the chain stays Langevin for p_t (the only bias is
  the step's own O(e)) and a sample does not depend on the batch it is drawn in. Since the Fisher
  information of p_t is at most d / sigma_t^2, it never steps further than the batch rule does on
  average; on sharp low-dimensional data near t = 0 it steps much less (||eps|| << sqrt(d) there).
- "batch": score_sde's rule with ||z|| and ||g|| each averaged over the batch, one step for the
  whole batch. It corrects harder where ||eps|| << sqrt(d), but a sample depends on its batch
  (through two scalars per corrector step); a batch of one has per-sample norms, which bias the
  chain: a step that grows with the sample's own ||z||^2 scales the noise variance by
  E||z||^4 / (E||z||^2)^2 = (d + 2)/d, and a step ~ 1/||g(x)||^2 makes the chain's stationary law
  p(x)/e(x) instead of p(x). On the 2-D sharp ring (250 steps) per-sample norms put 5-8% of the
  samples between the modes and widen them by 50-80%; on a 16-D mixture they still widen them by 7%.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .._util import MAX_STEPS
from .base import _SUM_DTYPE, SOLVERS, BrownianNoise, register
from .options import Choice, Integer, Number, Option, Table, _wrong_type, _wrong_value, validate
from .plan import Planner

STEP_SIZES = ("schedule", "batch")


def _why_not(name) -> str | None:
    """Why solver `name` cannot predict, or None if it can (a registered one-step plan builder)."""
    spec = SOLVERS.get(name) if isinstance(name, str) else None
    if spec is None:
        return " is unknown" if isinstance(name, str) else ""
    if spec.adaptive:
        return " is adaptive: it has no grid steps to predict"
    if spec.name == "pc":
        return " is pc itself"
    if not spec.plans:
        return " runs the whole solve itself (a bridge), so no corrector can step in between"
    if not _one_step(spec.probe(3, {}).plan.steps):
        return (" is a multistep method: the corrector moves x off the trajectory that its history of model "
                "outputs describes")
    return None


def _one_step(steps) -> bool:
    """Whether every step reads only the model outputs of its own stages."""
    first = 0
    for step in steps:
        combos = [stage.at for stage in step.stages] + [step.update]
        if any(ref < first for combo in combos for ref, _ in combo.terms):
            return False
        first += len(step.stages)
    return True


def _predictors() -> list[str]:
    return sorted(name for name in SOLVERS if _why_not(name) is None)


@dataclass(frozen=True)
class OneStepSolver(Option):
    """The name of a registered solver whose plan takes one step at a time (checked when used)."""

    def describe(self) -> str:
        """What this option allows: a one-step solver's name, the current ones listed.

        Returns:
            The description.
        """
        return f"the name of a one-step solver, one of {_predictors()}"

    def _parse(self, value: object) -> object:
        if not isinstance(value, str):
            return _wrong_type()
        why = _why_not(value)
        return value if why is None else _wrong_value(f" ({value!r}{why})")


def _check_noise(n_corrector, noise):
    if n_corrector and isinstance(noise, BrownianNoise):
        raise ValueError("noise: the Langevin corrector needs draws independent of the Brownian path, and "
                         "BrownianNoise gives increments of one path; use generator= (or n_corrector=0)")


def _mean_norm(v: torch.Tensor) -> torch.Tensor:
    """The per-sample L2 norm averaged over the batch (a 0-d tensor; float32 for half precision)."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=_SUM_DTYPE.get(v.dtype)).mean()


def _batch_update(eps_coef, z_coef, ref):
    """score_sde's step size: x + r^2 eps_coef eps + r z_coef z, r = mean ||z|| / mean ||eps|| (on the device)."""
    def update(x, outputs, z):
        eps = outputs[ref]
        r = (_mean_norm(z) / _mean_norm(eps)).to(x.dtype)
        if isinstance(eps_coef, float):
            return x.addcmul(eps, r * r, value=eps_coef).addcmul_(z, r, value=z_coef)
        return x.addcmul(eps, r * r * eps_coef).addcmul_(z, r * z_coef)

    return update


def _copy_step(planner: Planner, step, refs: dict, report: bool):
    """Re-emit a predictor step into pc's plan, its output refs renumbered."""
    for stage in step.stages:
        at = stage.at
        terms = [(refs[ref], c) for ref, c in at.terms]
        refs[len(refs)] = (planner.point(x=at.x, terms=terms, noise=at.noise) if stage.kind is None else
                           planner.stage(stage.t, stage.alpha, stage.sigma, stage.kind, x=at.x, terms=terms,
                                         noise=at.noise))
    update = step.update
    planner.step(step.index, x=update.x, terms=[(refs[ref], c) for ref, c in update.terms], noise=update.noise,
                 t0=step.t0, t1=step.t1, report=report)


@register("pc", grid="quadratic", stochastic=True, options={
    "predictor": OneStepSolver(), "snr": Number(0.0, low_open=True), "n_corrector": Integer(0, MAX_STEPS),
    "step_size": Choice(*STEP_SIZES), "predictor_options": Table()})
def pc(planner, predictor: str = "euler_maruyama", snr: float = 0.16, n_corrector: int = 1,
       step_size: str = "schedule", predictor_options: Mapping = MappingProxyType({})):
    """Predictor-corrector sampling (Song et al. 2021): a registered one-step predictor (with its
    `predictor_options`), then `n_corrector` Langevin steps of signal-to-noise ratio `snr` at each new
    time. step_size: "schedule" (the step Song et al.'s rule takes for ||eps|| ~ sqrt(d); samples
    independent of their batch) or "batch" (score_sde's batch-mean norms); see the module notes.
    Model calls per step: the predictor's (1 for the default "euler_maruyama") plus n_corrector."""
    _check_noise(n_corrector, planner.noise)
    spec = SOLVERS[predictor]
    inner = planner.sibling()
    spec.fn(inner, **validate(predictor, spec.declared, spec.options, predictor_options))
    sde, times = planner.sde, planner.times
    alpha, sigma = sde.alpha_sigma(times)
    # e = 2 a (snr sigma)^2 r^2 with r = 1 ("schedule") or r = (mean ||z||) / (mean ||eps||) ("batch"),
    # as ||g|| = ||eps|| / sigma; so the update is x - (e / sigma) eps + sqrt(2 e) z.
    e_unit = 2.0 * (alpha[:-1] / alpha[1:]) ** 2 * float(snr) ** 2 * sigma[1:] ** 2
    eps_coef, z_coef = planner.values(-e_unit / sigma[1:]), planner.values(torch.sqrt(2.0 * e_unit))
    ends = planner.nodes(times[1:])
    refs = {}
    for step in inner.plan.steps:
        i = step.index
        _copy_step(planner, step, refs, report=not n_corrector)
        for k in range(n_corrector):
            eps = planner.stage(*ends[i], "eps")
            t_i = planner.t_host[i + 1]  # Langevin draws: no Brownian increment, so t0 = t1
            custom = _batch_update(eps_coef[i], z_coef[i], eps) if step_size == "batch" else None
            planner.step(i, terms=[(eps, eps_coef[i])], noise=z_coef[i], t0=t_i, t1=t_i,
                         report=k == n_corrector - 1, custom=custom)
