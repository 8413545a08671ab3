"""A throw-away PostgreSQL cluster for tests, from the server package's binaries (Debian 12:
postgresql-15), run by us.

`PostgresCluster.start()` runs `initdb` into a fresh directory under /tmp and starts `postgres`
on a unix socket there (no TCP port, trust authentication: only the directory's owner and root
can reach the socket).  PostgreSQL refuses to run as root, so under root (CI) both run as an
unprivileged user (`postgres` if the package made it, else `nobody`) through `setpriv`; the
server gets SIGKILL if the test process dies, so a crashed run leaves no server behind.

Durability is off (fsync, full-page writes, synchronous commit): the data are thrown away.
Databases are cheap to clone: `create_database(name, template=...)` copies a migrated template.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from offload.core.waiting import wait_until

PG_ROOT = Path("/usr/lib/postgresql")  # Debian: one VERSION/bin per installed server package
SUPERUSER = "postgres"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
INSTALL_HINT = (
    "no PostgreSQL server binaries (initdb, postgres): `apt-get install postgresql-15` "
    "(scripts/test.sh does), or point OFFLOAD_TEST_PG_BIN at their directory"
)


def _version(directory: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in directory.parent.name.split("."))
    except ValueError:
        return (0,)


def find_bin_dir() -> Path | None:
    """Where `initdb` and `postgres` are: $OFFLOAD_TEST_PG_BIN, else Debian's newest
    /usr/lib/postgresql/VERSION/bin, else PATH."""
    candidates: list[Path] = []
    if os.environ.get("OFFLOAD_TEST_PG_BIN"):
        candidates.append(Path(os.environ["OFFLOAD_TEST_PG_BIN"]))
    candidates += sorted(PG_ROOT.glob("*/bin"), key=_version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: None if we are not root (we run it ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists")


@dataclass
class PostgresCluster:
    bin_dir: Path
    crash_safe: bool = False  # commits survive a SIGKILL of the server (synchronous_commit)
    root: Path = field(init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _user: pwd.struct_passwd | None = field(default=None, init=False)

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one database (psycopg 3, over the unix socket)."""
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        guard = ["setpriv", "--pdeathsig", "SIGKILL"]
        if self._user is None:
            return [*guard, "--", *argv]
        user = self._user
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        return [*guard, *ids, "--", *argv]

    def start(self) -> None:
        """initdb and start; everything is removed again if either fails."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._user = _unprivileged_user()
        # Short: the socket path (+ "/.s.PGSQL.5432") must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="offload-pg-", dir="/tmp"))
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        initdb = subprocess.run(
            self._as_owner(
                [
                    str(self.bin_dir / "initdb"),
                    f"--pgdata={self.data_dir}",
                    f"--username={SUPERUSER}",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            cwd=self.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr.decode(errors='replace')}")
        self._launch()

    def _launch(self) -> None:
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            # A killed server loses nothing it committed only if commits wait for the WAL
            # write (the crash tests); fsync stays off either way: the kernel keeps the pages.
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on" if self.crash_safe else "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "timezone": "UTC",
            "log_min_messages": "warning",
        }
        options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        with open(self.root / "postgres.log", "ab") as log:  # the server keeps its own copy
            self._process = subprocess.Popen(
                self._as_owner(
                    [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), *options]
                ),
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, timeout=START_TIMEOUT_S, what="the test PostgreSQL to accept")

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"postgres exited at start: {self.log_tail()}")
        try:
            with self.connect("postgres"):
                return True
        except psycopg.OperationalError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A plain autocommit connection, for CREATE/DROP DATABASE and checks."""
        return psycopg.connect(
            host=str(self.socket_dir), user=SUPERUSER, dbname=database, autocommit=True
        )

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of `template` if given); its SQLAlchemy URL."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self.connect() as connection:
            connection.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it, ending any connection a test left open."""
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with self.connect() as connection:
            connection.execute(statement)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown checkpoint); the data directory stays."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def restart(self) -> None:
        """Start the server again on the same data directory (after `kill`): crash recovery."""
        self._launch()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: clients are disconnected
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if hasattr(self, "root"):
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(crash_safe: bool = False) -> Iterator[PostgresCluster]:
    """A started cluster for the length of the block (RuntimeError naming the install if the
    server binaries are missing)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError(INSTALL_HINT)
    cluster = PostgresCluster(bin_dir, crash_safe=crash_safe)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
