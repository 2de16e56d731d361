"""The evaluation stage (the toy world's Table 1): each method's conditioning for cfg.eval.styles held-out
samples (i2l/eval/methods.py), one image per sample and method from the same prompt and noise, scores and
held-out FM loss, recorded in the results store in one transaction. Re-running the same does no work."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from i2l.config import Config
from i2l.data.images import to_pil
from i2l.eval.heldout_loss import ValSample, load_val_samples
from i2l.eval.methods import (
    Conditioning,
    adapter_conditioning,
    base_conditioning,
    heldout_losses,
    i2l_conditionings,
    i2l_ref_counts,
    mean_lora_conditioning,
    per_style_conditionings,
)
from i2l.io import file_sha256, json_digest
from i2l.model.lora import LoRA
from i2l.store import Store
from i2l.train.checkpoint import checkpoint_config, read_state, require_checkpoint

FAMILIES = ("base", "mean_lora", "per_style", "i2l", "adapter")


def evaluate(cfg: Config, prepared_dir: str | Path, run_dir: str | Path, store: Store,
             out_dir: str | Path | None = None, parent_id: str | None = None,
             families: tuple[str, ...] = FAMILIES, baselines_dir: str | Path | None = None,
             device: str | None = None, progress: bool = True) -> dict:
    """Evaluate the predictor of `run_dir` (a training run or one checkpoint dir) on `prepared_dir`'s held-out
    samples. `cfg` supplies the eval and scorer settings (and data root); the model, and the budget of the
    mean-LoRA and adapter baselines, come from the checkpoint. Images go under out_dir (default run_dir/eval).
    Returns {run_id, key, samples, methods, seconds, summary} ({..., skipped: True} when already done)."""
    t0 = time.perf_counter()
    ck = require_checkpoint(run_dir)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown method families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    ecfg = eval_config(cfg, ck)
    dataset_id = dataset_fingerprint(prepared_dir)
    key = eval_key(ecfg, ck, dataset_id, families)
    if store.is_stage_done("eval", key):
        info = store.stage_info("eval", key) or {}
        if progress:
            print(f"evaluation {key} already done (run {info.get('run_id')}): nothing to do")
        return {**info, "skipped": True}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    samples = held_out_samples(prepared_dir, ecfg.eval.styles)
    with store.run("eval", ecfg.name, ecfg.to_dict(), parent_id=parent_id) as run_id:
        from i2l.infer.api import I2L

        model = I2L.load(ck, device=device, data_root=ecfg.data_root)
        model.cfg.eval, model.cfg.scorer = ecfg.eval, ecfg.scorer
        base_dir = Path(baselines_dir) if baselines_dir else out_dir / "baselines"
        conds = make_conditionings(model, samples, families, prepared_dir, base_dir, store, run_id,
                                   dataset_id, progress)
        losses = heldout_losses(model, samples, conds, progress)
        run_out = out_dir / run_id
        refs = save_references(samples, run_out / "refs", store.path.parent)
        loras = save_loras(conds, samples, run_out / "loras", model, run_id) if ecfg.eval.save_loras \
            else lora_rows(conds, samples, run_id, model)
        sample_rows, score_rows = generate_and_score(model, samples, conds, refs, loras, run_out / "samples",
                                                     store, run_id, progress)
        summary = summarize(conds, sample_rows, score_rows, losses)
        info = {"run_id": run_id, "key": key, "checkpoint": str(ck), "samples": len(samples),
                "images": len(sample_rows), "methods": [c.method for c in conds], "out_dir": str(run_out),
                "seconds": time.perf_counter() - t0, "summary": summary}
        with store.transaction():  # the stage's results land whole or not at all
            store.record_styles([{"style_id": s.style_id, "split": "val", "description": s.style,
                                  "dataset_id": dataset_id, "ref_paths": refs[i]}
                                 for i, s in enumerate(samples)])
            for c in conds:
                store.record_method(run_id, c.method, wall_s=c.mean_wall_s, budget_steps=c.budget or None,
                                    note=c.note)
            store.record_loras(list(loras.values()))
            store.record_samples(sample_rows)
            store.record_scores(score_rows)
            store.record_eval_loss(run_id, losses)
            store.mark_stage_done("eval", key, {k: v for k, v in info.items() if k != "summary"})
    if progress:
        print(format_summary(summary))
        print(f"evaluated {len(samples)} held-out samples x {len(conds)} methods in {info['seconds']:.0f}s "
              f"-> run {run_id} in {store.path}")
    return info


def held_out_samples(prepared_dir: str | Path, limit: int) -> list:
    """The validation manifest's first `limit` samples; none is an error, not an empty table."""
    samples = load_val_samples(prepared_dir, limit=limit)
    if not samples:
        raise ValueError(f"{prepared_dir}/val_manifest.jsonl has no samples: re-run `i2l prepare` with "
                         "data.val_samples > 0")
    return samples


# ----- identity of an evaluation ---------------------------------------------------------------------------

def eval_config(cfg: Config, ck: Path) -> Config:
    """The checkpoint's model config with the caller's eval and scorer settings and data root."""
    from i2l.eval.metrics import default_scorer_dir
    from i2l.layout import require_paths

    require_paths(cfg, "scorer.clip_checkpoint")
    ecfg = checkpoint_config(ck, cfg.data_root)
    ecfg.eval, ecfg.scorer, ecfg.data_root = replace(cfg.eval), replace(cfg.scorer), cfg.data_root
    clip = Path(ecfg.scorer.clip_checkpoint)
    # the command's preset names its own toy scorer dir; a checkpoint made under another preset has its scorer in
    # <data_root>/toy/<checkpoint's preset>/scorer
    if not clip.exists() and Path(default_scorer_dir(ecfg)).exists():
        ecfg.scorer.clip_checkpoint = default_scorer_dir(ecfg)
    return ecfg


def dataset_fingerprint(prepared_dir: str | Path) -> str:
    """The prepared data's id as the store names it (i2l.store.ingest.dataset_id: what the data is, not when it
    was written), so evaluation keys and the store's dataset rows agree."""
    from i2l.store.ingest import dataset_id, read_manifest

    return dataset_id(read_manifest(prepared_dir))


def eval_key(ecfg: Config, ck: Path, dataset_id: str, families: tuple[str, ...]) -> str:
    """Same predictor weights, data, eval + scorer settings, baselines' budget and methods => same key."""
    from i2l.eval.metrics.clip import clip_version

    # how generation and scoring run, not their numbers (an image does not depend on its batch)
    scorer = {k: v for k, v in asdict(ecfg.scorer).items() if k not in ("device", "batch_size")}
    ev = {k: v for k, v in asdict(ecfg.eval).items() if k != "gen_batch"}
    return json_digest({"predictor": file_sha256(Path(ck) / "predictor.safetensors"), "data": dataset_id,
                    "eval": ev, "scorer": scorer, "families": sorted(families),
                    "clip": clip_version(ecfg.scorer.clip_checkpoint, ecfg.scorer.clip_model),
                    "baselines": [baseline_budget(ecfg, ck, dataset_id, k)
                                  for k in ("mean_lora", "adapter")]})


def baseline_budget(ecfg: Config, ck: Path, dataset_id: str, kind: str) -> dict:
    """What a baseline's training depends on: the predictor's budget, backbone, encoder, data."""
    state = read_state(ck)
    t = ecfg.train
    out = {"kind": kind, "backbone": state["backbone_id"], "backbone_path": ecfg.backbone.path,
           "encoder": state["encoder_id"], "encoder_path": ecfg.encoder.path, "data": dataset_id,
           "steps": ecfg.eval.baseline_steps or t.steps, "batch_size": t.batch_size, "warmup": t.warmup,
           "seed": t.seed, "rank": ecfg.predictor.rank, "max_refs": ecfg.predictor.max_refs}
    if kind == "mean_lora":
        out["lr"] = ecfg.eval.mean_lora_lr
    else:
        e, p = ecfg.eval, ecfg.predictor
        out.update(lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, tokens=e.adapter_tokens,
                   hidden=e.adapter_hidden or p.hidden, depth=e.adapter_depth or p.depth,
                   heads=e.adapter_heads or p.heads)
    return out


# ----- methods ---------------------------------------------------------------------------------------------

def ensure_baseline(kind: str, model, prepared_dir, base_dir: Path, store: Store, parent_id: str,
                    dataset_id: str, progress: bool):
    """The trained mean-LoRA or adapter: reused when the store says this budget was trained and its files are
    there, else trained now (its own run with its loss curve, marked done as soon as it is saved)."""
    from i2l.baselines.adapter import load_adapter, train_adapter
    from i2l.baselines.mean_lora import load_mean_lora, train_mean_lora

    key = json_digest(baseline_budget(model.cfg, model.checkpoint, dataset_id, kind))
    out = base_dir / f"{kind}-{key}"
    load = (lambda: load_mean_lora(out, model.backbone)) if kind == "mean_lora" else \
        (lambda: load_adapter(out, model.backbone, model.encoder, device=str(model.encoder.device)))
    if store.is_stage_done(f"train_{kind}", key):
        try:
            return load()
        except FileNotFoundError:
            pass  # recorded but deleted since: train again
    train = train_mean_lora if kind == "mean_lora" else train_adapter
    with store.run(f"train_{kind}", model.cfg.name, model.cfg.to_dict(), parent_id=parent_id) as run_id:
        info = train(model.cfg, prepared_dir, out, progress=progress, device=str(model.encoder.device))
        curve = json.loads((out / f"{kind}.json").read_text())["curve"]
        with store.transaction():
            store.record_curve(run_id, curve)
            store.mark_stage_done(f"train_{kind}", key, {"dir": str(out), "run_id": run_id,
                                              **{k: v for k, v in info.items() if k != "dims"}})
    return load()


def make_conditionings(model, samples: list[ValSample], families, prepared_dir, base_dir: Path, store: Store,
                       run_id: str, dataset_id: str, progress: bool) -> list[Conditioning]:
    cfg, n = model.cfg, len(samples)

    def baseline(kind):
        return ensure_baseline(kind, model, prepared_dir, base_dir, store, run_id, dataset_id, progress)

    conds = []
    if "base" in families:
        conds.append(base_conditioning(n))
    if "mean_lora" in families:
        lora, info = baseline("mean_lora")
        conds.append(mean_lora_conditioning(lora, n, info["seconds"]))
    if "per_style" in families:
        e = cfg.eval
        conds += per_style_conditionings(model.backbone, samples, e.optimize_budgets, cfg.predictor.rank,
                                         cfg.backbone.image_size, e.lora_lr, e.per_style_rows, e.seed,
                                         progress)
    if "i2l" in families:
        conds += i2l_conditionings(model, samples, i2l_ref_counts(samples), progress)
    if "adapter" in families:
        adapter, _ = baseline("adapter")
        conds.append(adapter_conditioning(adapter, model.encoder, samples, 4, progress))
    return conds


# ----- images, LoRA files, samples and scores --------------------------------------------------------------

def save_references(samples: list[ValSample], refs_dir: Path, root: Path) -> list[list[str]]:
    """Each sample's references as PNG files (for the report's grid); their paths per sample, relative to
    `root` (the store's directory) when inside it."""
    out = []
    for s in samples:
        paths = []
        for j, im in enumerate(s.refs):
            p = refs_dir / f"{s.sample_id}_{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            im.save(p)
            paths.append(_relative(p, root))
        out.append(paths)
    return out


def lora_rows(conds: list[Conditioning], samples: list[ValSample], run_id: str, model,
              paths: dict | None = None) -> dict[tuple[str, int], dict]:
    """{(method, sample index): store row} for every LoRA an evaluated method used (asym variants share)."""
    rows = {}
    for c in conds:
        if c.lora_of or not c.loras:
            continue
        for i, (s, lo) in enumerate(zip(samples, c.loras, strict=True)):
            if lo is None:
                continue
            path = (paths or {}).get((c.method, i))
            rows[(c.method, i)] = {
                "lora_id": f"{run_id}/{c.method}/{s.sample_id}", "style_id": s.style_id, "method": c.method,
                "checkpoint_id": model.checkpoint_id if c.method.startswith("i2l") else None,
                "path": str(path) if path else None, "sha256": file_sha256(path) if path else None,
                "rank": lo.rank, "n_refs": c.n_refs, "norms": lo.norms()}
    return rows


def save_loras(conds, samples, loras_dir: Path, model, run_id: str) -> dict:
    """Write each evaluated LoRA as a diffusers-format safetensors file, then its store rows."""
    paths = {}
    for c in conds:
        if c.lora_of or not c.loras:
            continue
        for i, lo in enumerate(c.loras):
            if lo is not None and (c.method != "mean_lora" or i == 0):  # one file for the shared mean LoRA
                paths[(c.method, i)] = lo.save(loras_dir / c.method / f"{samples[i].sample_id}.safetensors",
                                               prefix=model.backbone.lora_prefix)
            elif lo is not None:
                paths[(c.method, i)] = paths[(c.method, 0)]
    return lora_rows(conds, samples, run_id, model, paths)


def _relative(path: Path, root: Path) -> str:
    """Image paths relative to the store's directory when inside it (the report resolves them there)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def generate_and_score(model, samples: list[ValSample], conds: list[Conditioning], refs: list[list[str]],
                       loras: dict, samples_dir: Path, store: Store, run_id: str,
                       progress: bool) -> tuple[list[dict], list[dict]]:
    """One image per (method, sample) with the sample's prompt and seed, many styles per batched sampling
    call; each chunk is saved and scored as soon as it is drawn. -> (sample rows, score rows)."""
    from tqdm import tqdm

    from i2l.eval.metrics import ScoreBatch, build_scorers, score_samples

    cfg = model.cfg
    jobs = [(c, i) for c in conds for i in range(len(samples))]
    # LoRA methods share batches; adapter rows carry longer contexts, so they are batched among themselves
    groups = [[j for j in jobs if j[0].extra is None], [j for j in jobs if j[0].extra is not None]]
    chunks = [g[k:k + cfg.eval.gen_batch] for g in groups for k in range(0, len(g), cfg.eval.gen_batch)]
    scorers = build_scorers(cfg)
    sample_rows, score_rows = [], []
    for chunk in tqdm(chunks, desc="generate + score", disable=not progress):
        seeds = [cfg.eval.seed + i for _, i in chunk]
        images = draw(model, [samples[i].prompt for _, i in chunk], chunk, seeds)
        ids = []
        for (c, i), im, seed in zip(chunk, images, seeds, strict=True):
            s = samples[i]
            path = samples_dir / c.method / f"{s.sample_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path)
            ids.append(f"{run_id}/{c.method}/{s.sample_id}")
            lora = loras.get((c.lora_of or c.method, i))
            sample_rows.append({
                "sample_id": ids[-1], "run_id": run_id, "method": c.method, "style_id": s.style_id,
                "prompt": s.prompt, "seed": seed, "lora_id": lora["lora_id"] if lora else None,
                "image_path": _relative(path, store.path.parent),
                "settings": {"guidance": cfg.eval.guidance, "steps": cfg.eval.sample_steps, "asym": c.asym,
                             "negative": "gray_lora" if c.asym else "same", "n_refs": c.n_refs,
                             "budget_steps": c.budget or None, "val_sample": s.sample_id,
                             "refs": refs[i][:c.n_refs]}})
        # every method is judged against the sample's full reference set, whatever it saw
        chosen = [samples[i] for _, i in chunk]
        batch = ScoreBatch(images, [s.prompt for s in chosen], [s.style for s in chosen],
                           [s.refs for s in chosen], [s.ref_prompts for s in chosen])
        for r in score_samples(scorers, batch):
            score_rows.append({**{k: v for k, v in r.items() if k != "index"}, "sample_id": ids[r["index"]]})
    return sample_rows, score_rows


@torch.no_grad()
def draw(model, prompts: list[str], jobs: list[tuple[Conditioning, int]], seeds: list[int]) -> list:
    """Images for one chunk of (method, sample) jobs: CFG with each row's own positive LoRA and negative
    branch (same LoRA, or the gray-image LoRA for asym), or the adapter's tokens on both branches."""
    from i2l.baselines.adapter import generate_with_adapter
    from i2l.infer.guidance import sample

    cfg, bb = model.cfg, model.backbone
    shape = bb.latent_shape(cfg.backbone.image_size)
    # one generator per image: its noise depends on its seed only, not on what it is batched with
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    guidance, steps = cfg.eval.guidance, cfg.eval.sample_steps
    if jobs[0][0].extra is not None:
        extra = torch.stack([c.extra[i] for c, i in jobs])  # (B, M, E)
        return to_pil(bb.decode_latents(generate_with_adapter(bb, extra, prompts, noise, guidance, steps)))
    targets = bb.lora_targets()
    zero = LoRA({k: torch.zeros(1, v[0]) for k, v in targets.items()},
                {k: torch.zeros(v[1], 1) for k, v in targets.items()}, bb.backbone_id)  # the base model
    pos = [c.loras[i] if c.loras[i] is not None else zero for c, i in jobs]
    neg = [model.gray_lora() if c.asym else p for (c, _), p in zip(jobs, pos, strict=True)]
    n = len(prompts)
    x = sample(bb, bb.encode_prompts(prompts), bb.encode_prompts([""] * n), LoRA.stack(pos).to(bb.device),
               LoRA.stack(neg).to(bb.device), guidance, steps, noise=noise.to(bb.device))
    return to_pil(bb.decode_latents(x))


# ----- summary ---------------------------------------------------------------------------------------------

def summarize(conds: list[Conditioning], sample_rows: list[dict], score_rows: list[dict],
              losses: list[dict]) -> list[dict]:
    """Per method: mean of each ok metric, held-out FM loss and wall time per style."""
    method_of = {r["sample_id"]: r["method"] for r in sample_rows}
    acc: dict[tuple[str, str], list[float]] = {}
    for r in score_rows:
        if r["status"] == "ok":
            acc.setdefault((method_of[r["sample_id"]], r["metric"]), []).append(r["value"])
    for r in losses:
        acc.setdefault((r["method"], "fm_loss"), []).append(r["loss"])
    out = []
    for c in conds:
        row = {"method": c.method, "wall_s": c.mean_wall_s}
        for (m, metric), vals in acc.items():
            if m == c.method:
                row[metric] = sum(vals) / len(vals)
        out.append(row)
    return out


def format_summary(summary: list[dict]) -> str:
    cols = ["clip_style", "clip_text", "ref_style_sim", "leakage", "fm_loss"]
    lines = [f"{'method':<16}" + "".join(f"{c:>14}" for c in cols) + f"{'wall s/style':>14}"]
    for r in summary:
        vals = "".join(f"{r[c]:>14.4f}" if c in r else f"{'-':>14}" for c in cols)
        lines.append(f"{r['method']:<16}{vals}{r['wall_s']:>14.3f}")
    return "\n".join(lines)
