"""Several producers on one output folder: two real `i2l produce` processes at once, with different and overlapping
styles, leave a catalog with every LoRA file exactly once (rows = files, hashes match, store alike); a producer's
clean-up removes the leftovers of dead writers only, never another live run's in-flight file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from i2l.data.shards import iter_rows
from i2l.io import file_sha256
from i2l.produce.catalog import GRAY_FILE, read_catalog, remove_leftovers
from i2l.store import Store

REPO = Path(__file__).resolve().parents[2]


def _env(ray_session) -> dict:
    return dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow  # two producers, one actor each, on the session's cluster
def test_two_concurrent_producers_leave_every_lora_once(debug_run, tmp_path, ray_session):
    rows = list(iter_rows(debug_run.prepared_dir, "train", ("id", "image")))
    styles = {"a": range(6), "b": range(3, 9)}  # style3-5 in both: the same references, the same LoRA
    for who, ks in styles.items():
        for k in ks:
            d = tmp_path / who / f"style{k}"
            d.mkdir(parents=True)
            for row in rows[8 * k: 8 * k + 2]:
                (d / f"{row['id']}.png").write_bytes(row["image"])
    out, db = tmp_path / "loras", tmp_path / "results.duckdb"
    procs = [subprocess.Popen([sys.executable, "-m", "i2l.cli", "produce", "--preset", "debug", "--checkpoint",
                               str(debug_run.run_dir), "--images", str(tmp_path / who), "--out", str(out),
                               "--db", str(db), "--workers", "1", "--batch-size", "1", "--no-progress"],
                              cwd=REPO, env=_env(ray_session), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for who in styles]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)

    catalog = read_catalog(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert files == sorted([GRAY_FILE, *(f"styles/style{k}.safetensors" for k in range(9))])
    assert sorted(r["path"] for r in catalog) == files, "every file exactly once in the catalog"
    assert len({r["lora_id"] for r in catalog}) == len(catalog)
    assert all(r["sha256"] == file_sha256(out / r["path"]) for r in catalog)
    stored = Store(db, read_only=True).rows("SELECT lora_id, sha256 FROM loras")
    assert sorted(stored) == sorted((r["lora_id"], r["sha256"]) for r in catalog)
    assert not list(out.rglob("*.tmp"))


WRITER = textwrap.dedent("""
    import sys, time
    from i2l.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:  # a LoRA file being written, as LoRA.save writes it
        tmp.write_bytes(b"half a LoRA")
        print(tmp, flush=True)
        time.sleep(120)
""")


def test_clean_up_removes_only_dead_writers_leftovers(tmp_path):
    out = tmp_path / "loras"
    (out / "styles").mkdir(parents=True)
    (out / "styles" / "done.safetensors").write_bytes(b"a finished LoRA")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(out / "styles" / "s1.safetensors")], env=env,
                            stdout=subprocess.PIPE, text=True)
    dead = subprocess.Popen([sys.executable, "-c", WRITER, str(out / GRAY_FILE)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        live_tmp, dead_tmp = Path(live.stdout.readline().strip()), Path(dead.stdout.readline().strip())
        assert live_tmp.is_file() and dead_tmp.is_file() and str(live.pid) in live_tmp.name
        dead.send_signal(signal.SIGKILL)  # our own child, by pid: a producer killed mid-write
        dead.wait()
        older = out / ".catalog.parquet.0123abcd.tmp"  # a temp name of before writers were named: a leftover
        older.write_bytes(b"x")
        assert sorted(remove_leftovers(out)) == sorted([dead_tmp, older])
        assert live_tmp.is_file(), "another live run's in-flight file must stay"
        assert (out / "styles" / "done.safetensors").is_file()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    assert remove_leftovers(out) == [live_tmp] and not list(out.rglob("*.tmp"))


def test_the_store_is_written_under_the_catalog_lock(tmp_path):
    """A producer writes the results store inside its catalog merge's lock: written after it, another producer's
    newer row for the same style could land in the catalog between the merge and the store write, and the older row
    would then win the store (seen once in CI: store and catalog disagreeing on one style's hash)."""
    import fcntl

    from i2l.produce.catalog import LOCK_FILE, merge_catalog

    out = tmp_path / "loras"
    out.mkdir()
    seen = []

    def then(kept):
        # another open file: its flock conflicts with the merge's
        with open(out / LOCK_FILE, "a") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(dict(kept))

    assert merge_catalog(out, {}, then=then) == {} and seen == [{}]
    with open(out / LOCK_FILE, "a") as f:  # released after
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_catalogued_loras_the_store_lacks_are_recorded_under_the_catalog_lock(tmp_path):
    """At start-up a producer records the catalogued LoRAs its store lacks. It reads the catalog and the store and
    writes the rows under the catalog lock: read before it, a row that another producer has since replaced (catalog
    and store, under the lock) would be written back over the newer one in the store."""
    import fcntl

    from i2l.produce.catalog import LOCK_FILE, write_catalog
    from i2l.produce.stage import _record_missing

    out, sha = tmp_path / "loras", "ab" * 32
    (out / "styles").mkdir(parents=True)
    store = Store(tmp_path / "results.duckdb")
    _record_missing(store, out, set(), sha)  # no catalog yet: nothing to record, and no lock file made
    assert not (out / LOCK_FILE).exists() and store.rows("SELECT count(*) FROM loras") == [(0,)]

    def row(style: str, digest: str) -> dict:
        (out / "styles" / f"{style}.safetensors").write_bytes(digest.encode())
        return {"lora_id": f"{style}@{sha[:12]}", "style_id": style, "method": "i2l", "checkpoint_id": "run/step_1",
                "checkpoint_sha256": sha, "ref_ids": ["r1", "r2"], "n_refs": 2, "rank": 4,
                "path": f"styles/{style}.safetensors", "sha256": digest * 8, "bytes": 8, "norms": {"l": 1.0},
                "format": "diffusers"}

    write_catalog(out, [row("s1", "11111111"), row("s2", "22222222"), row("s3", "33333333")])
    store.record_loras([{**row("s2", "22222222"), "path": str(out / "styles/s2.safetensors")}])  # already there
    write_catalog(out, [row("s1", "aaaaaaaa"), row("s2", "22222222"), row("s3", "33333333")])  # s1 replaced since
    held = []
    record = store.record_loras

    def spy(rows):
        with open(out / LOCK_FILE, "a") as f, pytest.raises(BlockingIOError):  # another open file: conflicts
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append([r["lora_id"] for r in rows])
        return record(rows)

    store.record_loras = spy
    _record_missing(store, out, {f"s3@{sha[:12]}"}, sha)  # s3 is about to be made again: not recorded now
    assert held == [[f"s1@{sha[:12]}"]]
    assert store.rows("SELECT style_id, sha256 FROM loras ORDER BY 1") == [("s1", "aaaaaaaa" * 8),
                                                                          ("s2", "22222222" * 8)]
    with open(out / LOCK_FILE, "a") as f:  # released after
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_row_joins_the_catalog_only_while_its_file_is_the_one_it_hashed(tmp_path):
    """A producer hashes its file when it writes it and merges the row later. Another producer of the same style may
    have renamed its own file over it in between: a row new to the catalog must then be left out (the file's writer
    merges its own row), or the catalog would name a hash its file does not have, for good if that writer died."""
    import hashlib

    from i2l.produce.catalog import merge_catalog

    out = tmp_path / "loras"
    (out / "styles").mkdir(parents=True)
    sha = lambda b: hashlib.sha256(b).hexdigest()

    def row(style: str, data: bytes) -> dict:
        return {"lora_id": f"i2l:{style}@abc", "path": f"styles/{style}.safetensors", "sha256": sha(data),
                "norms": {}}

    (out / "styles" / "a.safetensors").write_bytes(b"their LoRA")  # renamed over mine after I hashed mine
    (out / "styles" / "b.safetensors").write_bytes(b"my LoRA")
    mine = {r["lora_id"]: r for r in (row("a", b"my LoRA"), row("b", b"my LoRA"), row("gone", b"my LoRA"))}
    kept = merge_catalog(out, mine)
    assert sorted(kept) == ["i2l:b@abc"] and sorted(mine) == ["i2l:b@abc"]  # a: not my file; gone: no file
    assert [r["lora_id"] for r in read_catalog(out)] == ["i2l:b@abc"]
    theirs = row("a", b"their LoRA")  # the writer of the file on disk merges its row: it joins
    assert sorted(merge_catalog(out, {theirs["lora_id"]: theirs})) == ["i2l:a@abc", "i2l:b@abc"]
    assert {r["lora_id"]: r["sha256"] for r in read_catalog(out)} == {"i2l:a@abc": sha(b"their LoRA"),
                                                                       "i2l:b@abc": sha(b"my LoRA")}
    (out / "styles" / "b.safetensors").write_bytes(b"a third LoRA")  # a catalogued row merged again, same hash:
    assert "i2l:b@abc" in merge_catalog(out, {"i2l:b@abc": row("b", b"my LoRA")})  # the catalog's own, kept
