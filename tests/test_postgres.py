"""Schema migrations (Alembic) on SQLite and PostgreSQL, and pmeta end to end on a real PostgreSQL
server started on loopback (tests/pgserver.py; skipped with the reason where PostgreSQL's binaries
are missing). The storage tests in test_storage.py run on both backends too."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from pgserver import postgres_server, postgres_url  # noqa: F401 - fixtures
from pmeta.errors import BankBusy, BankIntegrityError
from pmeta.storage import BankStore
from pmeta.storage import migrate
from pmeta.storage.db import Base

REPO = Path(__file__).resolve().parents[1]
ENV_PATH = str(REPO)


def toy_version(store: BankStore, seed: int = 0) -> str:
    with store.new_version() as writer:
        writer.write_bytes("anchors.faiss", bytes([seed]) * 64)
        writer.write_json("catalog.json", {"seed": seed})
        return writer.publish(config={"seed": seed}, dataset_name="toy", dataset_fingerprint=f"fp{seed}",
                              anchors=[{"n_users": 2, "label": "a"}], held_out_users=["u1", "u2"])


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.db'}"
    return request.getfixturevalue("postgres_url")


def test_the_migrations_build_exactly_the_models_schema(url):
    engine = create_engine(url)
    assert migrate.upgrade(engine) == "empty"
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == migrate.head()
        assert migrate.schema_state(connection) == "current"
    assert migrate.upgrade(engine) == "current"  # idempotent
    engine.dispose()


def test_a_bank_made_before_alembic_is_stamped_and_upgraded(tmp_path):
    """A bank with the original tables and no alembic_version (what pmeta wrote before its
    migrations) opens, is stamped at 0001 and upgraded; its old version gets its record checksum
    (revision 0003), the one a version published now would get."""
    store = BankStore(tmp_path / "bank")
    old = toy_version(store)
    store.close()
    connection = sqlite3.connect(tmp_path / "bank" / "bank.db")
    connection.execute("DROP TABLE alembic_version")
    connection.execute("ALTER TABLE bank_versions DROP COLUMN record_sha256")
    connection.commit()
    connection.close()

    with BankStore(tmp_path / "bank") as reopened:
        assert reopened.open().id == old  # upgraded on open
        new = toy_version(reopened, seed=1)
        assert reopened.open().id == new and reopened.verify(all_versions=True)["ok"]
    engine = create_engine(f"sqlite:///{tmp_path / 'bank' / 'bank.db'}")
    with engine.connect() as connection:
        assert migrate.schema_state(connection) == "current"
        sums = dict(connection.execute(text("SELECT id, record_sha256 FROM bank_versions")).all())
    assert len(sums[old]) == 64 and len(sums[new]) == 64
    engine.dispose()
    with BankStore(tmp_path / "bank") as reopened:
        assert reopened.verify(all_versions=True)["ok"]


def test_revision_0003_fills_in_the_checksum_of_versions_published_before_0002(url, tmp_path):
    """On either backend: a NULL checksum left by a pre-0002 version is filled in on the upgrade,
    with the value publishing computes, and a row changed afterwards is caught."""
    store = BankStore(tmp_path / "bank", url)
    old, other = toy_version(store), toy_version(store, seed=1)
    store.close()
    engine = create_engine(url)
    with engine.begin() as connection:
        expected = dict(connection.execute(text("SELECT id, record_sha256 FROM bank_versions")).all())
        connection.execute(text("UPDATE bank_versions SET record_sha256 = NULL WHERE id = :id"), {"id": old})
        connection.execute(text("UPDATE alembic_version SET version_num = '0002'"))
    with BankStore(tmp_path / "bank", url) as reopened:
        assert reopened.open().id == other and reopened.verify(all_versions=True)["ok"]
    with engine.begin() as connection:
        assert migrate.schema_state(connection) == "current"
        assert dict(connection.execute(text("SELECT id, record_sha256 FROM bank_versions")).all()) == expected
        connection.execute(text("UPDATE bank_versions SET notes = 'changed' WHERE id = :id"), {"id": old})
    engine.dispose()
    with pytest.raises(BankIntegrityError, match=f"the record of version {old} does not match its checksum"):
        BankStore(tmp_path / "bank", url).open(old)


def test_a_null_record_checksum_is_refused_once_the_schema_is_current(url, tmp_path):
    """Since revision 0003 every version has a checksum: a NULL one is damage, not an old version."""
    store = BankStore(tmp_path / "bank", url)
    version = toy_version(store)
    store.close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE bank_versions SET record_sha256 = NULL"))
    engine.dispose()
    with pytest.raises(BankIntegrityError, match=f"the record of version {version} has no checksum"):
        BankStore(tmp_path / "bank", url).open()


def test_an_unknown_schema_revision_is_refused(url, tmp_path):
    store = BankStore(tmp_path / "bank", url)
    toy_version(store)
    store.close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(BankIntegrityError, match="schema revision '9999'"):
        BankStore(tmp_path / "bank", url).open()


# ------------------------------------------------------------------------------------ PostgreSQL
def test_cli_end_to_end_on_postgresql(postgres_url, tmp_path):
    """pmeta bank build / info / verify / adapt with --db postgresql+psycopg://..."""
    from pmeta.cli import app
    from pmeta.data.sample import SAMPLE_DIR

    data = tmp_path / "ml"
    data.mkdir()
    shutil.copy(SAMPLE_DIR / "movies.csv", data / "movies.csv")
    lines = (SAMPLE_DIR / "ratings.csv").read_text().splitlines(keepends=True)
    (data / "ratings.csv").write_text(lines[0] + "".join(line for line in lines[1:] if int(line.split(",")[0]) <= 60))
    config = tmp_path / "micro.toml"
    config.write_text("validate_stages = false\nearly_stopping = false\nanchors = 2\nprompt_length = 4\ntower_steps = 3\n"
                      "tower_rounds = 1\nmeta_batch_users = 4\nglobal_steps = 1\nanchor_steps = 1\nstack_steps = 1\n")
    bank = tmp_path / "bank"
    runner = CliRunner()
    built = runner.invoke(app, ["bank", "build", "--data", str(data), "--config", str(config), "--out", str(bank), "--db", postgres_url, "--quiet"])
    assert built.exit_code == 0, built.stderr
    assert not (bank / "bank.db").exists()  # the metadata lives in PostgreSQL
    info = runner.invoke(app, ["bank", "info", str(bank), "--db", postgres_url, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["db_url"].startswith("postgresql+psycopg://")
    assert runner.invoke(app, ["bank", "verify", str(bank), "--db", postgres_url]).exit_code == 0
    history = tmp_path / "h.json"
    history.write_text('{"user_id": "u1", "items": [{"item_id": "1", "rating": 5}, {"item_id": "50", "rating": 4}]}')
    adapted = runner.invoke(app, ["adapt", "--bank", str(bank), "--db", postgres_url, "--history", str(history), "--json", "--top", "5"])
    assert adapted.exit_code == 0, adapted.stderr
    assert len(json.loads(adapted.stdout)["recommendations"]) == 5
    # without --db the directory is not a bank on its own: one clear line
    alone = runner.invoke(app, ["adapt", "--bank", str(bank), "--history", str(history)])
    assert alone.exit_code == 2 and "no bank.db" in alone.stderr


PG_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pmeta.errors import BankBusy
    from pmeta.storage import BankStore
    role, bank, url, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = BankStore(bank, url)
    if role == "reader":
        seen = []
        for _ in range(rounds):
            reader = store.open()
            assert reader.read_json("catalog.json")["seed"] == reader.record["config"]["seed"]
            seen.append(reader.id)
            time.sleep(0.01)
        print(json.dumps(seen))
    else:
        try:
            with store.new_version() as writer:
                print("locked", flush=True)
                time.sleep(float(rounds))
                writer.write_json("catalog.json", {"seed": 99})
                writer.publish(config={"seed": 99}, dataset_name="toy", dataset_fingerprint="fp", anchors=[], held_out_users=[])
            print("published")
        except BankBusy as error:
            print("busy:", error)
    """
)


def test_several_processes_share_one_postgresql_store(postgres_url, tmp_path):
    """Three reader processes open the bank 30 times each while this process publishes versions;
    a build from another bank directory into the same database gets BankBusy (advisory lock)."""
    bank = tmp_path / "bank"
    store = BankStore(bank, postgres_url)
    published = [toy_version(store, seed=0)]
    env = {"PYTHONPATH": ENV_PATH, "PATH": "/usr/bin:/bin"}
    readers = [
        subprocess.Popen([sys.executable, "-c", PG_WORKER, "reader", str(bank), postgres_url, "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    for seed in range(1, 6):
        published.append(toy_version(store, seed=seed))
    outputs = [reader.communicate(timeout=300) for reader in readers]
    for reader, (out, err) in zip(readers, outputs):
        assert reader.returncode == 0, err[-2000:]
        assert set(json.loads(out)) <= set(published)

    holder = subprocess.Popen([sys.executable, "-c", PG_WORKER, "builder", str(bank), postgres_url, "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(BankBusy, match="bank database postgresql"):
            BankStore(tmp_path / "other-dir", postgres_url).new_version()  # another directory, same database
        with pytest.raises(BankBusy):
            store.new_version()  # the same directory: the file lock answers first
    finally:
        out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0 and "published" in out, err[-2000:]
    assert store.open().record["config"] == {"seed": 99}
    assert store.verify(all_versions=True)["ok"]
    store.close()
