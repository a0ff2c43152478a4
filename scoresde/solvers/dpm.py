"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b): exponential integrators in the
half log-SNR lambda = log(alpha/sigma).

The linear part of the probability-flow ODE is integrated exactly and only the model's prediction
is approximated by a Taylor expansion in lambda. From t to s < t, with h = lambda_s - lambda_t > 0:

  noise prediction (DPM-Solver):   x_s = (alpha_s/alpha_t) x_t - sigma_s int_0^h e^u     eps(lambda_t + u) du
  data prediction (DPM-Solver++):  x_s = (sigma_s/sigma_t) x_t + alpha_s int_0^h e^(u-h) x0(lambda_t + u) du

Single-step solvers (dpm_solver_2, dpm_solver_3) evaluate the model at intermediate lambdas inside
the step; multistep ones (dpm_solver_pp_2m, _3m, _2m_sde) reuse the x0 predictions of the previous
steps, one model call per step. Every coefficient (h, expm1(+-h), the phi functions, the step
ratios r) is a float64 CPU tensor turned into Python floats before the loop; the loops branch only
on Python ints (each step's order) and keep the multistep history as a short list of tensors.
With first-order steps throughout, dpm_solver_pp_2m is DDIM(eta=0) and dpm_solver_pp_2m_sde is
ancestral sampling with the posterior variance (the tests check both).

Default grids, measured on the sharp ring (GaussianMixture.ring2d, 20,000 samples, 10 and 20 model
calls): log-SNR for the multistep solvers; quadratic for the single-step ones, which get only 3 to 9
steps at that budget, and on the log-SNR grid leave far more mass between the modes.
"""
from __future__ import annotations

import torch

from .base import register
from .options import Flag
from .plan import per_history

# lower_order_final lowers the order of the last steps only below this step count, as diffusers'
# DPMSolverMultistepScheduler does (Lu et al.'s own code uses 10). At or above it every step keeps the
# full order, so the option cannot bend a measured convergence order. On the sharp ring it roughly
# halves the spread error of pp_3m and pp_2m_sde at 9 steps and changes little for pp_2m.
LOWER_ORDER_FINAL_BELOW = 15
LOWER_ORDER_FINAL = {"lower_order_final": Flag()}


def _schedule(sde, times):
    """lambda, log alpha, log sigma at the grid times (float64 CPU tensors) and the steps h > 0."""
    lam, log_alpha = sde.log_snr(times), sde.log_alpha(times)
    log_sigma = log_alpha - lam
    return lam, log_alpha, log_sigma, lam[1:] - lam[:-1]


def _at_lambda(sde, lam):
    """Times, log alpha and log sigma at the half log-SNRs lam (the nodes inside single-step steps)."""
    t = sde.t_from_log_snr(lam)
    log_alpha = sde.log_alpha(t)
    return t, log_alpha, log_alpha - lam


def _step_orders(steps: int, max_order: int, lower_order_final: bool) -> list:
    """Each step's order: a warm start (step i has at most i + 1 predictions to use) and, with
    lower_order_final below LOWER_ORDER_FINAL_BELOW steps, order steps - i for the last steps."""
    orders = [min(max_order, i + 1) for i in range(steps)]
    if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
        orders = [min(order, steps - i) for i, order in enumerate(orders)]
    return orders


# ---- single-step DPM-Solver in noise prediction (Lu et al. 2022, Algorithms 1 and 2) --------------------
R1_2 = 0.5  # DPM-Solver-2: the intermediate node at lambda_t + h/2 (the midpoint)
R1_3, R2_3 = 1.0 / 3.0, 2.0 / 3.0  # DPM-Solver-3: nodes at lambda_t + h/3 and lambda_t + 2h/3


@register("dpm_solver_2", grid="quadratic")
def dpm_solver_2(planner):
    """Single-step DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2), second order:
    u = (alpha_m/alpha_t) x - sigma_m expm1(r1 h) eps_t at lambda_m = lambda_t + r1 h, then
    x_s = (alpha_s/alpha_t) x - sigma_s expm1(h) eps_t - sigma_s expm1(h)/(2 r1) (eps_m - eps_t)."""
    sde, times = planner.sde, planner.times
    lam, log_alpha, log_sigma, h = _schedule(sde, times)
    sigma = torch.exp(log_sigma)
    t_m, log_alpha_m, log_sigma_m = _at_lambda(sde, lam[:-1] + R1_2 * h)
    # the stage: u = keep_m x + a_m eps_t
    keep_m = torch.exp(log_alpha_m - log_alpha[:-1])
    a_m = -torch.exp(log_sigma_m) * torch.expm1(R1_2 * h)
    # the step, with eps_t and eps_m collected: x_s = keep x + c_t eps_t + c_m eps_m
    keep = torch.exp(log_alpha[1:] - log_alpha[:-1])
    phi_1 = -sigma[1:] * torch.expm1(h)
    c_m = phi_1 / (2 * R1_2)
    c_t = phi_1 - c_m  # zero at r1 = 1/2: the midpoint rule needs eps_m only
    start, mid = planner.nodes(times[:-1]), planner.nodes(t_m)
    keep_m, a_m, keep, c_t, c_m = (planner.values(v) for v in (keep_m, a_m, keep, c_t, c_m))
    for i in range(planner.steps):
        eps_t = planner.stage(*start[i])
        eps_m = planner.stage(*mid[i], x=keep_m[i], terms=[(eps_t, a_m[i])])
        planner.step(i, x=keep[i], terms=[(eps_m, c_m[i]), (eps_t, c_t[i])])


@register("dpm_solver_3", grid="quadratic")
def dpm_solver_3(planner):
    """Single-step DPM-Solver-3 (Lu et al. 2022, Algorithm 2 with r1 = 1/3, r2 = 2/3), third order:
    u1 = (alpha_1/alpha_t) x - sigma_1 expm1(r1 h) eps_t,
    u2 = (alpha_2/alpha_t) x - sigma_2 expm1(r2 h) eps_t - sigma_2 (r2/r1) (expm1(r2 h)/(r2 h) - 1) D1,
    x_s = (alpha_s/alpha_t) x - sigma_s expm1(h) eps_t - (sigma_s/r2) (expm1(h)/h - 1) D2,
    with D_k = eps(u_k) - eps_t."""
    sde, times = planner.sde, planner.times
    lam, log_alpha, log_sigma, h = _schedule(sde, times)
    sigma = torch.exp(log_sigma)
    t_1, log_alpha_1, log_sigma_1 = _at_lambda(sde, lam[:-1] + R1_3 * h)
    t_2, log_alpha_2, log_sigma_2 = _at_lambda(sde, lam[:-1] + R2_3 * h)
    # u1 = keep_1 x + a_1 eps_t
    keep_1 = torch.exp(log_alpha_1 - log_alpha[:-1])
    a_1 = -torch.exp(log_sigma_1) * torch.expm1(R1_3 * h)
    # u2 = keep_2 x + a_2 eps_t + b_2 (eps_1 - eps_t)
    keep_2 = torch.exp(log_alpha_2 - log_alpha[:-1])
    a_2 = -torch.exp(log_sigma_2) * torch.expm1(R2_3 * h)
    b_2 = -torch.exp(log_sigma_2) * (R2_3 / R1_3) * (torch.expm1(R2_3 * h) / (R2_3 * h) - 1)
    # x_s = keep x + c_t eps_t + c_2 (eps_2 - eps_t)
    keep = torch.exp(log_alpha[1:] - log_alpha[:-1])
    c_t = -sigma[1:] * torch.expm1(h)
    c_2 = -(sigma[1:] / R2_3) * (torch.expm1(h) / h - 1)
    start = planner.nodes(times[:-1])
    node_1, node_2 = planner.nodes(t_1), planner.nodes(t_2)
    keep_1, a_1, keep_2, a_2, b_2, keep, c_t, c_2 = (planner.values(v) for v in (
        keep_1, a_1, keep_2, a_2 - b_2, b_2, keep, c_t - c_2, c_2))
    for i in range(planner.steps):
        eps_t = planner.stage(*start[i])
        eps_1 = planner.stage(*node_1[i], x=keep_1[i], terms=[(eps_t, a_1[i])])
        eps_2 = planner.stage(*node_2[i], x=keep_2[i], terms=[(eps_t, a_2[i]), (eps_1, b_2[i])])
        planner.step(i, x=keep[i], terms=[(eps_t, c_t[i]), (eps_2, c_2[i])])


# ---- multistep DPM-Solver++ in data prediction (Lu et al. 2022b) -----------------------------------------
def _multistep_weights(h, phi, max_order):
    """Per step and order k, the weights of x0_i, x0_{i-1}, ... in sum_j w_j x0_{i-j}.

    phi = (phi_1, phi_2, phi_3), each multiplied by alpha_s already, with
    phi_1 = expm1(-h), phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2: the integrals
    int_0^h e^(u-h) u^k/k! du are -phi_1, h phi_2 and -h^2 phi_3. The step adds
      order 1:  -phi_1 x0_i
      order 2:  -phi_1 (x0_i + D1/2)                 (midpoint form, Lu et al. 2022b, Algorithm 2)
      order 3:  -phi_1 x0_i + phi_2 D1 - phi_3 D2
    where D1 ~ h x0' and D2 ~ h^2 x0'' are the derivatives in lambda at lambda_i of the quadratic
    through the last three predictions, scaled by powers of h. The third-order step is the exact
    integral of that quadratic, so it has local error O(h^4). (The reference implementations --
    Lu et al.'s dpm_solver_pytorch.py, diffusers, k-diffusion -- take D2 as half of this, ~ h^2 x0''/2,
    with the same -phi_3 weight: their update is exact for linear x0 only, local error O(h^3), a
    second-order method. tests/test_dpm.py checks the exactness on quadratics.)
    Steps too early to have the history get placeholder ratios r = 1, never used (a NaN there would
    turn the gradient with respect to the grid into NaN).
    """
    h_0 = torch.cat([h[:1], h[:-1]])  # the previous step
    h_1 = torch.cat([h[:2], h[:-2]])[: len(h)]  # the one before it
    r0, r1 = h_0 / h, h_1 / h
    phi_1, phi_2, phi_3 = phi
    weights = {1: [-phi_1]}
    # order 2: D1 = (x0_i - x0_{i-1}) / r0
    weights[2] = [-phi_1 * (1 + 0.5 / r0), phi_1 * (0.5 / r0)]
    # order 3, as weight vectors over (x0_i, x0_{i-1}, x0_{i-2}): the scaled first differences
    # D1_0 = (x0_i - x0_{i-1})/r0 ~ h x0'(lambda_i - h_0/2), D1_1 = (x0_{i-1} - x0_{i-2})/r1, then
    # D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) ~ h x0'(lambda_i), D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0''
    d10 = torch.stack([1 / r0, -1 / r0, torch.zeros_like(r0)])
    d11 = torch.stack([torch.zeros_like(r1), 1 / r1, -1 / r1])
    d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
    d2 = 2 * (d10 - d11) / (r0 + r1)
    w3 = phi_2 * d1 - phi_3 * d2
    w3[0] -= phi_1
    weights[3] = list(w3)
    return {k: ws for k, ws in weights.items() if k <= max_order}


def _multistep_plan(planner, max_order, lower_order_final, keep, weights, noise=None):
    """x_s = keep x_t + sum_j w_j x0_{i-j} (+ noise z), one x0 prediction per step; weights[k]: the
    per-step vectors of order k's weights, newest prediction first. The history holds alpha x0 (one
    pass fewer than x0), so each weight is divided by its prediction's alpha."""
    alpha = planner.sde.alpha(planner.times[:-1])
    start = planner.nodes(planner.times[:-1])
    keep = planner.values(keep)
    noise = [None] * planner.steps if noise is None else planner.values(noise)
    weights = {k: [planner.values(per_history(w, alpha, j)) for j, w in enumerate(ws)] for k, ws in weights.items()}
    history = []  # refs of the latest predictions, newest last
    for i, order in enumerate(_step_orders(planner.steps, max_order, lower_order_final)):
        history = (history + [planner.stage(*start[i], "alpha_x0")])[-max_order:]
        terms = [(history[-1 - j], w[i]) for j, w in enumerate(weights[order])]
        planner.step(i, x=keep[i], terms=terms, noise=noise[i])


def _multistep_pp(planner, max_order, lower_order_final):
    """DPM-Solver++(kM) on the probability-flow ODE, k = max_order (Lu et al. 2022b, Algorithm 2):
    x_s = (sigma_s/sigma_t) x_t + sum_j w_j x0_{i-j}, one model call per step."""
    _, log_alpha, log_sigma, h = _schedule(planner.sde, planner.times)
    alpha_s = torch.exp(log_alpha[1:])
    phi_1 = alpha_s * torch.expm1(-h)  # alpha_s (e^-h - 1)
    phi_2 = alpha_s * (torch.expm1(-h) / h + 1)
    phi_3 = alpha_s * ((torch.expm1(-h) / h + 1) / h - 0.5)
    weights = _multistep_weights(h, (phi_1, phi_2, phi_3), max_order)
    _multistep_plan(planner, max_order, lower_order_final, torch.exp(log_sigma[1:] - log_sigma[:-1]), weights)


@register("dpm_solver_pp_2m", grid="log_snr", options=LOWER_ORDER_FINAL)
def dpm_solver_pp_2m(planner, lower_order_final: bool = True):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) in data prediction; the first step
    is first order, and with lower_order_final the last one too when steps < 15."""
    _multistep_pp(planner, 2, lower_order_final)


@register("dpm_solver_pp_3m", grid="log_snr", options=LOWER_ORDER_FINAL)
def dpm_solver_pp_3m(planner, lower_order_final: bool = True):
    """Multistep DPM-Solver++(3M) (Lu et al. 2022b) in data prediction; the first two steps are of
    order 1 and 2, and with lower_order_final the last two too when steps < 15. Its D2 term is twice
    that of the reference implementations, which makes it third order (see _multistep_weights)."""
    _multistep_pp(planner, 3, lower_order_final)


@register("dpm_solver_pp_2m_sde", grid="quadratic", stochastic=True, options=LOWER_ORDER_FINAL)
def dpm_solver_pp_2m_sde(planner, lower_order_final: bool = True):
    """Multistep SDE-DPM-Solver++(2M) (Lu et al. 2022b; diffusers' "sde-dpmsolver++", midpoint form)
    on the reverse SDE: with c = alpha_s (1 - e^-2h),
    x_s = (sigma_s/sigma_t) e^-h x_t + c (x0_i + D1/2) + sigma_s sqrt(1 - e^-2h) z,
    D1 = (x0_i - x0_{i-1}) / r0. First order (D1 = 0) it is ancestral sampling; the first step is,
    and with lower_order_final the last one too when steps < 15."""
    _, log_alpha, log_sigma, h = _schedule(planner.sde, planner.times)
    c = -torch.exp(log_alpha[1:]) * torch.expm1(-2 * h)
    half_over_r0 = 0.5 * h / torch.cat([h[:1], h[:-1]])  # 1/(2 r0), r0 = h_{i-1}/h_i (a placeholder at i = 0)
    weights = {1: [c], 2: [c * (1 + half_over_r0), -c * half_over_r0]}
    keep = torch.exp(log_sigma[1:] - log_sigma[:-1] - h)
    c_z = torch.exp(log_sigma[1:]) * torch.sqrt(-torch.expm1(-2 * h))
    _multistep_plan(planner, 2, lower_order_final, keep, weights, c_z)
