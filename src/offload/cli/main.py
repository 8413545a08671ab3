"""`offload` — and, through the Docker CLI plugin, `docker offload` — commands.

Commands parse, call one function of `session_ops` / `embedded`, and print (pretty or JSON).
Expected failures are `OffloadError`s: printed with their fix, mapped to an exit code, no trace.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from offload import __version__
from offload.cli import embedded, session_ops
from offload.cli.durations import format_duration, parse_bounded_duration, parse_duration
from offload.core.config import DEFAULT_SERVER_PORT, DEFAULT_SSH_PORT, ClientPaths
from offload.core.errors import OffloadError

T = TypeVar("T")

app = typer.Typer(
    name="offload",
    help="Run your Docker containers and builds on a remote, isolated engine through an SSH "
    "tunnel, with the docker tools you already use.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


class OutputFormat(StrEnum):
    PRETTY = "pretty"
    JSON = "json"


def _paths() -> ClientPaths:
    return ClientPaths()


def _run(work: Callable[[], Coroutine[Any, Any, T]] | Callable[[], T]) -> T:
    """Run a command body; turn expected errors into a message with the fix and an exit code."""
    try:
        result = work()
        if asyncio.iscoroutine(result):
            return asyncio.run(result)  # type: ignore[no-any-return]
        return result  # type: ignore[return-value]
    except OffloadError as exc:
        err.print(f"[bold red]Error:[/] {exc.message}", highlight=False)
        if exc.fix:
            err.print(f"[bold]Fix:[/] {exc.fix}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("Interrupted.")
        raise typer.Exit(130) from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ---- session commands ---------------------------------------------------------------------------


@app.command()
def start(
    account: Annotated[
        str | None, typer.Option("--account", "-a", help="Organisation that pays (see `accounts`).")
    ] = None,
    gpu: Annotated[bool, typer.Option("--gpu", "-g", help="Ask for a GPU runner.")] = False,
    idle_timeout: Annotated[
        str | None,
        typer.Option(help="Go idle after this long without activity: 10s to 1h, e.g. 5m."),
    ] = None,
    timeout: Annotated[
        str, typer.Option(help="How long to wait for the remote engine, e.g. 10s, 1m.")
    ] = "10s",
) -> None:
    """Start a session: a remote engine becomes your docker context `offload`."""
    paths = _paths()

    async def work() -> session_ops.StartResult:
        idle_s = (
            int(parse_bounded_duration(idle_timeout, "--idle-timeout", 10, 3600))
            if idle_timeout
            else None
        )
        engine_timeout = parse_duration(timeout, "--timeout")
        with err.status("Starting Offload…") as spinner:
            return await session_ops.start(
                paths, account, gpu, idle_s, engine_timeout, lambda m: spinner.update(m + "…")
            )

    result = _run(work)
    session = result.session
    if result.plugin_installed:
        err.print(f"Installed the Docker CLI plugin: {result.plugin_installed}")
    if result.already_running:
        out.print(f"Offload is already started: session [bold]{session.id}[/].")
        return
    runner = session.runner.name if session.runner else "?"
    out.print(f"[green]✓[/] Offload started: session [bold]{session.id}[/] on runner {runner}.")
    if result.context_switched:
        out.print("  docker context [bold]offload[/] is now current: docker commands run remotely.")
    else:
        out.print(f"  docker CLI not found; use DOCKER_HOST=unix://{result.socket}")
    out.print("  `docker offload status` shows the session; `docker offload stop` ends it.")


@app.command()
def stop(
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Do not ask for confirmation.")
    ] = False,
) -> None:
    """End the session now: the remote engine and everything in it is wiped."""
    if not force and sys.stdin.isatty():
        typer.confirm(
            "This ends your Offload session and wipes its containers, images and volumes. "
            "Continue?",
            abort=True,
        )
    paths = _paths()
    result = _run(lambda: session_ops.stop(paths))
    if result.session_id is None:
        out.print("No Offload session is running.")
    else:
        out.print(f"[green]✓[/] Session [bold]{result.session_id}[/] stopped; its engine is wiped.")
    if result.restored_context:
        out.print(f"  docker context restored to [bold]{result.restored_context}[/].")
    if result.server_error:
        err.print(f"[yellow]Warning:[/] {result.server_error} The runner wipes it when it expires.")


@app.command()
def status(
    format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="pretty or json.")
    ] = OutputFormat.PRETTY,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every second.")] = False,
) -> None:
    """Show the session: state, id, runner, engine socket, time until idle."""
    paths = _paths()
    if not watch:
        _show_status(_run(lambda: session_ops.status(paths)), format)
        return
    from rich.live import Live

    try:
        with Live(console=out, auto_refresh=False) as live:
            while True:
                data = _run(lambda: session_ops.status(paths))
                live.update(_status_table(data), refresh=True)
                asyncio.run(asyncio.sleep(1))
    except KeyboardInterrupt:
        return


def _show_status(data: dict[str, Any], format: OutputFormat) -> None:
    if format == OutputFormat.JSON:
        _print_json(data)
    else:
        out.print(_status_table(data))
        if data["agent"]["last_error"] and data["session_id"]:
            err.print(f"[yellow]Agent:[/] {data['agent']['last_error']}")
        if data["session_id"] and not data["agent"]["running"]:
            err.print("The agent is not running: `docker offload start` reconnects.")
        if data.get("docker_host_env"):
            err.print("[yellow]Note:[/] DOCKER_HOST is set and overrides the docker context.")


def _status_table(data: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    uptime = data.get("uptime_s")
    idle = data.get("idle_timeout_s")
    rows = [
        ("Account", data["account"]),
        ("State", data["state"]),
        ("Session", data["session_id"]),
        ("Started", data["session_start"]),
        ("Uptime", format_duration(uptime) if uptime is not None else None),
        ("Idle timeout", format_duration(idle) if idle else None),
        ("GPU", "yes" if data["gpu"] else "no"),
        ("Control plane", data["server"]),
        ("Runner", data["runner"]),
        ("Engine", data["engine"]),
        ("Docker context", data["docker_context"]),
    ]
    if data.get("server_error"):
        rows.append(("Server error", data["server_error"]))
    for label, value in rows:
        table.add_row(label, "-" if value in (None, "") else str(value))
    return table


@app.command()
def version(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    short: Annotated[bool, typer.Option("--short", help="Only the client version.")] = False,
) -> None:
    """Show client and server versions."""
    if short:
        typer.echo(__version__)
        return
    info = _run(lambda: session_ops.version(_paths()))
    if as_json:
        _print_json(info)
        return
    out.print(f"Offload client {info['client_version']} (API v{info['api_version']})")
    if "server_version" in info:
        out.print(f"Control plane  {info['server_version']} at {info['server']}")
    elif "server_error" in info:
        err.print(f"Control plane: {info['server_error']}")


@app.command()
def accounts() -> None:
    """List the user and the organisations that can pay for sessions (JSON)."""
    result = _run(lambda: session_ops.accounts(_paths()))
    _print_json(result.model_dump(mode="json"))


@app.command()
def login(
    server: Annotated[str, typer.Option(help="Control plane URL, e.g. https://offload.example")],
    token: Annotated[
        str | None, typer.Option(envvar="OFFLOAD_TOKEN", help="API token (or set OFFLOAD_TOKEN).")
    ] = None,
    username: Annotated[str | None, typer.Option("--username", "-u")] = None,
    password: Annotated[
        str | None, typer.Option(envvar="OFFLOAD_PASSWORD", help="Asked for when omitted.")
    ] = None,
) -> None:
    """Sign this machine in to a control plane with a token, or a user name and password."""
    if token is None and username and password is None:
        password = typer.prompt("Password", hide_input=True)
    me = _run(lambda: session_ops.login(_paths(), server, token, username, password))
    out.print(f"[green]✓[/] Signed in to {server} as [bold]{me.username}[/].")


@app.command()
def diagnose(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check configuration, control plane, runner, agent and docker CLI; each failure names its fix."""
    from offload.cli import diagnose as checks_module

    checks = _run(lambda: checks_module.run_checks(_paths()))
    if as_json:
        _print_json(checks_module.as_json(checks))
    else:
        marks = {"pass": "[green]✓[/]", "fail": "[red]✗[/]", "warn": "[yellow]![/]", "skip": "-"}
        for check in checks:
            out.print(f"{marks[check.status]} {check.name}: {check.detail}", highlight=False)
            if check.fix and check.status in ("fail", "warn"):
                out.print(f"    Fix: {check.fix}", highlight=False)
    if any(check.failed for check in checks):
        raise typer.Exit(1)


# ---- embedded default and daemons ---------------------------------------------------------------


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Control plane port.")] = DEFAULT_SERVER_PORT,
    ssh_port: Annotated[int, typer.Option(help="Runner SSH port.")] = DEFAULT_SSH_PORT,
    run_dir: Annotated[Path, typer.Option(help="Runner sockets (short path).")] = Path(
        "/run/offload"
    ),
    cgroup_parent: Annotated[str, typer.Option(help="cgroup of all environments.")] = "offload",
    pool_size: Annotated[int, typer.Option(help="Warm environments kept ready.")] = 1,
    admin: Annotated[str | None, typer.Option(help="Admin user name (default: you).")] = None,
) -> None:
    """Start the embedded default: a control plane and a local runner on this machine."""
    paths = _paths()

    def work() -> embedded.UpResult:
        with err.status("Starting Offload…") as spinner:
            return embedded.up(
                paths,
                port,
                ssh_port,
                run_dir,
                cgroup_parent,
                pool_size,
                admin,
                progress=lambda m: spinner.update(m + "…"),
            )

    result = _run(work)
    if result.already_running:
        out.print(f"Offload is already up at {result.server_url}.")
        return
    out.print(f"[green]✓[/] Offload is up: control plane {result.server_url}, local runner ready.")
    if result.admin_password:
        out.print(
            f"  Admin user [bold]{result.admin_username}[/], password "
            f"[bold]{result.admin_password}[/] (also in {paths.embedded_dir}/admin-password)."
        )
    out.print("  This CLI is signed in. Next: [bold]docker offload start[/]")


@app.command()
def down() -> None:
    """Stop the embedded control plane and runner (sessions end, engines are wiped)."""
    paths = _paths()
    if (paths.session_file).exists():
        _run(lambda: session_ops.stop(paths))
    stopped = embedded.down(paths)
    out.print("Offload is down." if stopped else "Offload was not running.")


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Listen address [OFFLOAD_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [OFFLOAD_PORT].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State [OFFLOAD_DATA_DIR].")] = None,
) -> None:
    """Run the control plane (API, certificate authority, scheduler) in the foreground."""
    from offload.core.config import ServerSettings
    from offload.server.main import serve

    overrides = {k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v}
    _run(lambda: serve(ServerSettings(**overrides)))


@app.command()
def runner() -> None:
    """Run a runner host in the foreground (settings from OFFLOAD_RUNNER_* variables)."""
    from offload.runner.daemon import main as runner_main

    _run(runner_main)


@app.command(hidden=True)
def agent() -> None:
    """Run the laptop agent in the foreground (`start` launches it in the background)."""
    from offload.agent.daemon import main as agent_main

    _run(agent_main)


def main() -> None:
    app(prog_name="offload")


if __name__ == "__main__":
    main()
