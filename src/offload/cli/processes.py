"""Background processes of the CLI (agent, embedded control plane and runner): spawn, check, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def spawn_detached(args: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    """Start `python -m …` style `args` in its own session, output appended to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            close_fds=True,
        )
    return process.pid


PR_SET_NAME = 15  # prctl(2)


@dataclass
class Forked:
    """A detached child forked early (`prefork`), waiting for `go` to run its job."""

    pid: int
    _go: int | None  # the pipe's write end: one byte runs the job, closing it ends the child

    def go(self) -> int:
        if self._go is not None:
            os.write(self._go, b"1")
            self.cancel()
        return self.pid

    def cancel(self) -> None:
        if self._go is not None:
            os.close(self._go)
            self._go = None


def prefork(
    prepare: Callable[[], Callable[[], None]], log_file: Path, env: dict[str, str], name: str
) -> Forked | None:
    """Fork a child now that leaves this session (its output appended to `log_file`, `env` set),
    runs `prepare` (imports, say) and then waits: `go()` runs the job `prepare` returned,
    `cancel()` or this process's exit ends it. `name` is its name in `ps -o comm` and `top` (its
    command line stays this process's).

    Why not `spawn_detached`: a fresh interpreter imports again what this one has (asyncssh,
    httpx, pydantic, the schemas: about 0.6 s on a 2-core laptop), and the agent can only start
    once the session exists, so the imports land on the critical path of `start`. None where a
    fork is not safe: off Linux (macOS's system libraries are not fork-safe) or with threads.
    """
    if sys.platform != "linux" or threading.active_count() > 1:
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(read_end)
        return Forked(pid, write_end)
    os.close(write_end)
    os._exit(_run_forked(prepare, read_end, log_file, env, name))  # never back into the caller


def _run_forked(
    prepare: Callable[[], Callable[[], None]],
    go: int,
    log_file: Path,
    env: dict[str, str],
    name: str,
) -> int:
    try:
        os.setsid()
        _set_name(name)
        _redirect_stdio(log_file)
        os.environ.update(env)
        job = prepare()
        if os.read(go, 1) != b"1":
            return 0  # cancelled, or the parent is gone
        os.close(go)
        job()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _set_name(name: str) -> None:
    import ctypes  # here: the CLI imports this module before its first request

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _redirect_stdio(log_file: Path) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def is_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].split(" ", 1)[0] != "Z"
    except OSError:
        return False


def terminate(pid: int | None, timeout: float = 20.0) -> bool:
    """SIGTERM, wait up to `timeout` for a clean exit, then SIGKILL. True if it had to kill."""
    if not is_alive(pid):
        return False
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_alive(pid):
            return False
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def log_tail(log_file: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log yet)"
