import pytest
import torch

from i2l.backbones.schedule import timestep_schedule
from i2l.config import get_config
from i2l.infer.guidance import sample
from i2l.model.flow_matching import fm_loss, interpolate
from i2l.model.lora import LoRA
from i2l.toy.backbone import build_vocab, new_toy_backbone


def _bb():
    cfg = get_config("debug")
    return new_toy_backbone(cfg.backbone, build_vocab(["one small circle in the center"])).freeze()


def _rand_lora(bb, n, seed):
    g = torch.Generator().manual_seed(seed)
    t = bb.lora_targets()
    return LoRA({k: torch.randn(n, 2, i, generator=g) * 0.1 for k, (i, o) in t.items()},
                {k: torch.randn(n, o, 2, generator=g) * 0.1 for k, (i, o) in t.items()}, bb.backbone_id)


def test_interpolation_endpoints_and_target():
    x0, x1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, x1, torch.zeros(2)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(2)), x1)
    s = timestep_schedule(10)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:] > s[:-1])


def test_fm_loss_is_zero_for_a_perfect_velocity():
    class Oracle:
        def velocity(self, x_t, t, cond, lora=None):
            return x1 - noise
    x1, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert fm_loss(Oracle(), x1, None, noise=noise, t=torch.rand(3)) == 0


@pytest.mark.parametrize("passes", ["joint", "split"])
def test_identical_loras_on_both_branches_equal_plain_cfg(passes):
    bb = _bb()
    n = 2
    cond = bb.encode_prompts(["one small circle in the center"] * n)
    neg = bb.encode_prompts([""] * n)
    lora = _rand_lora(bb, n, 0)
    noise = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    asym = sample(bb, cond, neg, lora, lora, guidance=3.0, steps=3, noise=noise, passes=passes)
    # plain CFG written out: the same LoRA on both branches, two separate forwards per step
    x, ts = noise, timestep_schedule(3)
    with torch.no_grad():
        for i in range(3):
            t = ts[i].expand(n)
            vp = bb.velocity(x, t, cond, lora)
            vn = bb.velocity(x, t, neg, lora)
            x = x + (ts[i + 1] - ts[i]) * (vn + 3.0 * (vp - vn))
    assert torch.allclose(asym, x, atol=1e-5)


@pytest.mark.parametrize("passes", ["joint", "split"])
def test_asymmetric_cfg_batched_equals_two_pass(passes):
    bb = _bb()
    n = 2
    cond, neg = bb.encode_prompts(["one small circle in the center"] * n), bb.encode_prompts([""] * n)
    pos_l, neg_l = _rand_lora(bb, n, 0), _rand_lora(bb, n, 5)
    noise = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = sample(bb, cond, neg, pos_l, neg_l, guidance=2.5, steps=3, noise=noise, passes=passes)
    x, ts = noise, timestep_schedule(3)
    with torch.no_grad():
        for i in range(3):
            t = ts[i].expand(n)
            vp, vn = bb.velocity(x, t, cond, pos_l), bb.velocity(x, t, neg, neg_l)
            x = x + (ts[i + 1] - ts[i]) * (vn + 2.5 * (vp - vn))
    assert torch.allclose(out, x, atol=1e-5)
    plain = sample(bb, cond, neg, pos_l, pos_l, guidance=2.5, steps=3, noise=noise, passes=passes)
    assert not torch.allclose(out, plain, atol=1e-4)  # the negative LoRA matters


def test_inpainting_keeps_the_known_region():
    bb = _bb()
    cond = bb.encode_prompts(["one small circle in the center"])
    known = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    out = sample(bb, cond, steps=4, noise=torch.randn(1, 3, 32, 32), inpaint=(known, mask))
    assert torch.allclose(out * (1 - mask), known * (1 - mask), atol=1e-5)
    assert not torch.allclose(out * mask, known * mask, atol=1e-2)


def test_fm_loss_gives_a_bf16_backbone_the_exact_t_and_target():
    """bf16 latents (a real preset's encode_images) must not round t: t = 0.97 in bf16 is 0.96875, a 4 % error in
    sigma = 1 - t. The model gets t in fp32 and the loss compares with x1 - x0 computed in fp32."""
    seen = []

    class Spy:  # a velocity that records its t and returns x_t itself
        def velocity(self, x_t, t, cond, lora=None, strength=1.0):
            seen.append(t)
            return x_t.to(torch.bfloat16)

    x1 = torch.full((2, 3, 4, 4), 1.001).to(torch.bfloat16)  # 1.0 in bf16
    noise = torch.full((2, 3, 4, 4), 0.3).to(torch.bfloat16)
    t = torch.tensor([0.97, 0.31])
    loss = fm_loss(Spy(), x1, None, t=t, noise=noise, reduce=False)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], t)
    x_t = (1 - t.view(-1, 1, 1, 1)) * noise.float() + t.view(-1, 1, 1, 1) * x1.float()
    want = ((x_t.to(torch.bfloat16).float() - (x1.float() - noise.float())) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, want)
