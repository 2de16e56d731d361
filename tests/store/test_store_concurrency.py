"""Readers query the store while a writer (another thread or another process) is inside a transaction."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from i2l.store import Store, StoreBusyError

REPO = Path(__file__).resolve().parents[2]


def _rows(run_id: str, n: int, start: int = 0) -> list[dict]:
    return [{"sample_id": f"{run_id}/{i}", "run_id": run_id, "method": "base"}
            for i in range(start, start + n)]


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"helper process exited early: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_thread_reads_committed_snapshot_during_write(tmp_path):
    db = tmp_path / "r.duckdb"
    store = Store(db)
    store.record_samples(_rows("a", 3))
    in_tx, release = threading.Event(), threading.Event()

    def writer():
        with store.transaction():
            store.record_samples(_rows("b", 5))
            in_tx.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert in_tx.wait(30)
        reader = Store(db, read_only=True)
        t0 = time.monotonic()
        assert reader.rows("SELECT count(*) FROM samples")[0][0] == 3  # uncommitted rows are invisible
        assert time.monotonic() - t0 < 5  # and the reader did not wait for the writer
    finally:
        release.set()
        t.join()
    assert reader.rows("SELECT count(*) FROM samples")[0][0] == 8


def test_reader_process_waits_out_a_write_transaction(tmp_path):
    db = tmp_path / "r.duckdb"
    Store(db).record_samples(_rows("a", 2))
    flag = tmp_path / "in_tx"
    writer = _spawn(f"""
        import time
        from pathlib import Path
        from i2l.store import Store
        store = Store({str(db)!r})
        with store.transaction():
            store.record_samples([dict(sample_id=f"b/{{i}}", run_id="b", method="base") for i in range(50)])
            Path({str(flag)!r}).touch()
            time.sleep(1.5)  # a slow stage holding its transaction open
    """)
    try:
        _wait_for(flag, writer)
        t0 = time.monotonic()
        n = Store(db, read_only=True).rows("SELECT count(*) FROM samples")[0][0]
        waited = time.monotonic() - t0
    finally:
        _out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert n == 52  # the read sees the whole transaction, never a part of it
    assert waited > 0.3  # it really ran while the writer held the file


def test_reads_interleave_with_a_writing_process(tmp_path):
    db = tmp_path / "r.duckdb"
    Store(db)
    batches, size = 8, 10
    started, done = tmp_path / "started", tmp_path / "done"
    writer = _spawn(f"""
        import time
        from pathlib import Path
        from i2l.store import Store
        store = Store({str(db)!r})
        Path({str(started)!r}).touch()
        for b in range({batches}):
            with store.transaction():
                store.start_run("eval", None, None, run_id=f"run{{b}}")
                store.record_samples([dict(sample_id=f"{{b}}/{{i}}", run_id=f"run{{b}}", method="base")
                                      for i in range({size})])
                time.sleep(0.08)
            time.sleep(0.05)  # the file is free between transactions
        Path({str(done)!r}).touch()
    """)
    counts = []
    try:
        _wait_for(started, writer)
        reader = Store(db, read_only=True)
        while not done.exists() and writer.poll() is None:
            sql = "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM samples)"
            n_runs, n_samples = reader.rows(sql)[0]
            counts.append((n_runs, n_samples))
    finally:
        _out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert len(counts) >= 3, counts
    assert all(s == r * size for r, s in counts), counts  # never a run without all its samples
    assert [c[0] for c in counts] == sorted(c[0] for c in counts)
    assert any(0 < r < batches for r, _ in counts), counts  # reads happened between writes
    assert Store(db, read_only=True).rows("SELECT count(*) FROM samples")[0][0] == batches * size


def test_writer_reports_a_reader_that_holds_the_file(tmp_path):
    db = tmp_path / "r.duckdb"
    Store(db)
    flag = tmp_path / "open"
    holder = _spawn(f"""
        import time, duckdb
        from pathlib import Path
        con = duckdb.connect({str(db)!r}, read_only=True)  # like an interactive `duckdb -readonly` session
        Path({str(flag)!r}).touch()
        time.sleep(2.5)
        con.close()
    """)
    try:
        _wait_for(flag, holder)
        with pytest.raises(StoreBusyError, match="locked by another process"):
            Store(db, lock_timeout_s=0.3).start_run("eval", None, None)
        Store(db, lock_timeout_s=60).start_run("eval", None, None, run_id="after")  # waits, then writes
    finally:
        holder.communicate(timeout=60)
    assert Store(db, read_only=True).rows("SELECT run_id FROM runs") == [("after",)]
