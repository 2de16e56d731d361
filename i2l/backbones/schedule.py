"""Sampling schedules: the grid of t (0 = noise, 1 = data) each backbone's own diffusers pipeline samples on.

FLUX.2-klein and Z-Image do not step uniformly in t: their pipelines shift the grid towards the noise end by a
resolution-dependent amount (a dynamic `mu`, or the scheduler's static `shift`). Sampling a real checkpoint on a
uniform grid gives different, usually worse, images at the same step count, so i2l asks the pipeline's own
scheduler (a fresh copy: the pipeline's state is left alone) for the grid, with `mu` computed by the pipeline's own
helper. diffusers' sigma runs the other way: t = 1 - sigma.
"""

from __future__ import annotations

import numpy as np
import torch


def timestep_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps+1 values of t from 0 (noise) to 1 (data); shift > 1 spends more steps near noise."""
    s = torch.linspace(1.0, 0.0, steps + 1)  # sigma = 1 - t
    s = shift * s / (1 + (shift - 1) * s)
    return 1.0 - s


def uniform(steps: int) -> torch.Tensor:
    """steps+1 equally spaced t from 0 to 1 (the toy backbone is trained and sampled on this grid)."""
    return timestep_schedule(steps)


def from_scheduler(scheduler_config, steps: int, sigmas: list[float] | None, mu: float) -> torch.Tensor:
    """t grid (steps+1,) that a FlowMatchEulerDiscreteScheduler with this config sets for (steps, sigmas, mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, sigmas=sigmas, mu=mu)
    return 1.0 - sched.sigmas.float()  # (steps+1,): the scheduler appends the terminal sigma 0 (t = 1)


def flux2_klein(scheduler_config, steps: int, image_seq_len: int) -> torch.Tensor:
    """As Flux2KleinPipeline.__call__: sigmas linspace(1, 1/steps) (unless the scheduler brings its own), shifted
    by the empirical mu of the packed latent length and the step count."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sigmas = None if scheduler_config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps).tolist()
    return from_scheduler(scheduler_config, steps, sigmas, compute_empirical_mu(image_seq_len, steps))


def zimage(scheduler_config, steps: int, image_seq_len: int) -> torch.Tensor:
    """As ZImagePipeline.__call__: its default sigmas, mu from the latent length (used when the scheduler shifts
    dynamically; otherwise the scheduler's static shift applies)."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    c = scheduler_config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    return from_scheduler(c, steps, get_default_z_image_sigmas(steps), mu)
