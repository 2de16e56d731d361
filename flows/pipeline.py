"""Flow `pipeline`: prepare_data -> pretrain_toy -> train -> produce -> evaluate -> report, as subflows of one
pipeline run. A re-run skips every finished stage (by the results store) and then leaves the store as it was."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.evaluate import evaluate
from flows.prepare_data import prepare_data
from flows.pretrain_toy import pretrain_toy
from flows.produce import produce
from flows.report import report
from flows.stages import StageContext, digest
from flows.train import train


def pipeline_run_id(ctx: StageContext, input_dir: str | None) -> str:
    """Deterministic per config and input: a re-run (e.g. after a kill) continues the same pipeline run."""
    return f"pipeline-{ctx.cfg.name}-{digest(ctx.keyed, input_dir)[:12]}"


@flow(name="pipeline")
def pipeline(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
             input_dir: str | None = None, reports_dir: str | None = None, progress: bool = True,
             force: list[str] | None = None) -> dict:
    """The whole job on one preset. force: stages to run again even if the store marks them done."""
    ctx = StageContext.open(preset, overrides, data_root, None, progress, force, reports_dir)
    run_id = pipeline_run_id(ctx, input_dir)
    common = {"preset": preset, "overrides": overrides, "data_root": data_root, "progress": progress,
              "force": force}
    stages: list[dict] = []
    try:
        stages += prepare_data(input_dir=input_dir, parent_run_id=run_id, **common)
        stages += pretrain_toy(parent_run_id=run_id, **common)
        stages += train(parent_run_id=run_id, **common)
        stages += produce(parent_run_id=run_id, **common)
        stages += evaluate(parent_run_id=run_id, **common)
    except BaseException:
        _finish(ctx, run_id, "failed", stages)
        raise
    # Finished before the report, which reads the store (and shows this run's status) but writes no results.
    _finish(ctx, run_id, "ok", stages)
    # Report the pipeline run the evaluation was recorded under (this one, or an earlier one whose stages this
    # run reused), rebuilt only when one of the stages it shows has changed: its key changed, or it ran again
    # under the same key (forced, or its outputs were gone), which leaves the keys as they were.
    if any(not s["skipped"] for s in stages):
        force = [*(force or []), "report"]
    stages += report(preset, overrides, data_root, run_id=stages[-1]["info"]["report_run"],
                     after=[s["key"] for s in stages], reports_dir=reports_dir, progress=progress, force=force)
    index = stages[-1]["info"]["index"]
    get_run_logger().info(f"pipeline {run_id}: report at {index}")
    return {"run_id": run_id, "report": index, "stages": stages}


def _finish(ctx: StageContext, run_id: str, status: str, stages: list[dict]) -> None:
    # Only a pipeline run that did work was recorded (by its first stage that ran); leave the rest untouched.
    if any(not s["skipped"] and s["info"].get("parent_run_id") == run_id for s in stages) or status == "failed":
        try:
            ctx.store.finish_run(run_id, status)
        except ValueError:
            pass  # failed before any stage recorded the pipeline run
