"""Schedules: the grid of t (0 = noise, 1 = data) each backbone's own diffusers pipeline samples on, and the grid
(with its loss weights) that the backbone's training recipe draws training timesteps from.

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


# ----- training: the grid of t that the authors' release (DiffSynth-Studio) draws training timesteps from -----
# diffsynth/diffusion/flow_match.py: FLUX.2 trains on linspace(1, 1/1000, 1000) shifted exponentially with a fixed
# mu = 0.8 (training sets its 1000-step grid without `dynamic_shift_len`; its comment: "it yields better training
# results"). The pipeline's own `compute_empirical_mu` is a fit over 10-200 sampling steps: at a 1000-point grid
# it extrapolates to mu = -3.5 for 1024² (a shift towards data), so it is no training recipe.
FLUX2_TRAIN_MU = 0.8


def training_grid(scheduler_config, mu: float | None = None) -> torch.Tensor:
    """t grid (G,) that training draws from uniformly: the scheduler's num_train_timesteps sigmas 1, ..., 1/G,
    shifted by the scheduler itself (a fresh copy from `scheduler_config`): by `mu` when it shifts dynamically,
    else by its static `shift`. Z-Image's grid, linspace(1, 0, 1001)[:-1] shifted by 3, is this with its config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    G = sched.config.num_train_timesteps
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / G, G).tolist(), mu=mu)
    return 1.0 - sched.sigmas[:-1].float()  # (G,): drop the terminal sigma 0 the scheduler appends


def flux2_klein_training(scheduler_config) -> torch.Tensor:
    """FLUX.2-klein's training grid as the authors' release shifts it (mu = FLUX2_TRAIN_MU at every resolution)."""
    return training_grid(scheduler_config, FLUX2_TRAIN_MU)


def zimage_training(scheduler_config, image_seq_len: int) -> torch.Tensor:
    """Z-Image's training grid: its scheduler's static shift (3 in the published config, as the authors train);
    a config that shifts dynamically gets mu from the latent length as ZImagePipeline computes it."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    c = scheduler_config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    return training_grid(c, mu)

