"""Flow `report`: build a run's report (reports/<run>/index.html + report.md) from the results store, and
publish Table 1 (markdown) and the report's path as Prefect artifacts."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.stages import TASK_OPTIONS, StageContext, digest, path_exists
from i2l.report.build import build_report, resolve_run


@task(name="build-report", **TASK_OPTIONS)
def report_task(store, run_id: str, out_dir: str, image_roots: list[str]) -> dict:
    index = build_report(store, run_id, out_dir, image_roots=[Path(r) for r in image_roots])
    return {"index": str(index), "markdown": str(index.with_name("report.md"))}


def markdown_section(markdown: str, title_prefix: str) -> str | None:
    """The `## <title_prefix>...` section of a markdown document, heading included; None if absent."""
    m = re.search(rf"^## {re.escape(title_prefix)}.*?(?=^## |\Z)", markdown, flags=re.MULTILINE | re.DOTALL)
    return m.group(0).strip() if m else None


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


def publish_artifacts(index: Path, run_id: str, preset: str) -> None:
    md_path = index.with_name("report.md")
    table1 = markdown_section(md_path.read_text(), "Table 1") if md_path.is_file() else None
    create_markdown_artifact(
        table1 or f"No Table 1 in the report of {run_id}: the run recorded no evaluation samples.",
        key=artifact_key(f"table-1-{preset}"), description=f"Table 1 of run {run_id}")
    create_link_artifact(index.resolve().as_uri(), link_text=str(index), key=artifact_key(f"report-{preset}"),
                         description=f"Report of run {run_id} ({md_path})")


@flow(name="report")
def report(preset: str = "toy", overrides: list[str] | None = None, data_root: str | None = None,
           run_id: str | None = None, after: list[str] | None = None, reports_dir: str | None = None,
           progress: bool = True, force: list[str] | None = None) -> list[dict]:
    """run_id: the run to report (a pipeline run covers its stages); None = the latest run with samples.
    after: keys of the stages whose results the report shows; a report built after the same ones is kept."""
    ctx = StageContext.open(preset, overrides, data_root, None, progress, force, reports_dir)
    paths, store = ctx.paths, ctx.store
    run_id = resolve_run(store, run_id)
    out = paths.report_dir(run_id)
    key = digest(run_id, str(out.resolve()), after or [])
    roots = list(dict.fromkeys(str(p) for p in (paths.store_path.parent.resolve(), paths.root.resolve())))
    # A report only reads the store, so it has no run of its own: the runs table stays as the stages left it.
    result = ctx.run_stage("report", key, path_exists(out / "index.html", out / "report.md"),
                           lambda _: report_task(store, run_id, str(out), roots), own_run=False)
    index = Path(result.info["index"])
    publish_artifacts(index, run_id, ctx.cfg.name)
    get_run_logger().info(f"report: {index}")
    return [result.to_dict()]
