"""User SQL (`i2l query`, `Store.user_query`) reads the store and nothing else: no files, no settings changes."""

from __future__ import annotations

import pytest

from i2l.store import Store
from i2l.store.queries import user_query
from tests.fixtures_store import make_fixture_store


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory):
    return make_fixture_store(tmp_path_factory.mktemp("store"))


@pytest.fixture()
def reader(fixture_store):
    store, _ = fixture_store
    return Store(store.path, read_only=True)


def test_selects_over_tables_and_views_still_work(reader, fixture_store):
    _, info = fixture_store
    assert user_query(reader, "SELECT count(*) AS n FROM samples")["n"][0] == 30
    ms = user_query(reader, "SELECT method, mean FROM v_method_summary WHERE metric = 'overall'")
    assert len(ms) > 0 and ms["mean"].notna().all()
    runs = user_query(reader, f"SELECT run_id FROM runs WHERE run_id = '{info['eval_run']}'")
    assert list(runs["run_id"]) == [info["eval_run"]]


def test_copy_to_a_file_is_refused_and_writes_nothing(reader, tmp_path):
    target = tmp_path / "x.csv"
    with pytest.raises(ValueError, match="disabled by configuration"):
        user_query(reader, f"COPY (SELECT 1) TO '{target}'")
    with pytest.raises(ValueError, match="disabled by configuration"):
        user_query(reader, f"SELECT 1; COPY (SELECT 1) TO '{target}'")
    assert not target.exists()


@pytest.mark.parametrize("reader_sql", ["read_csv('{f}')", "read_text('{f}')", "glob('{d}/*')"])
def test_reading_other_files_is_refused(reader, tmp_path, reader_sql):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="disabled by configuration"):
        user_query(reader, "SELECT * FROM " + reader_sql.format(f=secret, d=tmp_path))


@pytest.mark.parametrize("sql", [
    "SET enable_external_access = true",
    "SET GLOBAL enable_external_access = true",
    "RESET enable_external_access",
    "SET lock_configuration = false",
    "SET allowed_directories = ['/']",
])
def test_the_sandbox_cannot_be_turned_off(reader, sql, tmp_path):
    with pytest.raises(ValueError, match="locked"):
        user_query(reader, sql)
    # Each query gets a fresh connection: the next one is still closed off.
    with pytest.raises(ValueError, match="disabled by configuration"):
        user_query(reader, f"COPY (SELECT 1) TO '{tmp_path / 'y.csv'}'")


def test_attach_and_extensions_are_refused(reader, tmp_path):
    for sql in (f"ATTACH '{tmp_path / 'other.duckdb'}'", "INSTALL httpfs", "LOAD httpfs"):
        with pytest.raises(ValueError, match="query failed: .*(disabled|Permission)"):
            user_query(reader, sql)
    assert not (tmp_path / "other.duckdb").exists()


def test_user_sql_never_runs_on_a_writer_transaction(fixture_store):
    store, _ = fixture_store
    with store.transaction(), pytest.raises(ValueError, match="inside a store transaction"):
        store.user_query("SELECT 1")
    # The pipeline's own connections are untouched: a writer still writes, a reader still reads.
    with store.transaction() as con:
        con.execute("CREATE TEMP TABLE scratch AS SELECT 1 AS a")
    assert store.rows("SELECT count(*) FROM runs")[0][0] == 4


def test_query_command_refuses_file_access_in_one_line(fixture_store, tmp_path, capsys):
    from i2l.cli import main

    store, _ = fixture_store
    target = tmp_path / "x.csv"
    for sql in (f"COPY (SELECT 1) TO '{target}'", "SELECT * FROM read_csv('/etc/hostname')",
                "SET enable_external_access = true"):
        assert main(["query", "--db", str(store.path), sql]) == 2
        err = capsys.readouterr().err
        assert err.startswith("i2l query: error: query failed:") and err.count("\n") == 1, err
    assert not target.exists()
    assert main(["query", "--db", str(store.path), "--format", "csv", "SELECT count(*) AS n FROM runs"]) == 0
    assert capsys.readouterr().out == "n\n4\n"
