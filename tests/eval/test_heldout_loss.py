"""The held-out loss's breakdown by timestep: each entry is the FM loss at that t of the fixed grid, averaged over
the noise seeds, and the overall loss is what it was before the breakdown."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import PROMPTS, random_lora, tiny_toy

from i2l.data.images import to_tensor
from i2l.eval.heldout_loss import ValSample, heldout_loss, heldout_loss_by_t
from i2l.model.flow_matching import fm_loss


@pytest.mark.parametrize("with_lora", [False, True])
def test_each_entry_is_the_loss_at_its_timestep_over_the_noise_seeds(with_lora):
    bb = tiny_toy()
    size, T, S, index = bb.cfg.image_size, 4, 3, 5
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    sample = ValSample("v0", "s1", PROMPTS[0], "", img, [img], [PROMPTS[0]])
    lora = random_lora(bb, None) if with_lora else None
    loss, by_t = heldout_loss_by_t(bb, sample, lora, size, T, S, index)
    assert len(by_t) == T and loss == heldout_loss(bb, sample, lora, size, T, S, index)
    assert sum(by_t) / T == pytest.approx(loss, rel=1e-6)
    # each t alone: the grid's t_k with each seed's noise (the seeds as heldout_loss draws them)
    x1 = bb.encode_images(to_tensor([img], size))
    cond = bb.encode_prompts([PROMPTS[0]])
    with torch.no_grad():
        for k in range(T):
            t = torch.tensor([(k + 0.5) / T])
            per_seed = [float(fm_loss(bb, x1, cond, None if lora is None else lora.expand(1), t=t,
                                      noise=torch.randn(x1.shape, generator=torch.Generator().manual_seed(
                                          1000 * index + s))))
                        for s in range(S)]
            assert by_t[k] == pytest.approx(sum(per_seed) / S, rel=1e-4), k
    # the entries differ by t: a wrong reading of the (seed, t) grid could not pass the checks above
    assert len({round(v, 6) for v in by_t}) == T
