"""Benchmark of `prepare`: rows/s of the Ray pipeline (1 and 2 workers) against a plain single-process PIL
loop doing the same decode -> resize -> encode on the same images, side by side in one run.

Goals: pipeline >= 0.8x the loop per worker; 2 workers >= 1.7x one worker. `python -m i2l.bench.prepare`.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path


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

    from i2l.config import get_config
    from i2l.data.megastyle import image_bytes
    from i2l.data.prepare import prepare
    from i2l.data.ray_cluster import ensure_ray
    from i2l.toyworld import write_toyworld

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
        common = {"bench": "prepare", "rows": n, "size": args.size, "resolution": args.resolution,
                  "format": args.format}
        results = [{**common, "variant": "pil_loop", "workers": 1, "seconds": round(base_s, 3),
                    "rows_per_s": round(base, 1), "per_worker_vs_loop": 1.0, "vs_1_worker": None,
                    "cpu_ms_per_row": round(1000 * base_cpu / n, 2), "cpu_vs_loop": 1.0}]
        ensure_ray(num_cpus=max(workers))  # cluster start-up is not the pipeline's cost
        one = None
        for w in workers:
            cfg.data.concurrency = w
            cfg.data.rows_per_shard = max(32, n // (8 * w))  # >= 8 units per worker: keeps both busy to the end
            out = work / f"out-{w}"
            shutil.rmtree(out, ignore_errors=True)
            s = prepare(cfg, inp, out, progress=False)
            rate = n / s.seconds  # end to end: plan, actor start-up, units, finalize
            # CPU spent in the workers per row: what the wall clock would show on idle cores
            cpu = sum(json.loads(r.read_text())["cpu_seconds"] for r in (out / ".work" / "units").glob("*.json"))
            one = rate if w == 1 else one
            results.append({**common, "variant": "ray_pipeline", "workers": w, "seconds": round(s.seconds, 3),
                            "rows_per_s": round(rate, 1), "per_worker_vs_loop": round(rate / w / base, 3),
                            "vs_1_worker": round(rate / one, 3) if one else None,
                            "cpu_ms_per_row": round(1000 * cpu / n, 2), "cpu_vs_loop": round(base_cpu / cpu, 3)})
        return results
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def format_table(rows: list[dict]) -> str:
    cols = ["variant", "workers", "rows", "seconds", "rows_per_s", "per_worker_vs_loop", "vs_1_worker",
            "cpu_ms_per_row", "cpu_vs_loop"]
    lines = ["  ".join(f"{c:>14}" for c in cols)]
    lines += ["  ".join(f"{'' if r[c] is None else r[c]!s:>14}" for c in cols) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(format_table(run(parser.parse_args())))
