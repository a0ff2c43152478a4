"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Alg. 1):
any registered fixed-step solver as the predictor, then Langevin MCMC steps at the time it reached.

The predictor is not copied: step i runs the registered solver itself on the two-point grid
times[i:i+2], so it computes that one step's coefficients as it would on the whole grid (pc with
n_corrector=0 reproduces the predictor, bit for bit or to round-off). Only one-step solvers can serve
(`ONE_STEP`): a multistep one would lose its history on two-point grids. The predictor runs with its
default options.

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

import sys

import torch

from .._util import MAX_STEPS, host_floats
from .base import _SUM_DTYPE, SOLVERS, BrownianNoise, register

# The registered one-step solvers: their step on the two-point grid times[i:i+2] is the step they take
# on the whole grid. Multistep solvers ("unipc") would lose their history there, the torchsde bridge
# builds a Brownian interval per call, and adaptive solvers have no steps: none of them can predict.
# A new one-step solver joins this list (it fails closed: unlisted solvers are refused, by name).
ONE_STEP = ("ancestral", "ddim", "edm", "euler", "euler_maruyama", "heun", "rk4")


def _predictors() -> list[str]:
    return sorted(n for n in ONE_STEP if n in SOLVERS and not SOLVERS[n].adaptive)


STEP_SIZES = ("schedule", "batch")




def _check_options(predictor, snr, n_corrector, step_size, noise):
    valid = _predictors()
    if not isinstance(predictor, str) or predictor not in valid:
        spec = SOLVERS.get(predictor) if isinstance(predictor, str) else None
        why = (" is adaptive: it has no grid steps to predict" if spec is not None and spec.adaptive
               else " cannot predict one step at a time (a multistep method, a bridge, or pc itself)"
               if spec is not None else " is unknown" if isinstance(predictor, str) else "")
        raise ValueError(f"predictor={predictor!r}{why}; expected a one-step solver, one of {valid}")
    # Bounded by the largest float, not math.isfinite: that raises OverflowError for huge ints.
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not (0.0 < snr <= sys.float_info.max):
        raise ValueError(f"snr={snr!r}: expected a finite number > 0 (score_sde uses 0.16)")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or not 0 <= n_corrector <= MAX_STEPS:
        raise ValueError(f"n_corrector={n_corrector!r}: expected an int >= 0 and <= {MAX_STEPS} (Langevin steps "
                         f"after each predictor step)")
    if not isinstance(step_size, str) or step_size not in STEP_SIZES:
        raise ValueError(f"step_size={step_size!r}: expected one of {STEP_SIZES}")
    if n_corrector and isinstance(noise, BrownianNoise):
        raise ValueError("noise: the Langevin corrector needs draws independent of the Brownian path, and "
                         "BrownianNoise gives increments of one path; use generator= (or n_corrector=0)")


def _mean_norm(v: torch.Tensor) -> torch.Tensor:
    """The per-sample L2 norm averaged over the batch (a 0-d tensor; float32 for half precision)."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=_SUM_DTYPE.get(v.dtype)).mean()


@register("pc", grid="log_snr", stochastic=True, nfe_per_step=2)
def pc(model, x, times, *, noise, callback, predictor: str = "euler_maruyama", snr: float = 0.16,
       n_corrector: int = 1, step_size: str = "schedule"):
    """Predictor-corrector sampling (Song et al. 2021): a registered fixed-step predictor, then
    `n_corrector` Langevin steps of signal-to-noise ratio `snr` at each new time. step_size: "schedule"
    (the step Song et al.'s rule takes for ||eps|| ~ sqrt(d); samples independent of their batch) or
    "batch" (score_sde's batch-mean norms); see the module notes. Model calls per step: the
    predictor's (1 for the default "euler_maruyama") plus n_corrector."""
    _check_options(predictor, snr, n_corrector, step_size, noise)
    snr = float(snr)  # an int snr would reach torch as an int64 scalar
    step = SOLVERS[predictor].fn
    alpha, sigma = model.sde.alpha_sigma(times)
    # e = 2 a (snr sigma)^2 r^2 with r = 1 ("schedule") or r = (mean ||z||) / (mean ||eps||) ("batch"),
    # as ||g|| = ||eps|| / sigma; so the update is x - (e / sigma) eps + sqrt(2 e) z.
    e_unit = 2.0 * (alpha[:-1] / alpha[1:]) ** 2 * snr**2 * sigma[1:] ** 2
    eps_coef, z_coef = host_floats(-e_unit / sigma[1:]), host_floats(torch.sqrt(2.0 * e_unit))
    t_host = host_floats(times)

    def quiet(i, x_now):  # the predictor's own callback: pc reports once per step, below
        pass

    for i in range(len(t_host) - 1):
        x = step(model, x, times[i:i + 2], noise=noise, callback=quiet)
        t = t_host[i + 1]
        for _ in range(n_corrector):
            eps = model(x, t)
            z = noise(x, t, t)  # Langevin draws: no Brownian increment, so t0 = t1
            if step_size == "schedule":
                x = x.add(eps, alpha=eps_coef[i]).add_(z, alpha=z_coef[i])
            else:
                r = (_mean_norm(z) / _mean_norm(eps)).to(x.dtype)  # on the device: no host read
                x = x.addcmul(eps, r * r, value=eps_coef[i]).addcmul_(z, r, value=z_coef[i])
        callback(i, x)
    return x
