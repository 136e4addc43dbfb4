"""A real PostgreSQL server for tests, started on loopback in a temporary directory.

``postgres_server`` (session scope) runs ``initdb`` and ``pg_ctl start`` from the PostgreSQL 15/16
binaries (``PMETA_PG_BIN``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` or ``PATH``) on
127.0.0.1 and a free port, with trust authentication for the user ``pmeta``, and stops it at the
end. PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user
(or ``nobody``) through ``runuser``. Tests using it skip, with the reason, when no binaries exist
or the server does not start. ``postgres_url`` creates a fresh database per test.

Import the fixtures into a test module (``from pgserver import postgres_server, postgres_url``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "pmeta"


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database; return its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def find_bin_dir() -> Path | None:
    candidates = [os.environ.get("PMETA_PG_BIN", "")]
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(os.path.realpath(initdb)).parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _runner() -> tuple[list[str], int | None]:
    """Command prefix that runs a program as an unprivileged user, and that user's uid."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], entry.pw_uid
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"], entry.pw_uid
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user with runuser/setpriv is available")


@pytest.fixture(scope="session")
def postgres_server():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install Debian's postgresql package or set PMETA_PG_BIN")
    try:
        prefix, uid = _runner()
    except RuntimeError as error:
        pytest.skip(f"cannot start PostgreSQL: {error}")
    root = Path(tempfile.mkdtemp(prefix="pmeta-pg-", dir="/tmp"))
    data, log = root / "data", root / "server.log"
    if uid is not None:
        os.chown(root, uid, -1)
    root.chmod(0o700)
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    try:
        init = subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120, env=env,
        )
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
        options = f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections=200"
        start = subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"],
            capture_output=True, text=True, timeout=90, env=env,
        )
        if start.returncode != 0:
            tail = log.read_text()[-300:] if log.exists() else start.stderr
            pytest.skip(f"PostgreSQL did not start: {tail.strip()}")
        yield PostgresServer("127.0.0.1", port, USER)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A SQLAlchemy URL of a fresh, empty PostgreSQL database."""
    return postgres_server.create_database()
