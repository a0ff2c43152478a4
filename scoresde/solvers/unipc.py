"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): a multistep exponential integrator of the PF-ODE in the half log-SNR lambda,
in its data-prediction (x0) form.

From t_i to t_{i+1}, with h = lambda_{i+1} - lambda_i, the model's x0 predictions m_j at earlier
grid points enter through the divided differences D_m = (m_{i-m} - m_i)/r_m, r_m = (lambda_{i-m} -
lambda_i)/h:

    predictor UniP-k:  x_pred = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) m_i
                                - alpha_{i+1} B(h) sum_{m<k} rho_m D_m
    corrector UniC-k:  x_{i+1} = the same with sum_{m<k} rho'_m D_m + rho'_k (m_{i+1} - m_i),

where m_{i+1} is the model's x0 at x_pred: the call the next predictor needs anyway, so UniC
costs no model call and each step costs one. The corrector raises the order by one (UniPC-k
converges with order k + 1 once the warm-up is over); none follows the last step. The rho solve
R rho = b with R_jm = r_m^(j-1) and b_j = j! h phi_{j+1}(-h) / B(h) (B(h) = e^{-h} - 1 for "bh2",
-h for "bh1"); order-2 predictors and order-1 correctors take rho = 1/2, as the reference code does.
Everything depends on the grid only, so every coefficient is a host float fixed before the loop.
"""
from __future__ import annotations

import math

import torch

from .base import register
from .options import Choice, Flag, Integer
from .plan import per_history

VARIANTS = ("bh1", "bh2")
LOWER_ORDER_FINAL_BELOW = 15  # lower_order_final acts on grids of fewer steps (as DPM-Solver's does)


SERIES_TERMS = 24  # for |z| < 1 the series' terms fall below 1/24! ~ 1.6e-24 of the first


def _phi(k: int, z: torch.Tensor) -> torch.Tensor:
    """phi_k(z) = sum_n z^n / (n + k)!, so phi_1(z) = (e^z - 1)/z and phi_{k+1}(z) = (phi_k(z) - 1/k!)/z,
    elementwise. The recursion cancels catastrophically for small |z|: there the series is used."""
    small = z.abs() < 1.0
    zs = torch.where(small, z, torch.zeros_like(z))  # each branch sees only the z it serves (finite gradients)
    zl = torch.where(small, torch.ones_like(z), z)
    term, series = torch.full_like(z, 1.0 / math.factorial(k)), torch.zeros_like(z)
    for n in range(1, SERIES_TERMS + 1):
        series = series + term
        term = term * zs / (n + k)
    value = torch.expm1(zl) / zl
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / zl
    return torch.where(small, series, value)


def _rho(r: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Per step, the solution of the Vandermonde system R rho = b with R_jm = r_m^(j-1) (j, m < k):
    r and b are (steps, >= k), the result (steps, k); batched, so it keeps the grid's gradient."""
    R = torch.stack([r[:, :k] ** j for j in range(k)], dim=1)
    return torch.linalg.solve(R, b[:, :k])


def _step_orders(steps: int, order: int, lower_order_final: bool) -> list:
    """Each step's order k: a warm start (only i + 1 model outputs exist at step i) and, on grids of
    fewer than LOWER_ORDER_FINAL_BELOW steps with lower_order_final, k <= steps - i at the end."""
    final_lowering = lower_order_final and steps < LOWER_ORDER_FINAL_BELOW
    return [min(order, i + 1, steps - i if final_lowering else order) for i in range(steps)]


def _weights(sde, times, order: int, variant: str):
    """Per step (as (steps,) tensors): keep = sigma_{i+1}/sigma_i and, for each order k, the
    predictor's weights pred[k][j] and the corrector's extra weights diff[k][j] on m_{i-j}
    (j < k) and w_new[k] on m_{i+1}, in x coordinates.

    Predictor: x_pred = keep x_i + sum_j pred_j m_{i-j}; corrector: x_{i+1} = x_pred + sum_j diff_j m_{i-j}
    + w_new m_{i+1}. Expanding D_m = (m_{i-m} - m_i)/r_m gives the weights. Steps too early for order k
    get placeholder ratios r_m = -m (a solvable system), never used.
    """
    alpha, sigma = sde.alpha_sigma(times)
    lam = sde.log_snr(times)
    h = lam[1:] - lam[:-1]
    steps = len(h)
    index = torch.arange(steps)
    r = torch.stack([torch.where(index >= m, (lam[(index - m).clamp(min=0)] - lam[:-1]) / h,
                                 torch.full_like(h, -float(m))) for m in range(1, order)] + [torch.ones_like(h)], 1)
    B = -h if variant == "bh1" else torch.expm1(-h)
    b = torch.stack([math.factorial(j) * -h * _phi(j + 1, -h) / B for j in range(1, order + 1)], 1)
    a = alpha[1:]
    pred, diff, w_new = {}, {}, {}
    for k in range(1, order + 1):
        inner = r[:, list(range(k - 1)) + [order - 1]]  # r_1 .. r_{k-1}, then r_k = 1
        rho_p = (torch.zeros(steps, 0, dtype=h.dtype) if k == 1 else torch.full((steps, 1), 0.5, dtype=h.dtype)
                 if k == 2 else _rho(inner, b, k - 1))
        rho_c = torch.full((steps, 1), 0.5, dtype=h.dtype) if k == 1 else _rho(inner, b, k)
        pred[k] = _expand(-a * torch.expm1(-h), a * B, rho_p, inner, k)
        extra = rho_c[:, :k - 1] - (rho_p if k > 1 else 0.0)
        diff[k] = _expand(a * B * rho_c[:, -1], a * B, extra, inner, k)
        w_new[k] = -a * B * rho_c[:, -1]
    return sigma[1:] / sigma[:-1], pred, diff, w_new


def _expand(on_m_i, scale, rho, r, k) -> list:
    """Weights on m_i, m_{i-1}, ..., m_{i-k+1} of on_m_i m_i - scale sum_m rho_m D_m, D_m = (m_{i-m} - m_i)/r_m."""
    weights = [on_m_i] + [None] * (k - 1)
    for m in range(1, k):
        term = scale * rho[:, m - 1] / r[:, m - 1]
        weights[m] = -term
        weights[0] = weights[0] + term
    return weights


# Default grid: equal steps in lambda, the integrator's own variable. Worst spread error on the sharp
# ring (GaussianMixture.ring2d) at 10/15/20/30/50 model calls: log_snr 0.21/0.05/0.11/0.07/0.05,
# quadratic 0.34/0.20/0.06/0.05/0.03, karras 0.56/0.33/0.04/0.08/0.06 (20,000 samples).
@register("unipc", grid="log_snr", options={"order": Integer(1, 3), "variant": Choice(*VARIANTS),
                                            "lower_order_final": Flag(), "corrector": Flag()})
def unipc(planner, order: int = 2, variant: str = "bh2", lower_order_final: bool = True, corrector: bool = True):
    """UniPC (Zhao et al. 2023) in data prediction: predictor UniP-`order`, corrector UniC after every
    step but the last (one model call per step; order + 1 overall). variant: B(h) = e^h - 1 ("bh2",
    diffusers' default) or h ("bh1"). lower_order_final: on grids of fewer than 15 steps, drop to
    order 1 and 2 at the last steps (stabler at very few steps). corrector=False leaves UniP alone."""
    sde, times = planner.sde, planner.times
    keep, pred, diff, w_new = _weights(sde, times, order, variant)
    alpha, sigma = sde.alpha_sigma(times)
    # The history holds alpha m (one pass fewer than m): each weight is divided by its m's alpha.
    keep = planner.values(keep)
    pred, diff = ({k: [planner.values(per_history(w, alpha[:-1], j)) for j, w in enumerate(ws)]
                   for k, ws in d.items()} for d in (pred, diff))
    w_new = {k: planner.values(w / alpha[1:]) for k, w in w_new.items()}
    nodes = planner.nodes(times)
    last = planner.steps - 1
    history = [planner.stage(*nodes[0], "alpha_x0")]  # refs of m_i, m_{i-1}, ..., newest first
    for i, k in enumerate(_step_orders(planner.steps, order, lower_order_final)):
        terms = [(history[j], pred[k][j][i]) for j in range(k)]
        if i == last:  # the last step needs no m_{i+1}: no model call, no corrector
            planner.step(i, x=keep[i], terms=terms)
            continue
        x_pred = planner.point(x=keep[i], terms=terms)
        m_new = planner.stage(*nodes[i + 1], "alpha_x0", x=0.0, terms=[(x_pred, 1.0)])
        if corrector:  # UniC, from the predictor's point: the call the next predictor needs anyway
            planner.step(i, x=0.0, terms=[(x_pred, 1.0), (m_new, w_new[k][i])] +
                         [(ref, diff[k][j][i]) for j, (ref, _) in enumerate(terms)])
        else:
            planner.step(i, x=0.0, terms=[(x_pred, 1.0)])
        history = [m_new] + history[:order - 1]
