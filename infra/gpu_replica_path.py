"""The real presets' model code on a GPU, on replicas of their published checkpoints (`i2l.replicas`: the published
layout, file names, config values and weight names, sizes shrunk). Per preset: a few predictor training steps on
CUDA with `train_predictor`, the function a Ray Train GPU worker runs (bf16 backbone, gradient checkpointing);
then the checkpoint loaded on CUDA to predict a LoRA from reference images, the LoRA round-tripped through its
file, and images sampled with asymmetric CFG in both arrangements of the branches (they must agree). No Ray and no
Prefect: the device machine has neither, and the model code under them is these functions. One JSON line per
preset; exit status 1 if any preset failed.

    python infra/gpu_replica_path.py PREPARED WORK [PRESET ...]

PREPARED: a toy world prepared at `i2l.replicas.DEBUG_SIZES` (`i2l toyworld` + `i2l prepare` with those as --set);
WORK: a scratch folder (replicas and runs are written there). Presets: klein4b and zimage by default.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu tries the script on a machine without a GPU
REPLICAS = {"klein4b": "FLUX.2-klein-base-4B", "zimage": "Z-Image"}
ENCODER = "siglip2-so400m-patch16-512"
CUDA = DEVICE.startswith("cuda")
STEPS = {"train.steps": 4, "train.ckpt_every": 4}  # on top of i2l.replicas.DEBUG_SIZES: a loss curve to look at


def check(preset: str, prepared: Path, work: Path) -> dict:
    import numpy as np
    import torch

    from i2l.config import get_config
    from i2l.eval.heldout_loss import load_val_samples
    from i2l.infer.api import I2L
    from i2l.model.lora import LoRA
    from i2l.replicas import DEBUG_SIZES, write_replica
    from i2l.train.loop import World, train_predictor

    replicas = work / "replicas"
    backbone, encoder = (replicas / REPLICAS[preset], replicas / ENCODER)
    for path, name in ((backbone, REPLICAS[preset]), (encoder, ENCODER)):
        if not path.exists():
            write_replica(name, replicas)
    cfg = get_config(preset, {**DEBUG_SIZES, **STEPS, "backbone.path": str(backbone), "encoder.path": str(encoder)})
    run = work / f"run-{preset}"
    t0 = time.perf_counter()
    train_predictor(cfg, prepared, run, world=World(device=DEVICE), progress=False)
    train_s = time.perf_counter() - t0
    losses = [r["loss"] for r in json.loads(next(run.glob("checkpoints/*/curve.json")).read_text())]
    model = I2L.load(run, device=DEVICE)
    samples = load_val_samples(prepared)
    lora = model.predict_lora(samples[0].refs)
    path = lora.save(work / f"{preset}.safetensors")
    back = LoRA.load(path)
    host = lora.to_host()
    round_trip = max(float((back.A[k] - host.A[k]).abs().max()) for k in host.names)
    prompts = [s.prompt for s in samples[:2]]
    loras = [lora, model.predict_lora(samples[1].refs[:1])]
    images, times = {}, {}
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    for passes in ("joint", "split", "joint", "split"):  # the second round is timed warm
        sync()
        t = time.perf_counter()
        images[passes] = model.generate(prompts, loras, steps=4, seed=[1, 2], passes=passes)
        sync()
        times[passes] = time.perf_counter() - t
    px = {k: torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in v]) for k, v in images.items()}
    return {"preset": preset, "ok": True, "device": torch.cuda.get_device_name(0) if CUDA else DEVICE,
            "train_steps": len(losses), "losses": [round(x, 5) for x in losses], "train_s": round(train_s, 2),
            "lora_layers": len(lora.names), "lora_rank": lora.rank, "lora_file_max_diff": round_trip,
            "joint_vs_split_max_pixel_diff": float((px["joint"] - px["split"]).abs().max()),
            "generate_s": {k: round(v, 3) for k, v in times.items()}}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    prepared, work = Path(argv[0]), Path(argv[1])
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    for preset in argv[2:] or list(REPLICAS):
        try:
            result = check(preset, prepared, work)
        except Exception as e:  # noqa: BLE001  (one preset's failure must not hide the other's result)
            failed = True
            result = {"preset": preset, "ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
