"""Benchmark of `prepare`: rows/s of the Ray pipeline (1 and 2 workers) against a plain single-process PIL
loop doing the same decode -> resize -> encode on the same images, side by side in one run.

Goals: pipeline >= 0.8x the loop per worker (`ray_w<N>/pil_loop`); 2 workers >= 1.7x one worker
(`ray_w2/ray_w1`). One end-to-end run per case, not interleaved rounds: a pipeline run is seconds of work, and
its start-up and finalize are part of what is measured. `python -m i2l.bench.prepare`.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from i2l.bench import format_rows, judged

GOALS = {"per_worker/loop": (">=", 0.8), "2_workers/1_worker": (">=", 1.7)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--styles", type=int, default=250, help="toy-world styles (8 images each)")
    p.add_argument("--size", type=int, default=64, help="source image side")
    p.add_argument("--resolution", type=int, default=256, help="output side (upscaled with Lanczos)")
    p.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts to run")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one, deleted)")


def pil_loop(images: list[bytes], resolution: int, fmt: str, quality: int = 95) -> tuple[float, float]:
    """The baseline: decode -> RGB -> Lanczos resize -> encode, one image after the other.

    Returns (wall, CPU) seconds."""
    from PIL import Image

    save = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": quality, "subsampling": 0},
            "webp": {"format": "WEBP", "quality": quality, "method": 4}}[fmt]
    t0, c0 = time.perf_counter(), time.process_time()
    for data in images:
        im = Image.open(io.BytesIO(data))
        im = im.convert("RGB").resize((resolution, resolution), Image.LANCZOS)
        im.save(io.BytesIO(), **save)
    return time.perf_counter() - t0, time.process_time() - c0


def run(args: argparse.Namespace) -> list[dict]:
    import pyarrow.parquet as pq

    from i2l.cluster import ensure_ray
    from i2l.config import get_config
    from i2l.data.megastyle import image_bytes
    from i2l.data.prepare import prepare
    from i2l.toy.world import write_toyworld

    workers = [int(w) for w in str(args.workers).split(",") if w]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="i2l-bench-prepare-"))
    cfg = get_config("toy", {"data.resolution": args.resolution, "data.image_format": args.format,
                             "data.batch_size": 32, "data.row_group_rows": 64})
    cfg.toyworld.styles, cfg.toyworld.size, cfg.toyworld.rows_per_shard = args.styles, args.size, 512
    try:
        inp = work / f"in-{args.styles}x{args.size}"  # a --work-dir may be reused: one input per shape
        if not inp.is_dir():
            write_toyworld(cfg.toyworld, inp, progress=False)
        images = [b for f in sorted(inp.glob("*.parquet")) for b in image_bytes(pq.read_table(f))]
        n = len(images)
        base_s, base_cpu = pil_loop(images, args.resolution, args.format, cfg.data.quality)
        base = n / base_s
        common = {"rows": n, "size": args.size, "resolution": args.resolution, "format": args.format}
        results = _case_rows("pil_loop", n, base_s, base_cpu, common)
        ensure_ray(num_cpus=max(workers))  # cluster start-up is not the pipeline's cost
        rates = {}
        for w in workers:
            cfg.data.concurrency = w
            cfg.data.rows_per_shard = max(32, n // (8 * w))  # >= 8 units per worker: keeps both busy to the end
            out = work / f"out-{w}"
            shutil.rmtree(out, ignore_errors=True)
            s = prepare(cfg, inp, out, progress=False)
            rates[w] = n / s.seconds  # end to end: plan, actor start-up, units, finalize
            # CPU spent in the workers per row: what the wall clock would show on idle cores
            cpu = sum(json.loads(r.read_text())["cpu_seconds"] for r in (out / ".work" / "units").glob("*.json"))
            case = f"ray_w{w}"
            results += _case_rows(case, n, s.seconds, cpu, common)
            results.append({"case": case, "metric": "cpu_vs_loop", "value": base_cpu / cpu,
                            "unit": "x (loop CPU / pipeline CPU)", **common})
            results.append(_judged(f"{case}/pil_loop", "per_worker_ratio", rates[w] / w / base,
                                   "x (pipeline rows/s per worker / loop rows/s)", "per_worker/loop", common))
        for w in sorted(rates):
            if w != 1 and 1 in rates:
                results.append(_judged(f"ray_w{w}/ray_w1", "ratio", rates[w] / rates[1], "x (rows/s)",
                                       "2_workers/1_worker" if w == 2 else None, common))
        return results
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _case_rows(case: str, n: int, seconds: float, cpu: float, common: dict) -> list[dict]:
    """One variant's figures as long rows: wall time, throughput and CPU per row."""
    return [{"case": case, "metric": "seconds", "value": seconds, "unit": "s", **common},
            {"case": case, "metric": "rows_per_s", "value": n / seconds, "unit": "rows/s", **common},
            {"case": case, "metric": "cpu_ms_per_row", "value": 1000 * cpu / n, "unit": "ms", **common}]


def _judged(case: str, metric: str, value: float, unit: str, goal: str | None, common: dict) -> dict:
    """A ratio row, judged against GOALS[goal] when it is one of the docstring's goals."""
    return {"case": case, "metric": metric, "value": value, "unit": unit, **judged(value, GOALS.get(goal)), **common}


if __name__ == "__main__":
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(format_rows(run(parser.parse_args())))
