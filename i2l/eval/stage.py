"""The evaluation stage (the toy world's Table 1): each method's conditioning for cfg.eval.styles held-out
samples (i2l/eval/methods.py), one image per sample and method from the same prompt and noise, scores and
held-out FM loss, recorded in the results store in one transaction (i2l/eval/table1.py sums them up).
Re-running the same evaluation (i2l/eval/identity.py names it) does no work."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from i2l.config import Config, EvalConfig
from i2l.data.images import to_pil
from i2l.eval.baseline_runs import Baselines
from i2l.eval.heldout_loss import ValSample, load_val_samples
from i2l.eval.identity import dataset_fingerprint, eval_config, eval_key
from i2l.eval.methods import FAMILIES, Conditioning, heldout_losses, make_conditionings
from i2l.eval.table1 import format_table1, table1_rows
from i2l.model.lora import LoRA
from i2l.store import Store
from i2l.store.rows import lora_row
from i2l.train.checkpoint import require_checkpoint


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
        base_dir = Path(baselines_dir) if baselines_dir else out_dir / "baselines"
        baselines = Baselines(model, ecfg, prepared_dir, base_dir, store, run_id, dataset_id, progress)
        baselines.prepare(families)  # side by side on Ray workers where eval.baseline_workers allows
        conds = make_conditionings(model, samples, families, ecfg.eval, baselines.get, progress)
        losses = heldout_losses(model, samples, conds, ecfg.eval, progress)
        run_out = out_dir / run_id
        refs = save_references(samples, run_out / "refs", store.path.parent)
        loras = save_loras(conds, samples, run_out / "loras", model, run_id) if ecfg.eval.save_loras \
            else lora_rows(conds, samples, run_id, model)
        sample_rows, score_rows = generate_and_score(model, ecfg, samples, conds, refs, loras, run_out / "samples",
                                                     store, run_id, progress)
        summary = table1_rows(conds, sample_rows, score_rows, losses)
        from i2l.eval.out_of_family import record_out_of_family  # styles from outside the training family

        record_out_of_family(model, ecfg, run_id, run_out / "out_of_family", store, progress)
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
        print(format_table1(summary))
        from i2l.store.noise_levels import format_gains_by_noise_level, gains_by_noise_level

        print(format_gains_by_noise_level(gains_by_noise_level(losses)))
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
            rows[(c.method, i)] = lora_row(
                f"{run_id}/{c.method}/{s.sample_id}", s.style_id, c.method, lo, path=(paths or {}).get((c.method, i)),
                checkpoint_id=model.checkpoint_id if c.method.startswith("i2l") else None, n_refs=c.n_refs)
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


def generate_and_score(model, cfg: Config, samples: list[ValSample], conds: list[Conditioning],
                       refs: list[list[str]], loras: dict, samples_dir: Path, store: Store, run_id: str,
                       progress: bool) -> tuple[list[dict], list[dict]]:
    """One image per (method, sample) with the sample's prompt and seed (cfg.eval), many styles per batched
    sampling call; each chunk is saved and scored (cfg.scorer) as soon as it is drawn — or, with scorer.workers
    >= 1, scored once all are drawn by Ray actors, one model per actor (i2l/eval/metrics/actors.py), from the
    saved files. Either way the same rows. -> (sample rows, score rows)."""
    from tqdm import tqdm

    from i2l.eval.metrics import ScoreBatch, build_scorers, score_samples
    from i2l.eval.metrics.actors import ScoreJob, score_on_actors

    jobs = [(c, i) for c in conds for i in range(len(samples))]
    # LoRA methods share batches; adapter rows carry longer contexts, so they are batched among themselves
    groups = [[j for j in jobs if j[0].extra is None], [j for j in jobs if j[0].extra is not None]]
    chunks = [g[k:k + cfg.eval.gen_batch] for g in groups for k in range(0, len(g), cfg.eval.gen_batch)]
    scorers = build_scorers(cfg)
    on_actors = cfg.scorer.workers > 0
    sample_rows, score_rows, jobs = [], [], []  # jobs: (sample ids, ScoreJob) for the actors
    root = store.path.parent
    for chunk in tqdm(chunks, desc="generate" if on_actors else "generate + score", disable=not progress):
        seeds = [cfg.eval.seed + i for _, i in chunk]
        images = draw(model, cfg.eval, [samples[i].prompt for _, i in chunk], chunk, seeds)
        ids, paths = [], []
        for (c, i), im, seed in zip(chunk, images, seeds, strict=True):
            s = samples[i]
            path = samples_dir / c.method / f"{s.sample_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path)
            paths.append(str(path.resolve()))
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
        if on_actors:
            jobs.append((ids, ScoreJob(paths, [s.prompt for s in chosen], [s.style for s in chosen],
                                       [[str(root / p) for p in refs[i]] for _, i in chunk],
                                       [s.ref_prompts for s in chosen])))
            continue
        batch = ScoreBatch(images, [s.prompt for s in chosen], [s.style for s in chosen],
                           [s.refs for s in chosen], [s.ref_prompts for s in chosen])
        score_rows += _with_ids(score_samples(scorers, batch), ids)
    if on_actors:
        chunk_rows = score_on_actors(cfg, scorers, [job for _, job in jobs], progress)
        for (ids, _), rows in zip(jobs, chunk_rows, strict=True):
            score_rows += _with_ids(rows, ids)
    return sample_rows, score_rows


def _with_ids(rows: list[dict], ids: list[str]) -> list[dict]:
    """Score rows keyed by sample id instead of their position in the chunk."""
    return [{**{k: v for k, v in r.items() if k != "index"}, "sample_id": ids[r["index"]]} for r in rows]


@torch.no_grad()
def draw(model, ev: EvalConfig, prompts: list[str], jobs: list[tuple[Conditioning, int]], seeds: list[int]) -> list:
    """Images for one chunk of (method, sample) jobs (ev.guidance, ev.sample_steps): CFG with each row's own
    positive LoRA and negative branch (same LoRA, or the gray-image LoRA for asym), or the adapter's tokens on
    both branches."""
    from i2l.baselines.adapter import generate_with_adapter
    from i2l.infer.guidance import sample, stack_rows

    bb = model.backbone
    shape = bb.latent_shape(model.cfg.backbone.image_size)
    # one generator per image: its noise depends on its seed only, not on what it is batched with
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    guidance, steps = ev.guidance, ev.sample_steps
    if jobs[0][0].extra is not None:
        extra = torch.stack([c.extra[i] for c, i in jobs])  # (B, M, E)
        return to_pil(bb.decode_latents(generate_with_adapter(bb, extra, prompts, noise, guidance, steps)))
    targets = bb.lora_targets()
    zero = LoRA({k: torch.zeros(1, v[0]) for k, v in targets.items()},
                {k: torch.zeros(v[1], 1) for k, v in targets.items()}, bb.backbone_id)  # the base model
    pos = [c.loras[i] if c.loras[i] is not None else zero for c, i in jobs]
    neg = [model.gray_lora(c.n_refs) if c.asym else p for (c, _), p in zip(jobs, pos, strict=True)]
    n = len(prompts)
    x = sample(bb, bb.encode_prompts(prompts), bb.encode_prompts([""] * n), LoRA.stack(pos).to(bb.device),
               stack_rows(neg).to(bb.device), guidance, steps, noise=noise.to(bb.device))
    return to_pil(bb.decode_latents(x))
