"""`processes.prefork`, as `start` uses it for the agent, with real processes: a fresh
interpreter forks a child that prepares, waits, and runs its job only on `go`; it leaves the
parent's session and writes only to its log; `cancel` or the parent's death ends it unrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="prefork forks on Linux only")

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from offload.cli import processes
    from offload.core.waiting import wait_until

    work, action = Path(sys.argv[1]), sys.argv[2]

    def prepare():
        (work / "prepared").write_text(str(os.getpid()))
        def job():
            print("job ran", os.environ["OFFLOAD_TEST_MARK"], flush=True)
            (work / "job.json").write_text(json.dumps({
                "pid": os.getpid(), "sid": os.getsid(0), "ppid_sid": int(sys.argv[3]),
                "comm": Path(f"/proc/{os.getpid()}/comm").read_text().strip(),
                "stdin": os.readlink("/proc/self/fd/0"),
            }))
            sys.exit(7)
        return job

    forked = processes.prefork(prepare, work / "child.log", {"OFFLOAD_TEST_MARK": "m1"}, "offload-test")
    assert forked is not None
    print("parent says hello", flush=True)
    wait_until((work / "prepared").exists, 30, "the child to prepare")  # before any go
    if action == "go":
        forked.go()
        _, status = os.waitpid(forked.pid, 0)
        print(json.dumps({"child": forked.pid, "code": os.waitstatus_to_exitcode(status)}))
    elif action == "cancel":
        forked.cancel()
        _, status = os.waitpid(forked.pid, 0)
        print(json.dumps({"child": forked.pid, "code": os.waitstatus_to_exitcode(status)}))
    else:  # the parent dies without a word
        print(json.dumps({"child": forked.pid}), flush=True)
        os._exit(3)
    """
)


def _drive(
    tmp_path: Path, action: str
) -> tuple[dict[str, object], subprocess.CompletedProcess[str]]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), action, str(os.getsid(0))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stderr == "", done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done


def test_go_runs_the_job_in_a_detached_child_that_writes_only_to_its_log(tmp_path: Path) -> None:
    said, done = _drive(tmp_path, "go")
    assert said["code"] == 7  # the job's own exit code
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["pid"] == said["child"] == int((tmp_path / "prepared").read_text())
    assert job["sid"] == job["pid"] != job["ppid_sid"]  # a session of its own
    assert job["comm"] == "offload-test"
    assert job["stdin"] == "/dev/null"
    assert (tmp_path / "child.log").read_text() == "job ran m1\n"
    assert "job ran" not in done.stdout and done.stdout.startswith("parent says hello\n")


def test_cancel_ends_the_child_without_running_the_job(tmp_path: Path) -> None:
    said, _ = _drive(tmp_path, "cancel")
    assert said["code"] == 0
    assert (tmp_path / "prepared").exists() and not (tmp_path / "job.json").exists()


def test_the_parents_death_ends_the_child_without_running_the_job(tmp_path: Path) -> None:
    said, done = _drive(tmp_path, "die")
    assert done.returncode == 3
    child = int(str(said["child"]))
    # The child was the dead parent's: init reaps it once it leaves; wait for /proc to say so.
    from offload.core.waiting import wait_until

    wait_until(
        lambda: not Path(f"/proc/{child}").exists() or _zombie(child), 30, "the child's exit"
    )
    assert not (tmp_path / "job.json").exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


EARLY_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from offload.cli import agent_launcher
    from offload.core.client_paths import ClientPaths

    home, other = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ["OFFLOAD_HOME"] = str(home)
    def end(launcher):  # one child waits at a time, as in `start`: none holds another's pipe
        launcher.cancel()
        _, status = os.waitpid(launcher._forked.pid, 0)
        return os.waitstatus_to_exitcode(status)

    agent_launcher.fork_for_start()  # as the entry point does for `start`
    early = agent_launcher._early
    taken = agent_launcher.launcher_for(ClientPaths(home))
    end(taken)
    again = agent_launcher.launcher_for(ClientPaths(home))  # taken once: a fork of its own
    end(again)
    agent_launcher.fork_for_start()
    stale = agent_launcher._early
    elsewhere = agent_launcher.launcher_for(ClientPaths(other))
    _, status = os.waitpid(stale._forked.pid, 0)  # cancelled: ended without running the agent
    end(elsewhere)
    print(json.dumps({
        "taken_is_early": taken is early, "again_is_early": again is early,
        "elsewhere_is_stale": elsewhere is stale, "elsewhere_home": str(elsewhere.paths.home),
        "stale_code": os.waitstatus_to_exitcode(status),
    }))
    """
)


def test_start_takes_the_agent_forked_early_for_its_paths_only(tmp_path: Path) -> None:
    """`fork_for_start` (the entry point, for `start`) forks the agent before the CLI's imports;
    `start` takes that child when its paths are the same, once; for other paths it cancels it
    (the child ends without running the agent) and forks a new one."""
    home, other = tmp_path / "home", tmp_path / "other"
    result = subprocess.run(
        [sys.executable, "-c", EARLY_DRIVER, str(home), str(other)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seen = json.loads(result.stdout)
    assert seen == {
        "taken_is_early": True,
        "again_is_early": False,
        "elsewhere_is_stale": False,
        "elsewhere_home": str(other),
        "stale_code": 0,
    }
    assert not (home / "run" / "agent.json").exists()  # no agent ever ran
    assert not (other / "run" / "agent.json").exists()
