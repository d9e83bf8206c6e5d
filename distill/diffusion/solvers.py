"""Pure solver steps on a `NoiseSchedule`: prediction conversions, forward noising, DDIM / Euler /
DPM-Solver++ steps, SDXL-Lightning's `move` and the consistency-model boundary scalings.

Everything is elementwise over a batch: timesteps are LongTensors (B,) (per-sample) or scalars, coefficients
are gathered in float64 and cast to the data's dtype. Shapes: x (B, C, H, W) or any (B, ...).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.diffusion.schedule import NoiseSchedule


def to_x0_eps(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor | int,
    schedule: NoiseSchedule,
    prediction_type: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) implied by a model output at x_t, where x_t = a x0 + s eps,
    a = sqrt(abar_t), s = sqrt(1 - abar_t).

    epsilon:      x0 = (x_t - s eps) / a                    (DDIM, arXiv 2010.02502, eq. 12 "predicted x0")
    v_prediction: v = a eps - s x0, so x0 = a x_t - s v, eps = a v + s x_t   (arXiv 2202.00512, Sec. 4)
    sample:       x0 = output, eps = (x_t - a x0) / s
    prediction_type defaults to the schedule's.
    """
    kind = prediction_type or schedule.prediction_type
    a, s = schedule.alpha(t, x_t), schedule.sigma(t, x_t)
    if kind == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if kind == "v_prediction":
        return a * x_t - s * model_output, a * model_output + s * x_t
    if kind == "sample":
        return model_output, (x_t - a * model_output) / s
    raise ValueError(f"prediction_type={kind!r} (epsilon, v_prediction, sample)")


def add_noise(
    x0: Tensor, eps: Tensor, t: Tensor | int, schedule: NoiseSchedule, pure_noise_at_T: bool = False
) -> Tensor:
    """Forward process q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM, arXiv 2006.11239, eq.
    4).

    pure_noise_at_T: where t == T-1 return eps itself. SDXL's abar_{T-1} = 0.0047 leaks signal at the start of
    sampling; SDXL-Lightning (arXiv 2402.13929, Sec. 3.3) trains at t = T on pure noise to match inference.
    """
    x_t = schedule.alpha(t, x0) * x0 + schedule.sigma(t, x0) * eps
    if pure_noise_at_T:
        last = torch.as_tensor(t, device=x0.device) == schedule.num_train_timesteps - 1
        x_t = torch.where(last.reshape(last.shape + (1,) * (x0.ndim - last.ndim)), eps, x_t)
    return x_t


def renoise(x_s: Tensor, s: Tensor | int, t: Tensor | int, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Forward process from s to t >= s, q(x_t | x_s) = N(sqrt(abar_t / abar_s) x_s, (1 - abar_t / abar_s) I) (DDPM's
    Markov chain marginalised between the two times); s < 0 is the clean end (abar = 1), which is add_noise."""
    dev = x_s.device
    ratio = schedule.abar(t, dev) / schedule.abar(s, dev)
    shape = (-1,) + (1,) * (x_s.ndim - 1)
    a = ratio.sqrt().to(x_s.dtype)
    b = (1.0 - ratio).clamp(min=0).sqrt().to(x_s.dtype)
    if a.ndim:
        a, b = a.reshape(shape), b.reshape(shape)
    return a * x_s + b * eps


def ddim_step(x0: Tensor, eps: Tensor, s: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """Deterministic DDIM (eta = 0) to timestep s: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps
    (arXiv 2010.02502, eq. 12 with sigma_t = 0). s < 0 means clean (abar = 1) and returns x0 exactly."""
    return schedule.alpha(s, x0) * x0 + schedule.sigma(s, x0) * eps


def move(
    x_t: Tensor,
    model_output: Tensor,
    t: Tensor | int,
    t_next: Tensor | int,
    schedule: NoiseSchedule,
    prediction_type: str | None = None,
) -> Tensor:
    """SDXL-Lightning's move(x_t, u, t, t') = forward(x(x_t, u, t), eps(x_t, u, t), t') (arXiv 2402.13929,
    Sec. 2): one deterministic DDIM step from t to t_next with the prediction made at t."""
    x0, eps = to_x0_eps(model_output, x_t, t, schedule, prediction_type)
    return ddim_step(x0, eps, t_next, schedule)


def euler_step(
    x: Tensor,
    model_output: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    prediction_type: str = "epsilon",
) -> Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x)) / sigma in x/alpha coordinates
    (EDM, arXiv 2206.00364, eq. 3 and Algorithm 1 without churn), as diffusers' EulerDiscreteScheduler.step.

    x is the sampler state x_t / alpha_t (the model sees x / sqrt(sigma^2 + 1)); sigma = sqrt((1-abar)/abar).
    """
    if prediction_type == "epsilon":
        x0 = x - sigma * model_output
    elif prediction_type == "sample":
        x0 = model_output
    elif (
        prediction_type == "v_prediction"
    ):  # in VE coordinates: x0 = -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)
        x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        raise ValueError(f"prediction_type={prediction_type!r} (epsilon, v_prediction, sample)")
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma)


class DPMSolverPP2M:
    """DPM-Solver++(2M), deterministic multistep second order (Lu et al. 2022, arXiv 2211.01095, Algorithm 2),
    with diffusers' DPMSolverMultistepScheduler semantics: algorithm "dpmsolver++", solver_type "midpoint",
    final sigma 0, first order on the first step and on the final step (lower_order_final).

    Usage: `solver = DPMSolverPP2M(schedule, timesteps)`; then for each t in solver.timesteps:
    `x = solver.step(model(x, t), x)`. The timesteps are `inference_timesteps(n, spacing, solver="dpmpp2m")`.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        timesteps: Tensor,
        prediction_type: str | None = None,
        lower_order_final: bool = True,
    ):
        self.schedule = schedule
        self.timesteps = timesteps.long().cpu()
        self.prediction_type = prediction_type or schedule.prediction_type
        self.lower_order_final = lower_order_final
        ve = torch.cat([schedule.ve_sigma(self.timesteps), torch.zeros(1, dtype=torch.float64)]).tolist()
        # VP pair (alpha, sigma) of each grid point and its half log-SNR lambda = log(alpha / sigma)
        # (paper eq. 3).
        self._alpha = [1.0 / math.sqrt(v * v + 1.0) for v in ve]
        self._sigma = [v * a for v, a in zip(ve, self._alpha)]
        self._lambda = [
            math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(self._alpha, self._sigma)
        ]
        self.step_index = 0
        self._prev_x0: Tensor | None = None

    def _x0(self, model_output: Tensor, x: Tensor) -> Tensor:
        """Data prediction (DPM-Solver++ integrates x0, not eps)."""
        a, s = self._alpha[self.step_index], self._sigma[self.step_index]
        if self.prediction_type == "epsilon":
            return (x - s * model_output) / a
        if self.prediction_type == "v_prediction":
            return a * x - s * model_output
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"prediction_type={self.prediction_type!r}")

    def step(self, model_output: Tensor, x: Tensor) -> Tensor:
        """Advance x from timesteps[step_index] to the next grid point (or to the clean end)."""
        i, n = self.step_index, len(self.timesteps)
        if i >= n:
            raise RuntimeError("DPMSolverPP2M: all steps taken")
        x0 = self._x0(model_output, x)
        a_t, s_s, s_t = self._alpha[i + 1], self._sigma[i], self._sigma[i + 1]
        first_order = self._prev_x0 is None or (
            i == n - 1 and (self.lower_order_final and n < 15 or s_t == 0)
        )
        if s_t == 0.0:
            # Final sigma 0: h = inf and the first-order update's limit is x0 itself.
            x_next = x0
        else:
            h = self._lambda[i + 1] - self._lambda[i]
            phi = a_t * (math.exp(-h) - 1.0)  # first-order (DDIM-equivalent) update, paper eq. 9
            if first_order:
                x_next = (s_t / s_s) * x - phi * x0
            else:  # midpoint 2M: D = x0_i + (x0_i - x0_{i-1}) / (2 r), r = h_{i-1} / h_i (Algorithm 2)
                r = (self._lambda[i] - self._lambda[i - 1]) / h
                d1 = (1.0 / r) * (x0 - self._prev_x0)
                x_next = (s_t / s_s) * x - phi * x0 - 0.5 * phi * d1
        self._prev_x0 = x0
        self.step_index += 1
        return x_next


def euler_sigmas(schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """Sigma grid (x/alpha coordinates) of EulerDiscreteScheduler for these timesteps, with a final 0
    appended: linear interpolation of sqrt((1-abar)/abar) at (possibly fractional) timesteps
    (interpolation_type "linear")."""
    table = schedule.ve_sigma(torch.arange(schedule.num_train_timesteps))
    t = timesteps.to(torch.float64).cpu()
    lo = t.floor().long().clamp(0, schedule.num_train_timesteps - 1)
    hi = (lo + 1).clamp_max(schedule.num_train_timesteps - 1)
    w = t - lo.to(torch.float64)
    return torch.cat([table[lo] * (1 - w) + table[hi] * w, torch.zeros(1, dtype=torch.float64)])


def consistency_scalings(
    t: Tensor | int, timestep_scaling: float = 10.0, sigma_data: float = 0.5, like: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Boundary-condition scalings of the consistency function f = c_skip x_t + c_out x0_hat (LCM paper,
    arXiv 2310.04378, eq. 5 / Consistency Models arXiv 2303.01469, App. C) as diffusers' LCMScheduler:
    c_skip = s_d^2 / ((s t)^2 + s_d^2), c_out = s t / sqrt((s t)^2 + s_d^2), s = timestep_scaling.

    Computed in float64; with `like`, cast to its dtype and shaped (B, 1, ..., 1).
    """
    st = (
        torch.as_tensor(t, dtype=torch.float64, device=like.device if like is not None else None)
        * timestep_scaling
    )
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    if like is not None:
        shape = c_skip.shape + (1,) * (like.ndim - 1) if c_skip.ndim == 1 else c_skip.shape
        c_skip, c_out = c_skip.to(like.dtype).reshape(shape), c_out.to(like.dtype).reshape(shape)
    return c_skip, c_out
