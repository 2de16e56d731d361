"""Reports: built from the fixture run, self-contained, rendered by headless Chromium, images read only
from the allowed roots."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from fixtures_store import EVAL_RUN, METHODS, PIPELINE_RUN, make_fixture_store, sample_id
from PIL import Image

from i2l.report.build import amortization_findings, build_report
from i2l.report.figures import resolve_image
from i2l.store import Store


class _Page(HTMLParser):
    """Collects what the tests look at: body attributes, images, table rows and marked cells per table id."""

    def __init__(self):
        super().__init__()
        self.body: dict = {}
        self.images: list[dict] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.marked: dict[str, list[tuple[str, str]]] = {}
        self._table = self._mark = None
        self._row: list[str] | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag in ("b", "u") and self._cell is not None:
            self._mark = tag

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag in ("b", "u"):
            self._mark = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
            if self._mark:
                self.marked.setdefault(self._table, []).append((self._mark, data))


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store, info = make_fixture_store(root)
    index = build_report(store, None, root / "out")
    return store, info, index


def test_report_is_built_from_the_fixture_run(report):
    _store, info, index = report
    out = index.parent
    assert {p.name for p in out.iterdir()} == {"index.html", "report.md", "figures"}
    assert {p.name for p in (out / "figures").iterdir()} == {"grid.png", "amortization.png", "ablations.png",
                                                             "training.png"}
    page = _parse(index.read_text())
    assert page.tables["runs"][0][0] == PIPELINE_RUN  # default run: the latest top-level run with samples
    table1 = page.tables["table1"]
    assert [r[0] for r in table1] == ["base", "mean_lora", "adapter", "per_style@5", "per_style@25",
                                      "per_style@100", "i2l_1ref", "i2l_4ref", "i2l_1ref_asym",
                                      "i2l_4ref_asym"]
    assert all(r[4] == "skipped" for r in table1)  # the aesthetic scorer, recorded as skipped
    marks = page.marked["table1"]
    assert ("b", "21.00") in marks and ("u", "20.00") in marks  # clip_style: best bold, second underlined
    assert ("b", "0.750") in marks and ("u", "0.742") in marks  # overall
    assert ("b", "2.00") in marks and ("b", "4.00") not in marks  # leakage: lower is better
    # Self-contained: every image is an embedded PNG that decodes; nothing is fetched from elsewhere.
    assert len(page.images) == 4
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    html = index.read_text()
    assert "http://" not in html and "https://" not in html and "file:" not in html
    assert {r[0] for r in page.tables["quarantine"]} == {info["dataset_id"]}
    assert [(r[1], r[2]) for r in page.tables["quarantine"]] == [("decode_error", "2"), ("too_small", "1")]
    assert [r[0] for r in page.tables["benchmarks"]].count("predictor_forward") == 2
    assert [r[1] for r in page.tables["ablation-asym"]] == ["17.00", "18.00"]  # clip_style, asym off
    md = (out / "report.md").read_text()
    assert "| i2l_4ref_asym |" in md and "**21.00**" in md and "<u>20.00</u>" in md
    assert "![" in md and "(figures/grid.png)" in md


def test_amortization_findings_match_the_curve(report):
    store, _info, _ = report
    amort = store.query("SELECT * FROM v_amortization WHERE run_id = ?", [EVAL_RUN])
    found = {line.split()[0]: line for line in amortization_findings(amort)}
    # i2l_4ref's loss 0.165 lies 80 % of the way from the 5-step (0.35 s) to the 25-step (1.75 s) point in
    # loss, so per-style optimisation needs 0.35 * 5**0.8 ≈ 1.27 s ≈ 106× i2L's 0.012 s.
    assert "≈1.27 s" in found["i2l_4ref"] and "106×" in found["i2l_4ref"]
    assert set(found) == {"i2l_1ref", "i2l_4ref"}  # asym variants have no held-out loss


def test_amortization_findings_bound_a_match_before_the_first_budget():
    """When the smallest per-style budget already beats i2L, the crossing may come sooner: an upper bound."""
    amort = pd.DataFrame({"method": ["per_style@5", "per_style@25", "i2l_4ref"],
                          "family": ["per_style", "per_style", "i2l"],
                          "wall_s": [0.5, 2.5, 0.01], "eval_loss": [0.20, 0.18, 0.21]})
    (line,) = amortization_findings(amort)
    assert "at most 50×" in line and "≈" not in line


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); CI installs it")
    return exe


def _chromium_run(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "HOME": str(tmp_path)})


def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    _, _, index = report
    proc = _chromium_run(exe, tmp_path, "--virtual-time-budget=10000", "--dump-dom", index.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = _parse(proc.stdout)
    assert len(page.tables["table1"]) == len(METHODS)
    assert len(page.images) == 4
    assert page.body.get("data-images-loaded") == "4", "the browser did not decode every embedded image"
    shot = tmp_path / "shot.png"
    proc = _chromium_run(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", index.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # a rendered page, not a blank one


def test_images_are_read_only_inside_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "samples").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(root / "samples" / "ok.png")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (root / "samples" / "link.png").symlink_to(outside / "secret.png")
    roots = [root]
    assert resolve_image("samples/ok.png", roots) == (root / "samples" / "ok.png").resolve()
    assert resolve_image(str(root / "samples" / "ok.png"), roots) == (root / "samples" / "ok.png").resolve()
    assert resolve_image(str(outside / "secret.png"), roots) is None
    assert resolve_image("../outside/secret.png", roots) is None
    assert resolve_image("samples/link.png", roots) is None  # a symlink out of the root
    assert resolve_image("samples/absent.png", roots) is None and resolve_image(None, roots) is None


def test_report_shows_outside_images_as_missing(tmp_path):
    store, _ = make_fixture_store(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(elsewhere)
    with store.transaction() as con:
        con.execute("UPDATE samples SET image_path = ? WHERE sample_id = ?",
                    [str(elsewhere), sample_id("base", "s000001")]).fetchall()
    index = build_report(store, EVAL_RUN, tmp_path / "out")
    html = index.read_text()
    assert "1 image(s) were missing or outside the data directories" in html
    page = _parse(html)
    assert [r[0] for r in page.tables["runs"]] == [EVAL_RUN]
    assert "latest in the store" in html  # a child run without its own dataset falls back to the latest


def test_report_command_and_a_run_without_samples(tmp_path, capsys):
    from i2l.cli import main

    store = Store(tmp_path / "results.duckdb")
    run = store.start_run("train", "debug", {})
    store.record_curve(run, [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)])
    store.finish_run(run)
    assert main(["report", "--db", str(store.path), "--out", str(tmp_path / "rep")]) == 0
    assert "index.html" in capsys.readouterr().out
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "No evaluation samples were recorded" in html and 'id="table1"' not in html
    assert len(_parse(html).images) == 1  # the training curve
    assert main(["report", "--db", str(store.path), "--run", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_report_command_writes_under_the_reports_dir_of_the_environment(tmp_path, capsys, monkeypatch):
    """Without --out, `i2l report` writes where `i2l run` and the flows do: $I2L_REPORTS_DIR/<run> (the image and
    docs/cluster.md set it), not reports/ in whatever directory the command runs from."""
    from i2l.cli import main

    store = Store(tmp_path / "results.duckdb")
    run = store.start_run("train", "debug", {})
    store.record_curve(run, [{"step": s, "loss": 1.0 / s} for s in range(1, 4)])
    store.finish_run(run)
    monkeypatch.setenv("I2L_REPORTS_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--db", str(store.path), "--run", run]) == 0
    assert str(tmp_path / "elsewhere") in capsys.readouterr().out
    assert list((tmp_path / "elsewhere").glob("*/index.html")) and not (tmp_path / "reports").exists()


def test_training_curve_counts_the_steps_each_run_logged(tmp_path):
    """Curves record steps from 1 (training, mean-LoRA and adapter all log step + 1): 6 logged steps read 6."""
    store = Store(tmp_path / "results.duckdb")
    top = store.start_run("pipeline", "debug", {})
    for name, steps in (("train", 6), ("train_adapter", 3)):
        run = store.start_run(name, "debug", {}, run_id=f"{name}-run", parent_id=top)
        store.record_curve(run, [{"step": s + 1, "loss": 1.0 / (s + 1)} for s in range(steps)])
        store.finish_run(run)
    store.finish_run(top)
    md = build_report(store, top, tmp_path / "rep").with_name("report.md").read_text()
    assert "- train-run: 6 steps logged, final loss 0.1667" in md
    assert "- train_adapter-run: 3 steps logged, final loss 0.3333" in md


def test_the_runs_table_says_why_a_killed_run_failed(tmp_path):
    """A run whose process was killed outright is marked failed by the next writer (i2l.store.owner); the report's
    runs table carries the note, so a reader sees it was killed, not that its code failed."""
    from i2l.store.owner import owner_token

    store = Store(tmp_path / "results.duckdb")
    top = store.start_run("pipeline", "debug", {})
    run = store.start_run("train", "debug", {}, run_id="train-run", parent_id=top)
    boot, ns, pid, ticks = owner_token().split(":")[1:]
    with store.transaction() as con:  # owned by this pid at another start time: a process that has ended
        con.execute("UPDATE runs SET owner = ? WHERE run_id = ?", [f"linux:{boot}:{ns}:{pid}:{int(ticks) + 1}", run])
    Store(store.path)  # the next command that writes
    store.finish_run(top, "failed")
    runs = {r[0]: r[3] for r in _parse(build_report(Store(store.path, read_only=True), top, tmp_path / "rep")
                                       .read_text()).tables["runs"]}
    assert runs[top] == "failed"
    assert runs[run].startswith(f"failed: its process (pid {pid} on ") and "killed outright?" in runs[run]


def test_wrong_style_sanity_row_is_not_listed_as_an_i2l_method(tmp_path):
    """i2l_wrong_style is a sanity check: family 'sanity' in the amortization table, also from a store that
    recorded it as 'i2l' (before the 'sanity_family' migration) and is opened read-only, as `i2l report` does."""
    store, _ = make_fixture_store(tmp_path / "run")
    store.record_eval_loss(EVAL_RUN, [{"method": m, "style_id": "s000001", "n_refs": n, "steps": 0, "wall_s": 0.0,
                                       "loss": loss} for m, n, loss in (("i2l_wrong_style", 4, 0.21),
                                                                         ("gray_lora", 0, 0.205))])
    for label, stored in (("migrated", "sanity"), ("recorded as i2l", "i2l")):
        with store.transaction() as con:
            con.execute("UPDATE methods SET family = ? WHERE method = 'i2l_wrong_style'", [stored]).fetchall()
        index = build_report(Store(store.path, read_only=True), EVAL_RUN, tmp_path / label)
        families = {r[0]: r[1] for r in _parse(index.read_text()).tables["amortization"]}
        assert families["i2l_wrong_style"] == "sanity" and families["gray_lora"] == "gray_lora", label
        assert {m for m, f in families.items() if f == "i2l"} == {"i2l_1ref", "i2l_4ref", "i2l_1ref_asym",
                                                                  "i2l_4ref_asym"}, label


def test_report_shows_the_held_out_gain_by_noise_level(tmp_path):
    """The breakdown's table per method (sanity checks left out) and the i2L-vs-per-style finding; a run
    recorded before the breakdown says it has none instead."""
    store, _ = make_fixture_store(tmp_path / "run")
    before = build_report(store, EVAL_RUN, tmp_path / "before").read_text()
    assert "noise-levels" not in _parse(before).tables and "no held-out loss per timestep" in before
    # base 1.0 at each of 8 timesteps; a method's per-t loss m gives band b 100 * sum(1 - m) / 8 over its two
    curves = {"base": [1.0] * 8, "per_style@25": [0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8],
              "i2l_4ref": [0.7, 0.7, 1.0, 1.0, 1.0, 1.0, 0.94, 0.94], "i2l_wrong_style": [1.5] * 8}
    with store.transaction() as con:
        con.execute("DELETE FROM eval_losses WHERE run_id = ?", [EVAL_RUN]).fetchall()
    store.record_eval_loss(EVAL_RUN, [{"method": m, "style_id": s, "n_refs": 4, "steps": 0, "wall_s": 0.0,
                                       "loss": sum(c) / 8, "loss_by_t": c}
                                      for m, c in curves.items() for s in ("s000001", "s000002")])
    html = build_report(store, EVAL_RUN, tmp_path / "after").read_text()
    table = {r[0]: r[1:] for r in _parse(html).tables["noise-levels"]}
    assert list(table) == ["per_style@25", "i2l_4ref"]  # METHOD_ORDER; no base row, no sanity check
    assert table["per_style@25"] == ["10.0", "2.5", "2.5", "5.0", "20.0"]
    assert table["i2l_4ref"] == ["7.5", "0.0", "0.0", "1.5", "9.0"]
    assert ("i2l_4ref against per_style@25: 7.5 against 10.0 points in t &lt; 0.25 (layout, colours); 1.5 against "
            "5.0 points in t ≥ 0.75 (fine detail)") in html
