"""Starting the session's agent for `start`, forked as soon as the command is known.

The agent can only connect once the control plane has placed the session, and `start` waits
for it. What it imports is most of that wait, so the entry point (`offload.cli.entry`) forks it
right after the imports both sides use (pydantic, the schemas, httpx: once, shared by the fork)
and before those only one side uses: the CLI's typer and rich while the agent's asyncssh,
tunnel and sync load on the other core. Forked after all of the CLI's imports, the agent was
still importing when the session was there; forked before any, both imported the shared part.

Light on purpose: the entry point imports it before the rest of the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from offload.cli import processes
from offload.core.client_paths import ClientPaths


class AgentLauncher:
    """Starts the session's agent: forked when made (`processes.prefork`) and waiting; where a
    fork is not offered, a fresh interpreter at `launch`."""

    def __init__(self, paths: ClientPaths) -> None:
        self.paths = paths
        self.env = {"OFFLOAD_HOME": str(paths.home)}
        self._forked = processes.prefork(_agent_main, paths.agent_log, self.env, "offload-agent")

    def launch(self) -> None:
        self.paths.agent_state_file.unlink(missing_ok=True)  # the new agent writes its own
        if self._forked is not None:
            self._forked.go()
        else:
            processes.spawn_detached(["-m", "offload.agent.daemon"], self.paths.agent_log, self.env)

    def cancel(self) -> None:
        if self._forked is not None:
            self._forked.cancel()


_early: AgentLauncher | None = None


def fork_for_start() -> None:
    """Fork the agent now, for the `start` this process is about to run (`launcher_for`)."""
    global _early
    _early = AgentLauncher(ClientPaths())


def launcher_for(paths: ClientPaths) -> AgentLauncher:
    """The agent forked early for these paths, else one forked now."""
    global _early
    early, _early = _early, None
    if early is not None and early.paths.home == paths.home:
        return early
    if early is not None:
        early.cancel()
    return AgentLauncher(paths)


def _agent_main() -> Callable[[], None]:
    from offload.core.asyncssh_loader import import_asyncssh

    import_asyncssh()  # before anything of the agent's imports it the slow way
    from offload.agent.daemon import main

    return main
