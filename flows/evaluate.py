"""Flow `evaluate`: compare the methods on held-out styles with a checkpoint (default: the newest) — generate,
score, held-out loss — into the results store; optionally build the report after (the nightly schedule)."""

from __future__ import annotations

from prefect import flow, task

from flows.pretrain_toy import toy_model_keys
from flows.report import report
from flows.stages import TASK_OPTIONS, StageContext, data_id, digest, jsonable, path_exists
from i2l.train.checkpoint import checkpoint_identity
from i2l.train.run_key import require_checkpoint

# Scorer fields that change how scoring runs, not its numbers.
_SCORER_RUNTIME = ("device", "batch_size")


@task(name="evaluate-methods", **TASK_OPTIONS)
def evaluate_task(cfg, prepared_dir: str, checkpoint: str, store, out_dir: str, parent_id: str | None,
                  progress: bool) -> dict:
    from i2l.eval.stage import (
        evaluate as evaluate_methods,  # torch: only once evaluation runs (flows/__init__)
    )

    # Records its own "eval" run (under the pipeline run) and its results in one transaction.
    info = evaluate_methods(cfg, prepared_dir, checkpoint, store, out_dir=out_dir, parent_id=parent_id,
                            progress=progress)
    # The run a report of this evaluation covers: the pipeline run it was recorded under, else the eval run
    # (also when it was done earlier, outside this flow: then its parent is not known here).
    info["report_run"] = info["run_id"] if info.get("skipped") or not parent_id else parent_id
    return jsonable({k: v for k, v in info.items() if k != "summary"})


def evaluate_key(ctx: StageContext, ck) -> str:
    data = data_id(ctx)
    scorer = {k: v for k, v in ctx.keyed["scorer"].items() if k not in _SCORER_RUNTIME}
    return digest(data, toy_model_keys(ctx, data), checkpoint_identity(ck),
                  ctx.section("backbone", "encoder", "predictor", "train", "eval"), scorer)


@flow(name="evaluate")
def evaluate(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
             checkpoint: str | None = None, build_report: bool = False, reports_dir: str | None = None,
             parent_run_id: str | None = None, progress: bool = True, force: list[str] | None = None
             ) -> list[dict]:
    """checkpoint: None = the newest of runs/<preset>/train. build_report: then report this evaluation."""
    ctx = StageContext.open(preset, overrides, data_root, parent_run_id, progress, force)
    ck = require_checkpoint(checkpoint or ctx.paths.train_dir)
    out = ctx.paths.eval_dir
    result = ctx.run_stage(
        "evaluate", evaluate_key(ctx, ck), path_exists(out),
        lambda _: evaluate_task(ctx.cfg, str(ctx.paths.prepared_dir), str(ck), ctx.store, str(out),
                                ctx.parent_run_id, progress), own_run=False)
    results = [result.to_dict()]
    if build_report:
        results += report(preset, overrides, data_root, run_id=result.info["report_run"], after=[result.key],
                          reports_dir=reports_dir, progress=progress, force=force)
    return results
