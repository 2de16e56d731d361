"""Mass production of style LoRAs: a Ray actor pool (the predictor loaded once per actor; GPU actors with `num_gpus`
on a cluster, CPU actors here) predicts LoRAs in batches for every style of a validation manifest or a folder of user
images. One diffusers-format file per style, the gray-image LoRA once per checkpoint, and a catalog.

Output directory (bound to one checkpoint): production.json, gray.safetensors, styles/<style_id>.safetensors and
catalog.parquet (lora_id, style_id, ref_ids, checkpoint_id, path, sha256, bytes, rank, n_refs, per-layer norms); the
same rows go to the results store's `loras` table. Idempotent: a re-run skips what the catalog holds; a batch whose
actor died is retried on a fresh actor; files and catalog rows are keyed by style, so each exists exactly once.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from i2l.io import file_sha256
from i2l.store import Store
from i2l.train.checkpoint import read_state, require_checkpoint

PRODUCTION_FILE = "production.json"
CATALOG_FILE = "catalog.parquet"
GRAY_FILE = "gray.safetensors"
FLUSH_S = 2.0  # catalog + store are written at most this late (always at the end; a kill's files are adopted)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # style ids become file names


@dataclass
class StyleJob:
    """One LoRA to make: a style id, the ids of its references (row ids or file names) and their encoded bytes."""

    style_id: str
    ref_ids: list[str]
    images: list[bytes] = field(repr=False)


@dataclass
class ProduceSummary:
    out_dir: Path
    checkpoint_id: str
    styles: int  # styles asked for
    produced: int  # LoRAs made by this call (gray included)
    skipped: int  # already in the catalog
    retried_batches: int  # batches re-run after their actor died
    workers: int
    seconds: float  # whole call, actor start-up included
    pool_seconds: float  # from the first batch submitted to the last result

    @property
    def loras_per_s(self) -> float:
        return self.produced / self.pool_seconds if self.pool_seconds else 0.0

    def format(self) -> str:
        return (f"produce -> {self.out_dir} (checkpoint {self.checkpoint_id})\n"
                f"  styles: {self.styles}; LoRAs made: {self.produced}, already there: {self.skipped}; "
                f"batches retried: {self.retried_batches}\n"
                f"  {self.workers} actor(s), {self.seconds:.1f} s ({self.loras_per_s:.2f} LoRAs/s in the pool)")


# ---------- what to produce ----------
def jobs_from_manifest(manifest_path: str | os.PathLike, limit: int | None = None) -> list[StyleJob]:
    """One job per style of a validation manifest (its first sample's references), read from the val shards beside
    it (`i2l prepare` output). Manifest ids are looked up in the shards; no path found in data is ever opened."""
    from i2l.data.shards import iter_rows

    path = Path(manifest_path)
    path = path / "val_manifest.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no validation manifest at {path}: run `i2l prepare` first, or pass --images DIR")
    entries: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            style, refs = str(e["style_id"]), [str(r) for r in e["reference_ids"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a manifest entry with style_id and reference_ids ({err})") from None
        entries.setdefault(style, refs)
        if limit and len(entries) >= limit:
            break
    wanted = {r for refs in entries.values() for r in refs}
    images = {r["id"]: r["image"] for r in iter_rows(path.parent, "val", columns=("id", "image")) if r["id"] in wanted}
    missing = sorted(wanted - set(images))
    if missing:
        raise ValueError(f"{path} names {len(missing)} reference id(s) missing from the val shards in {path.parent}, "
                         f"e.g. {missing[:3]}: re-run `i2l prepare`")
    return [StyleJob(s, refs, [images[r] for r in refs]) for s, refs in entries.items()]


def jobs_from_images(folder: str | os.PathLike) -> list[StyleJob]:
    """User images: each subfolder of `folder` is one style (its images fused into one LoRA); each image file directly
    in `folder` is a style of its own. Every image is decoded here, so a bad file fails the run before any work."""
    from i2l.data.images import load_image_file

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.startswith("."))

    groups = [(p.stem, [p]) for p in images_in(root)]
    groups += [(d.name, images_in(d)) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    empty = [name for name, files in groups if not files]
    if empty:
        raise ValueError(f"style folder(s) without images ({', '.join(IMAGE_SUFFIXES)}): {empty[:5]}")
    if not groups:
        raise ValueError(f"no reference images in {root}: put one image per style there, or one folder per style")
    jobs = []
    for name, files in groups:
        for f in files:
            load_image_file(f)  # raises naming the file: unreadable, truncated, too many pixels
        jobs.append(StyleJob(re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "style",
                             [f.name for f in files], [f.read_bytes() for f in files]))
    return jobs


def check_jobs(jobs: list[StyleJob]) -> None:
    if not jobs:
        raise ValueError("nothing to produce: no styles given")
    seen = set()
    for j in jobs:
        if not _SAFE_ID.match(j.style_id):
            raise ValueError(f"style id {j.style_id!r} cannot be a file name: use letters, digits, '.', '_', '-'")
        if j.style_id in seen:
            raise ValueError(f"style {j.style_id!r} appears twice: every style gets exactly one LoRA")
        if not j.images or len(j.images) != len(j.ref_ids):
            raise ValueError(f"style {j.style_id!r} has no reference images")
        seen.add(j.style_id)


# ---------- the actor ----------
class LoRAProducer:
    """Ray actor: loads the predictor + encoder once (not the backbone: the checkpoint records the adapted layers)
    and turns batches of StyleJobs into LoRA files, returning their catalog rows."""

    def __init__(self, checkpoint_dir: str, out_dir: str, device: str, checkpoint_id: str, checkpoint_sha: str):
        from i2l.infer.api import I2L

        self.model = I2L.load(checkpoint_dir, device=device, backbone=False)
        self.out, self.checkpoint_id, self.sha = Path(out_dir), checkpoint_id, checkpoint_sha
        self._warm_up()

    def _warm_up(self) -> None:
        """One throw-away LoRA through the whole path (decode, 2-reference prediction, save, hash): the lazy imports
        and first kernels cost seconds, which belong to start-up, not to the first batch."""
        import io
        import tempfile

        from i2l.data.images import gray_image

        buf = io.BytesIO()
        gray_image(self.model.cfg.encoder.image_size).save(buf, format="PNG")
        with tempfile.TemporaryDirectory() as tmp:
            self.make([StyleJob("warm-up", ["a", "b"], [buf.getvalue()] * 2)], Path(tmp))

    def info(self) -> dict:
        return {"pid": os.getpid(), "backbone": self.model.predictor.backbone_id}

    def make_gray(self) -> dict:
        return self._save("gray_lora", None, ["gray"], self.model.gray_lora(), self.out / GRAY_FILE)

    def make(self, jobs: list[StyleJob], out: Path | None = None) -> list[dict]:
        from i2l.data.images import decode

        out = out or self.out
        refs = [[decode(b, name=r) for r, b in zip(j.ref_ids, j.images)] for j in jobs]  # a refusal names the ref
        loras = self.model.predict_loras(refs)  # one batched forward
        return [self._save(f"i2l_{len(j.ref_ids)}ref", j.style_id, j.ref_ids, lo,
                           out / "styles" / f"{j.style_id}.safetensors", out) for j, lo in zip(jobs, loras)]

    def _save(self, method: str, style_id: str | None, ref_ids: list[str], lora, path: Path,
              out: Path | None = None) -> dict:
        # the file describes itself: a file written just before a kill is adopted by the next run, not redone
        lora.meta.update({"style_id": style_id or "", "ref_ids": json.dumps(ref_ids), "checkpoint_sha256": self.sha,
                          "checkpoint_id": self.checkpoint_id, "method": method})
        lora.save(path, prefix=self.model.lora_prefix)  # atomic (temporary name, then rename)
        return catalog_row(out or self.out, path, lora)


def lora_id(style_id: str | None, checkpoint_sha: str) -> str:
    """Catalog key: one LoRA per (style, checkpoint); the gray LoRA is the checkpoint's own."""
    return f"{'gray_lora' if style_id is None else 'i2l:' + style_id}@{checkpoint_sha[:12]}"


def catalog_row(out: Path, path: Path, lora) -> dict:
    """The catalog row of a written LoRA file, from the LoRA and the metadata it was saved with."""
    m = lora.meta
    style_id, ref_ids = m["style_id"] or None, json.loads(m["ref_ids"])
    return {"lora_id": lora_id(style_id, m["checkpoint_sha256"]), "style_id": style_id, "method": m["method"],
            "checkpoint_id": m["checkpoint_id"], "checkpoint_sha256": m["checkpoint_sha256"], "ref_ids": ref_ids,
            "n_refs": len(ref_ids), "rank": lora.rank, "path": str(path.relative_to(out)),
            "sha256": file_sha256(path), "bytes": path.stat().st_size, "norms": lora.norms()}


def _adopt(out: Path, path: Path, ref_ids: list[str], sha: str) -> dict | None:
    """A complete file this checkpoint made for these references but the catalog lacks (killed before a flush)."""
    from i2l.model.lora import LoRA

    try:
        lora = LoRA.load(path)
        ok = lora.meta.get("checkpoint_sha256") == sha and json.loads(lora.meta.get("ref_ids", "null")) == ref_ids
        return catalog_row(out, path, lora) if ok else None
    except (ValueError, KeyError, OSError):
        return None  # not ours or unreadable: made again


# ---------- catalog ----------
def read_catalog(out_dir: str | os.PathLike) -> list[dict]:
    """The catalog rows of a production directory (norms as dict, ref_ids as list); [] if none yet."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / CATALOG_FILE
    if not path.is_file():
        return []
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["norms"] = json.loads(r["norms"])
    return rows


def _write_catalog(out: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "norms": json.dumps(r["norms"], sort_keys=True)} for r in rows])
    tmp = out / f".{CATALOG_FILE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / CATALOG_FILE)  # readers see the old or the new catalog, never half of one


def _record(store: Store, out: Path, rows: list[dict]) -> None:
    store.record_loras([{**r, "path": str((out / r["path"]).resolve())} for r in rows])


def _bind(out: Path, ck: Path, sha: str, checkpoint_id: str) -> None:
    """An output directory holds the LoRAs of one checkpoint: refuse to mix in another's."""
    meta = out / PRODUCTION_FILE
    if meta.is_file():
        theirs = json.loads(meta.read_text())
        if theirs.get("checkpoint_sha256") != sha:
            raise FileExistsError(f"{out} holds LoRAs of checkpoint {theirs.get('checkpoint_id')} "
                                  f"({theirs.get('checkpoint_dir')}); choose another --out for {ck}")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PRODUCTION_FILE}.tmp"
    tmp.write_text(json.dumps({"checkpoint_dir": str(ck), "checkpoint_id": checkpoint_id,
                               "checkpoint_sha256": sha, "backbone": read_state(ck)["backbone_id"]}, indent=2))
    os.replace(tmp, meta)


def _checkpoint_id(store: Store, ck: Path, sha: str) -> str:
    """The store's id of this checkpoint when training recorded it, else `<run>/<step dir>@<sha12>`."""
    known = store.rows("SELECT checkpoint_id FROM checkpoints WHERE sha256 = ? ORDER BY created_at LIMIT 1", [sha])
    return known[0][0] if known else f"{ck.parent.parent.name}/{ck.name}@{sha[:12]}"


def remove_leftovers(out: Path) -> None:
    """Delete what a killed run left half-written (never catalogued): the catalog's and production.json's
    `.<name>.tmp` and LoRA.save's `<name>.tmp` (pathlib's `*` matches dot-names too); finished files never end
    in .tmp, so they stay."""
    for tmp in [*out.glob("*.tmp"), *(out / "styles").glob("*.tmp")]:
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


# ---------- the pool ----------
def produce(checkpoint_dir: str | os.PathLike, jobs: list[StyleJob], out_dir: str | os.PathLike, store: Store,
            workers: int = 2, batch_size: int = 8, num_gpus: float = 0.0, max_retries: int = 3,
            progress: bool = True, on_batch: Callable[[list[dict], object], None] | None = None) -> ProduceSummary:
    """Make the LoRAs of `jobs` (and the gray LoRA) that `out_dir`'s catalog lacks, on a pool of Ray actors.

    on_batch(rows, actor) runs in the driver after each batch returns (tests kill that actor here)."""
    t0 = time.perf_counter()
    check_jobs(jobs)
    ck = require_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    sha = file_sha256(ck / "predictor.safetensors")
    checkpoint_id = _checkpoint_id(store, ck, sha)
    _bind(out, ck, sha, checkpoint_id)
    remove_leftovers(out)

    catalog = {r["lora_id"]: r for r in read_catalog(out)}
    in_store = {r[0] for r in store.rows("SELECT lora_id FROM loras WHERE ends_with(lora_id, ?)", [f"@{sha[:12]}"])}

    def done(style_id: str | None, ref_ids: list[str]) -> bool:
        r = catalog.get(lora_id(style_id, sha))
        return (r is not None and list(r["ref_ids"]) == list(ref_ids) and (out / r["path"]).is_file()
                and (out / r["path"]).stat().st_size == r["bytes"])

    adopted = []
    for style_id, ref_ids, path in [(None, ["gray"], out / GRAY_FILE),
                                    *((j.style_id, j.ref_ids, out / "styles" / f"{j.style_id}.safetensors")
                                      for j in jobs)]:
        if not done(style_id, ref_ids) and path.is_file() and (row := _adopt(out, path, ref_ids, sha)):
            catalog[row["lora_id"]] = row
            adopted.append(row)
    if adopted:
        _write_catalog(out, list(catalog.values()))
    todo = [j for j in jobs if not done(j.style_id, j.ref_ids)]
    need_gray = not done(None, ["gray"])
    kept = [r for k, r in catalog.items() if k not in {lora_id(j.style_id, sha) for j in todo}]
    missing = [r for r in kept if r["lora_id"] not in in_store]
    if missing:  # catalogued here (or adopted) but not in this store: another --db, or a kill between writes
        _record(store, out, missing)
    summary = ProduceSummary(out, checkpoint_id, len(jobs), 0, len(jobs) - len(todo), 0, 0, 0.0, 0.0)
    if todo or need_gray:
        rows = list(catalog.values())
        _run_pool(str(ck), out, checkpoint_id, sha, todo, need_gray, store, rows, summary, workers, batch_size,
                  num_gpus, max_retries, progress, on_batch)
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_pool(ck: str, out: Path, checkpoint_id: str, sha: str, todo: list[StyleJob], need_gray: bool, store: Store,
              rows: list[dict], summary: ProduceSummary, workers: int, batch_size: int, num_gpus: float,
              max_retries: int, progress: bool, on_batch) -> None:
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    from i2l.cluster import ensure_ray

    ray = ensure_ray()
    res = ray.cluster_resources()
    if num_gpus > 0:
        if res.get("GPU", 0) < num_gpus:
            raise ValueError(f"produce.num_gpus={num_gpus} but the Ray cluster has {res.get('GPU', 0)} GPU(s): set "
                             "RAY_ADDRESS to a GPU cluster, or produce.num_gpus=0 for CPU actors")
        slots, options = int(res["GPU"] // num_gpus), {"num_gpus": num_gpus, "num_cpus": 1}
    else:
        slots, options = int(res.get("CPU", 1)), {"num_cpus": 1}
    batches = deque({"jobs": todo[i:i + batch_size], "attempts": 0} for i in range(0, len(todo), batch_size))
    if need_gray:
        batches.appendleft({"jobs": None, "attempts": 0})  # None = the gray LoRA
    n = max(1, min(workers, len(batches), slots))  # more actors than slots would wait forever
    cls = ray.remote(LoRAProducer).options(**options)
    device = "cuda" if num_gpus > 0 else "cpu"

    def start() -> object:
        return cls.remote(ck, str(out), device, checkpoint_id, sha)

    actors, generation = [start() for _ in range(n)], [0] * n
    inflight: dict = {}  # object ref -> (actor index, actor generation, batch)

    def submit(i: int) -> None:
        if batches:
            b = batches.popleft()
            ref = actors[i].make_gray.remote() if b["jobs"] is None else actors[i].make.remote(b["jobs"])
            inflight[ref] = (i, generation[i], b)

    by_id = {r["lora_id"]: r for r in rows}
    unrecorded: list[dict] = []
    last_flush = time.perf_counter()

    def flush() -> None:
        _write_catalog(out, list(by_id.values()))  # the catalog decides what a re-run skips
        _record(store, out, unrecorded)

    bar = tqdm(total=len(todo) + need_gray, desc=f"produce ({n} actors)", unit="LoRA", disable=not progress)
    try:
        try:  # start-up (imports, weights) is paid once per actor, not per LoRA: keep it out of the pool's rate
            ray.get([a.info.remote() for a in actors])
        except RayActorError as e:
            raise RuntimeError(f"produce actors failed to start (are checkpoint {ck} and its encoder readable "
                               f"on every node?): {str(e)[-800:]}") from e
        t_pool = time.perf_counter()
        for i in range(n):  # two batches queued per actor: it never waits for the driver
            submit(i)
            submit(i)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, gen, b = inflight.pop(ref)
            try:
                got = ray.get(ref)
            except RayActorError as e:  # the actor died (killed, node lost, OOM): its batches run again elsewhere
                b["attempts"] += 1
                if b["attempts"] > max_retries:
                    raise RuntimeError(f"a produce batch failed {b['attempts']} times because its actor died; "
                                       f"last: {str(e)[-800:]}") from e
                summary.retried_batches += 1
                batches.appendleft(b)
                if gen == generation[i]:  # first failure seen from this actor: replace it once
                    ray.kill(actors[i])
                    actors[i], generation[i] = start(), gen + 1
                submit(i)
                continue
            new = [got] if isinstance(got, dict) else got
            for r in new:
                by_id[r["lora_id"]] = r
            unrecorded += new
            if time.perf_counter() - last_flush > FLUSH_S:  # writes cost the driver ~0.1 s: batch them
                flush()
                unrecorded, last_flush = [], time.perf_counter()
            summary.produced += len(new)
            bar.update(len(new))
            if on_batch:
                on_batch(new, actors[i])
            submit(i)  # after the hook, so a batch given to an actor the hook killed is retried for sure
        summary.pool_seconds = time.perf_counter() - t_pool
    finally:
        bar.close()
        if unrecorded:  # also after a failure: what was made is catalogued
            flush()
        summary.workers = n
        for a in actors:
            ray.kill(a)
