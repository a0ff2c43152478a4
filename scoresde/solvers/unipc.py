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

from .._util import host_floats
from ..prediction import eps_to_x0
from .base import register

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")
LOWER_ORDER_FINAL_BELOW = 15  # lower_order_final acts on grids of fewer steps (as DPM-Solver's does)


def _phi(k: int, z: float) -> float:
    """phi_k(z) = sum_n z^n / (n + k)!, so phi_1(z) = (e^z - 1)/z and phi_{k+1}(z) = (phi_k(z) - 1/k!)/z.
    The recursion cancels catastrophically for small |z|: there the series is used instead."""
    if abs(z) < 1.0:
        term, total, n = 1.0 / math.factorial(k), 0.0, 0
        while abs(term) > 1e-17 * abs(total) or n < 2:
            total += term
            n += 1
            term *= z / (n + k)
        return total
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def _solve(R, b) -> list:
    """The small (at most 3 x 3) Vandermonde system R rho = b, by Gaussian elimination with partial
    pivoting on Python floats (float64): no tensor round trip per step of the plan."""
    n = len(b)
    A = [list(row) + [bi] for row, bi in zip(R, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(A[r][col]))
        A[col], A[pivot] = A[pivot], A[col]
        for r in range(col + 1, n):
            f = A[r][col] / A[col][col]
            A[r] = [a - f * p for a, p in zip(A[r], A[col])]
    rho = [0.0] * n
    for r in reversed(range(n)):
        rho[r] = (A[r][n] - sum(A[r][c] * rho[c] for c in range(r + 1, n))) / A[r][r]
    return rho


def _step_weights(lam: list, i: int, k: int, variant: str):
    """rho for the predictor (k - 1 values) and the corrector (k values) of step i at order k,
    with r_m (m = 1..k-1), h and B(h)."""
    h = lam[i + 1] - lam[i]
    r = [(lam[i - m] - lam[i]) / h for m in range(1, k)] + [1.0]
    B = -h if variant == "bh1" else math.expm1(-h)
    b = [math.factorial(j) * -h * _phi(j + 1, -h) / B for j in range(1, k + 1)]
    R = [[rm ** (j - 1) for rm in r] for j in range(1, k + 1)]
    rho_p = [] if k == 1 else [0.5] if k == 2 else _solve([row[:k - 1] for row in R[:k - 1]], b[:k - 1])
    rho_c = [0.5] if k == 1 else _solve(R, b)
    return rho_p, rho_c, r, h, B


def _plan(sde, times, order, variant, lower_order_final, corrector):
    """Per step: (k, predictor weights, corrector weights or None), as host floats in x coordinates.

    Predictor: x_pred = keep x_i + sum_j w_j m_{i-j} (j = 0..k-1). Corrector: x_{i+1} = x_pred +
    sum_j c_j m_{i-j} + c_new m_{i+1}. Expanding D_m = (m_{i-m} - m_i)/r_m gives the weights.
    """
    alpha, sigma = (host_floats(v) for v in sde.alpha_sigma(times))
    lam = host_floats(sde.log_snr(times))
    steps = len(times) - 1
    final_lowering = lower_order_final and steps < LOWER_ORDER_FINAL_BELOW
    plan = []
    for i in range(steps):
        k = min(order, i + 1)  # warm start: only i + 1 model outputs exist yet
        if final_lowering:
            k = min(k, steps - i)
        rho_p, rho_c, r, h, B = _step_weights(lam, i, k, variant)
        a = alpha[i + 1]
        pred = [a * -math.expm1(-h)] + [0.0] * (k - 1)  # the exponential-Euler part, on m_i
        for m, rho in enumerate(rho_p, start=1):
            pred[m] -= a * B * rho / r[m - 1]
            pred[0] += a * B * rho / r[m - 1]
        corr = None
        if corrector and i < steps - 1:  # no corrector after the last step: it would cost a call
            diff = [a * B * rho_c[-1]] + [0.0] * (k - 1)  # rho'_k (m_{i+1} - m_i), its m_i part
            for m in range(1, k):  # the corrector's weight on D_m less the predictor's
                d = rho_c[m - 1] - (rho_p[m - 1] if rho_p else 0.0)
                diff[m] -= a * B * d / r[m - 1]
                diff[0] += a * B * d / r[m - 1]
            corr = (diff, -a * B * rho_c[-1])
        plan.append((k, sigma[i + 1] / sigma[i], pred, corr))
    return plan


# Default grid: equal steps in lambda, the integrator's own variable. Worst spread error on the sharp
# ring (GaussianMixture.ring2d) at 10/15/20/30/50 model calls: log_snr 0.21/0.05/0.11/0.07/0.05,
# quadratic 0.34/0.20/0.06/0.05/0.03, karras 0.56/0.33/0.04/0.08/0.06 (20,000 samples).
@register("unipc", grid="log_snr", nfe_per_step=1)
def unipc(model, x, times, *, noise, callback, order: int = 2, variant: str = "bh2",
          lower_order_final: bool = True, corrector: bool = True):
    """UniPC (Zhao et al. 2023) in data prediction: predictor UniP-`order`, corrector UniC after every
    step but the last (one model call per step; order + 1 overall). variant: B(h) = e^h - 1 ("bh2",
    diffusers' default) or h ("bh1"). lower_order_final: on grids of fewer than 15 steps, drop to
    order 1 and 2 at the last steps (stabler at very few steps). corrector=False leaves UniP alone."""
    if isinstance(order, bool) or not isinstance(order, int) or order not in ORDERS:
        raise ValueError(f"order={order!r}: expected an int in 1..3 (the predictor's order)")
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    for name, value in (("lower_order_final", lower_order_final), ("corrector", corrector)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected True or False")
    sde = model.sde
    plan = _plan(sde, times, order, variant, lower_order_final, corrector)
    t_host = host_floats(times)
    alpha, sigma = (host_floats(v) for v in sde.alpha_sigma(times))

    def x0(x_at, j):
        """The model's data prediction at grid point j (the one place x0 is formed)."""
        return eps_to_x0(x_at, model(x_at, t_host[j]), alpha[j], sigma[j])

    history = [x0(x, 0)]  # m_i, m_{i-1}, ... newest first; at most `order` kept
    for i, (k, keep, pred, corr) in enumerate(plan):
        x_new = x * keep
        for j in range(k):
            x_new.add_(history[j], alpha=pred[j])
        if i < len(plan) - 1:  # the next step needs m_{i+1}; the last step does not
            m_new = x0(x_new, i + 1)
            if corr is not None:  # out of place: x_new was the model's input
                diff, w_new = corr
                x_new = torch.add(x_new, m_new, alpha=w_new)
                for j in range(k):
                    x_new.add_(history[j], alpha=diff[j])
            history = [m_new] + history[:order - 1]
        x = x_new
        callback(i, x)
    return x
