"""The frozen-output caches of predictor training (train.cache_frozen): the same losses as without them, the
reference encoder really skipped for references seen before, bounded memory, and no tokens of other weights."""

import copy

import torch

from i2l.config import get_config
from i2l.model.encoder import FrozenCache, ImageEncoder
from i2l.train.loop import train_predictor


def _cfg(debug_run, **over):
    cfg = get_config("debug", {"train.steps": 8, "train.ckpt_every": 8, **over})
    cfg.data_root = str(debug_run.data_root)
    cfg.backbone.path, cfg.encoder.path = debug_run.cfg.backbone.path, debug_run.cfg.encoder.path
    return cfg


def _train(debug_run, out, cache: bool):
    """Train 8 steps; -> (losses, images the reference encoder encoded, calls of it, the run's summary)."""
    seen = {"images": 0, "calls": 0}

    def count(module, args, output):  # the encoder's vision tower (SiglipVisionModel), whoever calls it
        if type(module).__name__ in ("SiglipVisionModel", "Siglip2VisionModel"):
            seen["images"] += output.last_hidden_state.shape[0]
            seen["calls"] += 1

    losses = []
    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        info = train_predictor(_cfg(debug_run, **{"train.cache_frozen": cache}), debug_run.prepared_dir, out,
                               progress=False, report=lambda rec: losses.append(rec["loss"]))
    finally:
        hook.remove()
    return losses, seen, info


def test_cached_training_gives_the_uncached_losses_and_skips_the_encoder(debug_run, tmp_path):
    plain, enc_plain, _ = _train(debug_run, tmp_path / "plain", cache=False)
    cached, enc_cached, info = _train(debug_run, tmp_path / "cached", cache=True)
    assert len(plain) == len(cached) == 8
    assert cached == plain  # exactly: the cached tokens are the very values the encoder gives
    assert info["cache_refs_hits"] > 0 and info["cache_prompts_hits"] > 0
    assert enc_cached["calls"] == info["cache_refs_calls"] <= enc_plain["calls"] == 8
    assert enc_cached["images"] < enc_plain["images"]  # references seen before were not encoded again


def _encoder(seed: int) -> ImageEncoder:
    from i2l.backbones.random_init import random_encoder

    return random_encoder(get_config("debug").encoder, seed=seed)


def _sets():
    g = torch.Generator().manual_seed(0)
    imgs = {f"r{i}": torch.rand(3, 32, 32, generator=g) * 2 - 1 for i in range(5)}
    return imgs, [["r0", "r1", "r2"], ["r3"], ["r1", "r4"]]


def test_cached_tokens_equal_encode_refs_and_only_misses_are_encoded():
    enc = _encoder(0)
    imgs, sets = _sets()
    asked = []

    def load(ids):
        asked.append(list(ids))
        return torch.stack([imgs[i] for i in ids])

    cache = FrozenCache(enc)
    refs = torch.zeros(3, 3, 3, 32, 32)
    for u, s in enumerate(sets):
        refs[u, : len(s)] = torch.stack([imgs[i] for i in s])
    want = enc.encode_refs(refs, torch.tensor([3, 1, 2]))
    for _ in range(2):
        got = enc.encode_ref_sets(sets, load, cache)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert asked == [["r0", "r1", "r2", "r3", "r4"]]  # each image once, the second call all hits
    assert cache.calls == 1 and cache.hits == 9  # the second call: all 3 x 3 slots (padding too) hit


def test_an_image_gives_the_same_tokens_whatever_its_memory_layout_and_batch(debug_run):
    """The data path hands the encoder channels-last views (`to_tensor`), a zero-padded batch hands it contiguous
    copies, and a cache encodes each image in whatever batch first needed it. The vision tower always sees one
    layout, so a token never depends on how or beside what its image was encoded (on an AVX2-only CPU the conv
    kernels of the two layouts rounded differently: cached training drifted from uncached, a resume from a straight
    run)."""
    import numpy as np
    from PIL import Image

    from i2l.data.images import to_tensor
    from i2l.model.encoder import load_encoder

    enc = load_encoder(debug_run.cfg.encoder)  # trained weights: on the AVX2 host random ones rounded alike
    g = np.random.default_rng(0)
    pil = [Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(7)]
    x = to_tensor(pil, 32)  # (7, 3, 32, 32), as training loads references
    assert not x.is_contiguous()  # the case under test: otherwise this checks nothing
    seen = []
    hook = enc.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).is_contiguous()),
        with_kwargs=True)
    try:
        got = enc(x)  # (7, P, D)
    finally:
        hook.remove()
    assert seen == [True]
    assert torch.equal(got, enc(x.contiguous()))
    assert torch.equal(got[2:5], enc(x[2:5]))  # a batch of its own
    assert torch.equal(got[[6, 0]], enc(torch.cat([x[6:], x[:1], torch.zeros(1, 3, 32, 32)]))[:2])  # others beside


def test_the_cache_serves_no_tokens_of_other_weights():
    enc = _encoder(0)
    imgs, sets = _sets()
    cache = FrozenCache(enc)
    enc.encode_ref_sets(sets, lambda ids: torch.stack([imgs[i] for i in ids]), cache)
    assert len(cache) == 6  # 5 references + the padding image
    cache.check(copy.deepcopy(enc))  # other module, same weights: kept
    assert len(cache) == 6
    other = _encoder(1)
    cache.check(other)  # other weights: emptied
    assert len(cache) == 0
    got = other.encode_ref_sets(sets, lambda ids: torch.stack([imgs[i] for i in ids]), cache)
    assert not torch.equal(got[0], enc.encode_ref_sets(sets, lambda ids: torch.stack([imgs[i] for i in ids]))[0])
    assert len(cache) == 6
    with torch.no_grad():  # the bound weights changed in place (a load_state_dict): emptied on the next use
        next(other.parameters()).add_(1.0)
    other.encode_ref_sets([["r0"]], lambda ids: torch.stack([imgs[i] for i in ids]), cache)
    assert len(cache) == 1


def test_the_cache_stays_within_its_bound_and_still_answers_right():
    enc = _encoder(0)
    imgs, sets = _sets()
    one = enc(imgs["r0"][None])[0]
    cache = FrozenCache(enc, max_mb=2.5 * one.numel() * one.element_size() / 2**20)  # room for 2 entries
    load = lambda ids: torch.stack([imgs[i] for i in ids])
    for _ in range(2):
        got = enc.encode_ref_sets(sets, load, cache)
        assert len(cache) == 2 and cache.bytes <= cache.max_bytes
        assert torch.equal(got[0], enc.encode_ref_sets(sets, load)[0])


def test_the_train_cache_bench_times_both_side_by_side(tmp_path):
    from i2l.cli import main
    from i2l.store import Store

    store = tmp_path / "results.duckdb"
    assert main(["bench", "train-cache", "--preset", "debug", "--styles", "6", "--rounds", "2", "--warmup", "2",
                 "--store", str(store)]) == 0
    df = Store(store).query("SELECT case_name, metric, value FROM benchmarks WHERE bench = 'train_cache'")
    got = {(r.case_name, r.metric): r.value for r in df.itertuples()}
    for case in ("uncached", "cached", "cond_uncached", "cond_cached"):
        assert got[(f"debug/train_step_{case}", "steps_per_s")] > 0
    assert got[("debug/train_step_uncached/cached", "ratio")] > 0
    assert 0 < got[("debug/cache", "ref_hit_rate")] <= 1  # the cached cases were served from the cache
