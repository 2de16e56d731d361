"""Launches predictor training on Ray Train: `TorchTrainer` + `ScalingConfig(num_workers, use_gpu)` with DDP,
or for one worker Ray Train's plain `DataParallelTrainer` (there is no process group to set up). One CPU worker
by default here, N GPU workers on a cluster, the same per-worker loop. The only module that imports `ray.train`."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

from i2l.cluster.signals import signal_of
from i2l.config import Config, config_from_dict


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: rank/world/device from Ray, DDP applied from outside the model code."""
    import ray.train
    import ray.train.torch
    import torch

    from i2l.train.loop import World, train_predictor
    from i2l.train.progress_file import ProgressWriter

    ctx = ray.train.get_context()
    cfg = config_from_dict(config["cfg"])
    # Ray Train restarts the worker group after a worker dies (FailureConfig). A restarted attempt finds this
    # launch's marker and resumes from the latest checkpoint instead of starting over (Ray's own checkpoint
    # reports are polled off the workers and may not reach the controller before a death). Every rank reads
    # before rank 0 writes.
    marker = Path(config["out_dir"]) / f".launch-{config['launch_id']}"
    resume = config["resume"] or marker.exists()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    rank0 = ctx.get_world_rank() == 0
    if rank0:
        marker.touch()
    # the driver's bar (ProgressMirror) follows rank 0's progress file
    progress_file = ProgressWriter(config["out_dir"], cfg.train.steps) if rank0 else None
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    device = ray.train.torch.get_device()
    world = World(rank=ctx.get_world_rank(), size=ctx.get_world_size(), device=str(device))
    wrap = ray.train.torch.prepare_model if world.size > 1 else None

    # Ray Train holds one report per worker until its controller takes it, once per look at the workers
    # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and every rank must make the same reports (each is a
    # barrier): reporting every 10 steps held fast steps to 10 per look. So rank 0's progress file feeds the
    # driver's bar, and Ray gets the metrics at each checkpoint and the last step.
    def report(rec: dict) -> None:
        if progress_file:
            progress_file.step(rec["step"], rec["loss"])
        if rec["step"] % cfg.train.ckpt_every == 0 or rec["step"] == cfg.train.steps:
            ray.train.report(dict(rec))

    crash_at = config.get("crash_at") if not resume else None  # tests: a real worker death, first attempt only

    def report_or_crash(rec: dict) -> None:
        report(rec)
        if crash_at is not None and rec["step"] == crash_at:
            os._exit(1)

    info = train_predictor(cfg, config["data_dir"], config["out_dir"], resume=resume, world=world,
                           wrap_model=wrap, report=report_or_crash, progress=config.get("progress", True),
                           stop_after=config.get("stop_after"))
    ray.train.report({"done": 1, **{k: v for k, v in info.items() if isinstance(v, (int, float))}})


def trainer_class(workers: int) -> type:
    """TorchTrainer for DDP; for one worker the plain DataParallelTrainer. TorchTrainer's backend makes the
    Train controller actor import torch (measured: 0.45 GB against 0.12 GB without), and that actor lives through
    the whole training, next to the worker; a single worker has no process group for it to set up."""
    if workers > 1:
        from ray.train.torch import TorchTrainer
        return TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    return DataParallelTrainer


def launch_training(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
                    progress: bool = True, stop_after: int | None = None, crash_at: int | None = None) -> dict:
    """Train the predictor with `cfg.train.num_workers` Ray Train workers (DDP when > 1). A worker that dies
    restarts the group up to train.max_failures times, resuming from the latest checkpoint.
    crash_at: kill a worker process at this step on the first attempt (tests of recovery)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from i2l.cluster import ensure_ray
    from i2l.layout import require_paths
    from i2l.train.checkpoint import refuse_mixing_runs, run_summary
    from i2l.train.progress_file import ProgressMirror

    refuse_mixing_runs(out_dir, resume, cfg)  # before Ray: a worker error would be retried, not reported
    require_paths(cfg, "backbone.path", "encoder.path")  # here: a worker's error would be retried
    ensure_ray()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = cfg.train.num_workers
    config = {"cfg": cfg.to_dict(), "data_dir": str(Path(data_dir).resolve()), "out_dir": str(out),
              "resume": resume, "progress": progress, "stop_after": stop_after,
              "threads_per_worker": max(1, cpus // workers), "crash_at": crash_at,
              "launch_id": uuid.uuid4().hex[:12]}
    trainer = trainer_class(workers)(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": 1} if not cfg.train.use_gpu else None),
        run_config=RunConfig(name=f"i2l-{cfg.name}", storage_path=str(out / "ray_results"),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    t0 = time.time()
    # Ray Train installs a SIGINT handler that holds the controller actor's handle: left in place, it keeps that
    # actor (~0.4 GB, it imports torch) and the actors it owns alive through every later stage
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        # the worker's own bar stays in its Ray log: this process draws one from the progress file it writes
        with ProgressMirror(out, cfg.train.steps, show=progress) as mirror:
            try:
                result = trainer.fit()
            except SystemExit as e:
                # Ray Train's Ctrl-C handler aborts the run, then ends fit() by sys.exit, which made a Ctrl-C look
                # like a program that exited 1. Said as what it was: the CLI reports "interrupted" (130). A SIGTERM
                # comes out the same way; `terminable` (i2l.cluster.signals) turns it back into the SIGTERM.
                if signal_of(e) is None:
                    raise KeyboardInterrupt("training interrupted") from e
                raise
    finally:
        (out / f".launch-{config['launch_id']}").unlink(missing_ok=True)
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    if result.error:
        raise result.error
    # where the stage's time went: Ray Train's launch (controller, placement group, worker start) and the worker's
    # loading of models and data before the first step, then training, then teardown after the last step
    return {**dict(result.metrics or {}), **run_summary(out), "seconds": time.time() - t0,
            **{f"launch_{k}": v for k, v in mirror.timings().items()}}
