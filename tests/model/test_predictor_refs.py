"""More references than training saw (the paper's Fig. 4 uses 8; training draws 1..predictor.max_refs): the
predictor's forward reads no parameter that training left without a gradient."""

from dataclasses import replace

import torch

from i2l.config import get_config
from i2l.model.flow_matching import fm_loss
from i2l.model.predictor import I2LPredictor, predict_lora
from i2l.toy.backbone import build_vocab, new_toy_backbone
from i2l.toy.encoder import new_toy_encoder

PROMPT = "one small circle"
TRAINED = 4  # predictor.max_refs: training draws 1..4 references


def _world():
    cfg = get_config("debug")
    bb = new_toy_backbone(cfg.backbone, build_vocab([PROMPT])).freeze()
    enc = new_toy_encoder(cfg.encoder)
    pred = I2LPredictor(replace(cfg.predictor, max_refs=TRAINED), bb.lora_targets(), enc.dim, bb.backbone_id)
    with torch.no_grad():
        for p in pred.head_B.D:
            p.normal_(0, 0.1)  # past the first step: B is no longer zero, so every part gets a gradient
    return bb, enc, pred


def _grads(bb, enc, pred, refs: torch.Tensor, n_refs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the flow-matching loss through the backbone w.r.t. every predictor parameter."""
    pred.zero_grad(set_to_none=True)
    lora = predict_lora(pred, enc, refs, n_refs)
    x1 = torch.randn(len(refs), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with bb.lora_adapter.use(lora):
        fm_loss(bb, x1, bb.encode_prompts([PROMPT] * len(refs)), lora,
                generator=torch.Generator().manual_seed(2)).backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in pred.named_parameters()}


def test_eight_references_use_only_what_training_with_at_most_four_trained():
    bb, enc, pred = _world()
    g = torch.Generator().manual_seed(0)
    # one training step with every count training draws, the most (max_refs) included
    refs = torch.rand(TRAINED, TRAINED, 3, 32, 32, generator=g) * 2 - 1
    trained = _grads(bb, enc, pred, refs, torch.arange(1, TRAINED + 1))
    rows_trained = trained["ref_embed.weight"].abs().sum(1) > 0  # (64,)
    assert rows_trained.nonzero().flatten().tolist() == list(range(TRAINED))
    assert all(v.abs().sum() > 0 for v in trained.values())  # every parameter learns...

    read = []
    hook = pred.ref_embed.register_forward_hook(lambda m, args, out: read.append(args[0].unique()))
    eight = _grads(bb, enc, pred, torch.rand(2, 8, 3, 32, 32, generator=g) * 2 - 1, torch.tensor([8, 6]))
    hook.remove()
    assert set(torch.cat(read).tolist()) <= set(range(TRAINED))  # ...and 8 references read only trained rows
    rows_used = eight["ref_embed.weight"].abs().sum(1) > 0
    assert rows_used.any() and not (rows_used & ~rows_trained).any()
    for name, grad in eight.items():  # any parameter the 8-reference forward depends on was trained
        assert grad.abs().sum() == 0 or trained[name].abs().sum() > 0, name


def test_up_to_max_refs_each_reference_keeps_its_own_row_and_two_copies_of_a_set_are_the_set():
    """Up to max_refs the rows are the identity (what training saw: the debug/toy numbers are unchanged); past it
    references reuse the trained rows in turn, so a set of 4 given twice (8 references) is exactly the set."""
    _, enc, pred = _world()
    assert pred.ref_slots(torch.arange(TRAINED)).tolist() == list(range(TRAINED))
    assert pred.ref_slots(torch.arange(9)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    refs = torch.rand(1, TRAINED, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        four = predict_lora(pred, enc, refs)
        eight = predict_lora(pred, enc, torch.cat([refs, refs], dim=1))
        three = predict_lora(pred, enc, refs[:, :3])
    for n in four.names:
        assert torch.allclose(four.delta(n), eight.delta(n), atol=1e-5), n
    assert not torch.allclose(four.delta(n), three.delta(n), atol=1e-4)  # not a constant LoRA


def test_the_gray_negative_has_as_many_gray_images_as_the_positive_has_references():
    """eval.gray_negative="per_reference" (the real presets, as the authors' release): the negative LoRA of a
    4-reference LoRA is predicted from 4 gray images; "one" (debug / toy: their numbers unchanged) from one."""
    from PIL import Image

    from i2l.data.images import gray_image, to_tensor
    from i2l.infer.api import I2L

    bb, enc, pred = _world()
    cfg = get_config("debug")
    assert cfg.eval.gray_negative == "one" and get_config("klein4b").eval.gray_negative == "per_reference"
    cfg.eval.gray_negative = "per_reference"
    model = I2L(cfg, bb, enc, pred)
    gray = to_tensor([gray_image(cfg.encoder.image_size)], cfg.encoder.image_size)  # (1, 3, S, S)
    with torch.no_grad():
        for n in (1, 4):
            want = predict_lora(pred, enc, gray.expand(n, -1, -1, -1).unsqueeze(0))
            got = model.gray_lora(n)
            assert all(torch.allclose(got.delta(k), want.delta(k)[0], atol=1e-6) for k in got.names)
    k = got.names[0]
    assert not torch.allclose(model.gray_lora(1).delta(k), model.gray_lora(3).delta(k), atol=1e-6)

    asked = []
    model.gray_lora = lambda n=1: asked.append(n) or I2L.gray_lora(model, n)
    four = model.predict_lora([Image.new("RGB", (32, 32), c) for c in ("red", "navy", "gold", "teal")])
    model.generate(["one small circle"], four, steps=1)
    assert asked == [4]

    cfg.eval.gray_negative = "one"
    single = I2L(cfg, bb, enc, pred)
    assert single.gray_lora(4) is single.gray_lora(1)
