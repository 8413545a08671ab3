"""`offload` — and, through the Docker CLI plugin, `docker offload` — commands.

Commands parse, call one function of `session_ops` / `embedded`, and print (pretty or JSON).
Expected failures are `OffloadError`s: printed with their fix, mapped to an exit code, no trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, overload

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from offload import __version__
from offload.cli import agent_launcher, builder_ops, session_ops
from offload.cli.builder_ops import parse_size
from offload.cli.durations import format_duration, parse_bounded_duration, parse_duration
from offload.core import schemas as sch
from offload.core.client_paths import ClientPaths
from offload.core.defaults import DEFAULT_SERVER_PORT, DEFAULT_SSH_PORT
from offload.core.errors import InvalidInput, NotFound, OffloadError

# The embedded default (`up`/`down`) and the settings classes (pydantic-settings) are imported
# by the commands that use them: `docker offload start` waits for every import made here.
if TYPE_CHECKING:
    from offload.cli import embedded
    from offload.core.config import ServerSettings

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


@overload
def _run(work: Callable[[], Coroutine[Any, Any, T]]) -> T: ...


@overload
def _run(work: Callable[[], T]) -> T: ...


def _run(work: Callable[[], Any]) -> Any:
    """Run a command body; turn expected errors into a message with the fix and an exit code."""
    try:
        result = work()
        if asyncio.iscoroutine(result):
            return asyncio.run(result)
        return result
    except OffloadError as exc:
        err.print(f"[bold red]Error:[/] {exc.message}", highlight=False)
        if exc.fix:
            err.print(f"[bold]Fix:[/] {exc.fix}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except ValidationError as exc:
        # A settings object read from OFFLOAD_* variables: name the variable, not a traceback.
        prefix = _settings_prefixes().get(exc.title)
        if prefix is None:
            raise
        for problem in exc.errors():
            name = prefix + "_".join(str(part) for part in problem["loc"]).upper()
            err.print(
                f"[bold red]Error:[/] {name}={problem.get('input')!s}: {problem['msg']}.",
                highlight=False,
            )
        err.print("[bold]Fix:[/] Correct or unset that environment variable.", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("Interrupted.")
        raise typer.Exit(130) from None


def _settings_prefixes() -> dict[str, str]:
    from offload.core.config import RunnerSettings, ServerSettings

    return {
        cls.__name__: str(cls.model_config.get("env_prefix", ""))
        for cls in (ServerSettings, RunnerSettings)
    }


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ---- session commands ---------------------------------------------------------------------------


@app.command()
def start(
    account: Annotated[
        str | None,
        typer.Option("--account", "--org", "-a", help="Organisation that pays (see `accounts`)."),
    ] = None,
    gpu: Annotated[
        bool,
        typer.Option(
            "--gpu", "-g", help="A GPU session: one GPU of a GPU runner, billed at its rate."
        ),
    ] = False,
    idle_timeout: Annotated[
        str | None,
        typer.Option(help="Go idle after this long without activity: 10s to 1h, e.g. 5m."),
    ] = None,
    timeout: Annotated[
        str, typer.Option(help="How long to wait for the remote engine, e.g. 10s, 1m.")
    ] = "10s",
    takeover: Annotated[
        bool,
        typer.Option("--takeover", help="Move your live session from another machine to this one."),
    ] = False,
) -> None:
    """Start a session: a remote engine becomes your docker context `offload`."""
    paths = _paths()
    agent = agent_launcher.launcher_for(paths)  # forked by now, before the spinner's thread

    async def work() -> session_ops.StartResult:
        idle_s = (
            int(parse_bounded_duration(idle_timeout, "--idle-timeout", 10, 3600))
            if idle_timeout
            else None
        )
        engine_timeout = parse_duration(timeout, "--timeout")
        with err.status("Starting Offload…") as spinner:
            return await session_ops.start(
                paths,
                account,
                gpu,
                idle_s,
                engine_timeout,
                lambda m: spinner.update(m + "…"),
                takeover=takeover,
                agent=agent,
            )

    result = _run(work)
    session = result.session
    if result.plugin_installed:
        err.print(f"Installed the Docker CLI plugin: {result.plugin_installed}")
    if result.already_running:
        out.print(f"Offload is already started: session [bold]{session.id}[/].")
        return
    if session.replaced_session_notice:
        out.print(f"[bold]Note:[/] {session.replaced_session_notice}", highlight=False)
    runner = session.runner.name if session.runner else "?"
    out.print(f"[green]✓[/] Offload started: session [bold]{session.id}[/] on runner {runner}.")
    for device in session.gpu_devices:
        out.print(f"  GPU: {device.describe()} ({device.uuid}); `docker run --gpus all` uses it.")
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
    elif result.moved_to:
        out.print(
            f"Session [bold]{result.session_id}[/] runs on {result.moved_to} now: left running "
            "there; this machine is disconnected."
        )
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
        _print_ports(data)
        _print_synced_paths(data)
        _print_lifecycle(data)
        if data["agent"]["last_error"] and data["session_id"]:
            err.print(f"[yellow]Agent:[/] {data['agent']['last_error']}")
        if data["session_id"] and not data["agent"]["running"]:
            err.print("The agent is not running: `docker offload start` reconnects.")
        if data.get("docker_host_env"):
            err.print("[yellow]Note:[/] DOCKER_HOST is set and overrides the docker context.")


def _print_ports(data: dict[str, Any]) -> None:
    """Forwarded ports, and those another program holds on this machine."""
    forwards = data.get("forwards") or []
    if forwards:
        out.print("[bold]Ports[/]")
        for f in forwards:
            connections = f" ({f['open_connections']} open)" if f["open_connections"] else ""
            out.print(
                f"  {f['host_ip']}:{f['port']}/{f['proto']} → {f['container_name']}:"
                f"{f['private_port']}{connections}",
                highlight=False,
            )
    for c in data.get("port_conflicts") or []:
        err.print(
            f"[yellow]Port {c['host_ip']}:{c['port']}/{c['proto']} not forwarded[/] "
            f"({c['container_name']}): {c['reason']}. Free it here (retried at every change) "
            "or publish another port.",
            highlight=False,
        )


def _print_synced_paths(data: dict[str, Any]) -> None:
    """Each synced laptop directory with its state, what is pending, errors and conflicts."""
    synced = data.get("synced_paths") or []
    if not synced:
        return
    out.print("[bold]Synced paths[/]")
    for p in synced:
        pending = f", {p['pending_files']} pending" if p["pending_files"] else ""
        mode = ", read-only" if p["read_only"] else ""
        out.print(
            f"  {p['laptop_path']}: {p['state']}{pending}{mode} ({p['files']} files)",
            highlight=False,
        )
        for e in p["errors"][-3:]:
            err.print(f"    [red]error[/] {e['path'] or '.'}: {e['message']}", highlight=False)
        for c in p["conflicts"][-3:]:
            err.print(
                f"    [yellow]conflict[/] {c['path']}: the laptop's version won; the runner's "
                f"is kept at {c['kept_at']}",
                highlight=False,
            )


def _print_lifecycle(data: dict[str, Any]) -> None:
    """What needs the user: the one-time notice, an open prompt, warnings."""
    if data.get("replaced_session_notice"):
        out.print(f"[bold]Note:[/] {data['replaced_session_notice']}", highlight=False)
    prompt = data.get("prompt")
    if prompt:
        out.print(f"[bold yellow]Prompt:[/] {prompt['message']}", highlight=False)
        out.print(
            "  Answer with [bold]offload keep[/] (keep the session) or [bold]offload idle[/] "
            f"(idle now); no answer by {_clock_time(prompt['expires_at'])} means idle.",
            highlight=False,
        )
    for warning in data.get("warnings") or []:
        out.print(f"[yellow]Warning:[/] {warning}", highlight=False)


def _clock_time(iso: str | None) -> str:
    if not iso:
        return "-"
    from datetime import datetime

    return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")


def _optional_duration(seconds: float | None) -> str | None:
    return format_duration(seconds) if seconds is not None else None


def _gpu_label(data: dict[str, Any]) -> str:
    devices = [sch.GpuDevice.model_validate(item) for item in data.get("gpu_devices") or []]
    return "; ".join(device.describe() for device in devices)


def _status_table(data: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    uptime = data.get("uptime_s")
    idle = data.get("idle_timeout_s")
    grace = data.get("grace_ends_at")
    rows = [
        ("Account", data["account"]),
        ("State", data["state"]),
        ("Session", data["session_id"]),
        ("Started", data["session_start"]),
        ("Uptime", format_duration(uptime) if uptime is not None else None),
        ("Idle timeout", format_duration(idle) if idle else None),
        ("Time until idle", _optional_duration(data.get("time_until_idle_s"))),
        (
            "Wiped at",
            f"{_clock_time(grace)} unless a docker command resumes it" if grace else None,
        ),
        ("Fair use left", _optional_duration(data.get("fair_use_remaining_s"))),
        ("Billed", _optional_duration(data.get("billed_s"))),
        ("GPU", _gpu_label(data) or ("yes" if data["gpu"] else "no")),
        ("Control plane", data["server"]),
        ("Runner", data["runner"]),
        ("Engine", data["engine"]),
        ("Isolation", data.get("isolation")),
        ("Docker context", data["docker_context"]),
    ]
    if data.get("server_error"):
        rows.append(("Server error", data["server_error"]))
    for label, value in rows:
        table.add_row(label, "-" if value in (None, "") else str(value))
    return table


# ---- lifecycle: prompts, usage, settings ----------------------------------------------------------


@app.command()
def keep() -> None:
    """Keep the session going: answers the pending prompt with "keep"."""
    result = _run(lambda: session_ops.keep(_paths()))
    session = result.session
    if result.answered is not None:
        out.print(f"[green]✓[/] Kept session [bold]{session.id}[/] going.")
    else:
        out.print(f"No prompt was pending; session [bold]{session.id}[/] keeps going.")
    if session.time_until_idle_s is not None:
        out.print(
            f"  It goes idle after {format_duration(session.time_until_idle_s)} without activity."
        )


@app.command()
def idle() -> None:
    """Let the session go idle now: containers paused, billing stops; docker commands resume it."""
    result = _run(lambda: session_ops.idle(_paths()))
    session = result.session
    out.print(f"[green]✓[/] Session [bold]{session.id}[/] is idle; billing stopped.")
    if session.grace_ends_at is not None:
        out.print(
            f"  Its environment is kept until {_clock_time(session.grace_ends_at.isoformat())}; "
            "any docker command before then resumes it."
        )


@app.command()
def usage(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Your recent sessions and total time, top images, active sessions and this month's usage."""
    report = _run(lambda: session_ops.usage(_paths()))
    if as_json:
        _print_json(report.model_dump(mode="json"))
        return
    from offload.cli import usage_view

    for renderable in usage_view.render(report):
        out.print(renderable)


def _idle_timeout_setting(text: str | None, option: str) -> tuple[bool, int | None]:
    """(given, seconds): "default" or "none" clears the setting (back to the org's default)."""
    if text is None:
        return False, None
    if text.strip().lower() in ("default", "none", "unset"):
        return True, None
    return True, int(parse_bounded_duration(text, option, 10, 3600))


@app.command()
def settings(
    idle_timeout: Annotated[
        str | None,
        typer.Option(
            help="Your idle timeout for new sessions: 10s to 1h (e.g. 15m), or `default` for "
            "your organisation's."
        ),
    ] = None,
    default_org: Annotated[
        str | None, typer.Option(help="The organisation that pays when `start` names none.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show or change your personal settings (idle timeout, default organisation)."""

    def work() -> Coroutine[Any, Any, sch.UserSettings]:
        given, seconds = _idle_timeout_setting(idle_timeout, "--idle-timeout")
        update = sch.UserSettingsUpdate()
        if given:
            update.idle_timeout_s = seconds
        if default_org is not None:
            update.default_org = default_org
        return session_ops.settings(_paths(), update)

    result = _run(work)
    if as_json:
        _print_json(result.model_dump(mode="json"))
        return
    timeout = result.idle_timeout_s
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "Idle timeout",
        format_duration(timeout) if timeout else "your organisation's default",
    )
    table.add_row("Default organisation", result.default_org or "-")
    out.print(table)


# ---- organisation settings and billing (owners change, members read) --------------------------

org_app = typer.Typer(
    help="Organisation settings and billing: members read, owners change.",
    no_args_is_help=True,
)
app.add_typer(org_app, name="org")


def _optional_int(text: str | None, option: str) -> tuple[bool, int | None]:
    """(given, value): `none` clears."""
    if text is None:
        return False, None
    if text.strip().lower() in ("none", "unlimited", "default"):
        return True, None
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(
            f"{option}: '{text}' is not a whole number.", f"e.g. {option} 600, or `none`."
        ) from None
    if value < 0:
        raise InvalidInput(f"{option}: {value} is negative.", "Use 0 or more, or `none`.")
    return True, value


class Allowance(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@org_app.command("settings")
def org_settings(
    org: Annotated[str | None, typer.Argument(help="Organisation (default: yours).")] = None,
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Turn Offload on/off for members.")
    ] = None,
    idle_timeout_default: Annotated[
        str | None, typer.Option(help="Members' default idle timeout (10s to 1h), or `default`.")
    ] = None,
    lock_idle_timeout: Annotated[
        bool | None,
        typer.Option("--lock-idle-timeout/--unlock-idle-timeout", help="Members cannot choose."),
    ] = None,
    fair_use: Annotated[
        sch.FairUsePolicy | None,
        typer.Option(help="Beyond 8 compute hours a day: warn, prompt or stop."),
    ] = None,
    builder_cache_limit: Annotated[
        str | None,
        typer.Option(
            help="Garbage-collect the shared build cache to this size (e.g. 20GB), "
            "or `default` (the runner's)."
        ),
    ] = None,  # fmt: skip
    gpu_sessions: Annotated[
        Allowance | None,
        typer.Option(help="Whether members may start GPU sessions (`--gpu`): allow or deny."),
    ] = None,
    gpu_limit: Annotated[
        str | None,
        typer.Option(help="Live GPU sessions the organisation may hold at once, or `none`."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show (members) or change (owners) an organisation's Offload settings."""

    def work() -> Coroutine[Any, Any, sch.OrgSettings]:
        update = sch.OrgSettingsUpdate()
        if enable is not None:
            update.offload_enabled = enable
        given, seconds = _idle_timeout_setting(idle_timeout_default, "--idle-timeout-default")
        if given:
            update.idle_timeout_default_s = seconds
        if lock_idle_timeout is not None:
            update.idle_timeout_locked = lock_idle_timeout
        if fair_use is not None:
            update.fair_use_policy = fair_use
        if builder_cache_limit is not None:
            default = builder_cache_limit.strip().lower() in ("default", "none")
            update.builder_cache_limit_bytes = (
                None if default else parse_size(builder_cache_limit, "--builder-cache-limit")
            )
        if gpu_sessions is not None:
            update.gpu_sessions_allowed = gpu_sessions is Allowance.ALLOW
        if gpu_limit is not None:
            update.gpu_session_limit = _gpu_limit(gpu_limit)
        return session_ops.org_settings(_paths(), org, update)

    result = _run(work)
    if as_json:
        _print_json(result.model_dump(mode="json"))
        return
    timeout = result.idle_timeout_default_s
    rows = [
        ("Organisation", result.org),
        ("Offload", "enabled" if result.offload_enabled else "disabled"),
        ("Idle timeout default", format_duration(timeout) if timeout else "server default"),
        ("Idle timeout locked", "yes" if result.idle_timeout_locked else "no"),
        ("Fair use beyond 8 h/day", result.fair_use_policy.value),
        ("Build cache limit", _size(result.builder_cache_limit_bytes) or "runner default"),
        ("GPU sessions", "allowed" if result.gpu_sessions_allowed else "not allowed"),
        ("GPU sessions at once", str(result.gpu_session_limit or "no limit")),
        ("Owners", ", ".join(result.owners) or "-"),
    ]
    _print_rows(rows)


def _gpu_limit(text: str) -> int | None:
    if text.strip().lower() in ("none", "default", "unlimited"):
        return None
    try:
        limit = int(text)
    except ValueError:
        limit = -1
    if not 0 <= limit <= 10_000:
        raise InvalidInput(
            f"--gpu-limit {text!r} is not a number of sessions.",
            "Give a whole number from 0 to 10000, e.g. `--gpu-limit 2`, or `none` for no limit.",
        )
    return limit


def _size(count: int | None) -> str | None:
    if count is None:
        return None
    for unit, factor in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} B"


# ---- the organisation's builder ----------------------------------------------------------------

builder_app = typer.Typer(
    help="Your organisation's shared build cache (builds of every member's session use it).",
    no_args_is_help=True,
)
app.add_typer(builder_app, name="builder")


@builder_app.command("status")
def builder_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Size, records and last use of your organisation's build cache (needs a session)."""
    result = _run(lambda: builder_ops.status(_paths()))
    if as_json:
        _print_json(result)
        return
    if not result.get("running"):
        _print_rows([("Organisation", result.get("org")), ("Builder", "none on this runner: "
                      "builds run on your session's engine")])  # fmt: skip
        return
    _print_rows([
        ("Organisation", result.get("org")),
        ("Cache size", _size(int(result.get("size_bytes") or 0))),
        ("Cache records", f"{result.get('records')} ({result.get('shared_records')} shared)"),
        ("Last used", result.get("last_used_at") or "never"),
        ("Kept up to", result.get("keep_storage")),
    ])  # fmt: skip


@builder_app.command("prune")
def builder_prune(
    everything: Annotated[
        bool, typer.Option("--all/--dangling", help="All unused cache, or only dangling.")
    ] = True,
    keep_storage: Annotated[
        str | None, typer.Option(help="Keep this much of the cache (e.g. 5GB).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Free your organisation's build cache (owners only)."""

    def work() -> Coroutine[Any, Any, dict[str, Any]]:
        keep = parse_size(keep_storage, "--keep-storage") if keep_storage else None
        return builder_ops.prune(_paths(), everything, keep)

    result = _run(work)
    if as_json:
        _print_json(result)
        return
    deleted = len(result.get("CachesDeleted") or [])
    out.print(
        f"Pruned {deleted} cache records, reclaimed {_size(result.get('SpaceReclaimed') or 0)}."
    )


@org_app.command("billing")
def org_billing(
    org: Annotated[str | None, typer.Argument(help="Organisation (default: yours).")] = None,
    committed_minutes: Annotated[
        str | None, typer.Option(help="Committed minutes per month, or `none` (unmetered).")
    ] = None,
    on_demand: Annotated[
        bool | None, typer.Option("--on-demand/--no-on-demand", help="Allow on-demand usage.")
    ] = None,
    on_demand_limit_cents: Annotated[
        str | None, typer.Option(help="Monthly on-demand spend limit in cents, or `none`.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show (members) or change (owners) an organisation's billing, with this month's usage."""

    def work() -> Coroutine[Any, Any, tuple[sch.OrgBilling, sch.OrgUsage]]:
        update = sch.OrgBillingUpdate()
        given, minutes = _optional_int(committed_minutes, "--committed-minutes")
        if given:
            update.committed_minutes_per_month = minutes
        if on_demand is not None:
            update.on_demand_enabled = on_demand
        given, cents = _optional_int(on_demand_limit_cents, "--on-demand-limit-cents")
        if given:
            update.on_demand_limit_cents = cents
        return session_ops.org_billing(_paths(), org, update)

    billing, month = _run(work)
    if as_json:
        _print_json(
            {"billing": billing.model_dump(mode="json"), "usage": month.model_dump(mode="json")}
        )
        return
    from offload.cli import usage_view

    _print_rows(usage_view.billing_rows(billing, month))


@org_app.command("audit")
def org_audit(
    org: Annotated[str | None, typer.Argument(help="Organisation (default: yours).")] = None,
    limit: Annotated[int, typer.Option(help="Events to show.", min=1, max=500)] = 50,
    before: Annotated[
        int | None, typer.Option(help="Only events older than this id (the next page).", min=1)
    ] = None,
    action: Annotated[
        sch.AuditAction | None, typer.Option(help="Only this action, e.g. auth.sign_in_failed.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Security-relevant actions in an organisation and of its members (owners): sign-ins,
    lockouts, tokens, members and roles, settings and billing, takeovers."""
    log = _run(lambda: session_ops.org_audit(_paths(), org, limit, before, action))
    if as_json:
        _print_json(log.model_dump(mode="json"))
        return
    # One line per event, never cut to the terminal's width: a log is read whole and grepped.
    for event in log.events:
        who = event.actor + (f" → {event.subject}" if event.subject else "")
        parts = [event.at.strftime("%Y-%m-%d %H:%M:%S"), event.action.value, who]
        parts += [event.target] if event.target else []
        parts += [f"from {event.address}"] if event.address else []
        parts += [", ".join(f"{k}={v}" for k, v in event.details.items())] if event.details else []
        typer.echo("  ".join(parts))
    if not log.events:
        out.print(f"No audit events in {log.org} yet.")
    if log.next_before is not None:
        out.print(f"Older events: `offload org audit {log.org} --before {log.next_before}`")


@org_app.command("unlock")
def org_unlock(
    username: Annotated[str, typer.Argument(help="The member whose sign-ins are locked.")],
    org: Annotated[str | None, typer.Option(help="Organisation (default: yours).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Clear a member's lockout after too many failed passwords (owners)."""
    result = _run(lambda: session_ops.unlock_member(_paths(), org, username))
    if as_json:
        _print_json(result.model_dump(mode="json"))
        return
    out.print(f"[green]✓[/] {result.username} can sign in again.")


@app.command()
def password(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Change your password (asked for twice); your dashboard sessions end, API tokens stay."""
    current = typer.prompt("Current password", hide_input=True)
    new = typer.prompt(
        "New password (8 characters or more)", hide_input=True, confirmation_prompt=True
    )

    def work() -> Coroutine[Any, Any, sch.UserInfo]:
        if len(new) < 8:
            raise InvalidInput(
                "The new password is shorter than 8 characters.",
                "Run `offload password` again with a longer one.",
            )
        change = sch.PasswordChange(current_password=current, new_password=new)
        return session_ops.change_password(_paths(), change)

    me = _run(work)
    if as_json:
        _print_json(me.model_dump(mode="json"))
        return
    out.print(
        f"[green]✓[/] Password changed for [bold]{me.username}[/]; sign in to the dashboard again."
    )


def _print_rows(rows: list[tuple[str, Any]]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, "-" if value in (None, "") else str(value))
    out.print(table)


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
    """Sign this machine in: in the browser (device code), or with a token or user + password.

    Without --token or --username, prints a URL and a short code; approve it in the dashboard.
    """
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
    port: Annotated[
        int, typer.Option(help="Control plane port.", min=1, max=65535)
    ] = DEFAULT_SERVER_PORT,
    ssh_port: Annotated[
        int, typer.Option(help="Runner SSH port.", min=1, max=65535)
    ] = DEFAULT_SSH_PORT,
    run_dir: Annotated[Path, typer.Option(help="Runner sockets (short path).")] = Path(
        "/run/offload"
    ),
    cgroup_parent: Annotated[str, typer.Option(help="cgroup of all environments.")] = "offload",
    pool_size: Annotated[int, typer.Option(help="Warm environments kept ready.")] = 1,
    admin: Annotated[str | None, typer.Option(help="Admin user name (default: you).")] = None,
) -> None:
    """Start the embedded default: a control plane and a local runner on this machine."""
    from offload.cli import embedded

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
    from offload.cli import embedded

    paths = _paths()
    if (paths.session_file).exists():
        _run(lambda: session_ops.stop(paths))
    stopped = embedded.down(paths)
    out.print("Offload is down." if stopped else "Offload was not running.")


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Listen address [OFFLOAD_HOST].")] = None,
    port: Annotated[
        int | None, typer.Option(help="Listen port [OFFLOAD_PORT].", min=1, max=65535)
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State [OFFLOAD_DATA_DIR].")] = None,
) -> None:
    """Run the control plane (API, certificate authority, scheduler) in the foreground."""
    from offload.core.config import ServerSettings
    from offload.server.main import serve

    overrides: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v
    }

    def work() -> None:
        serve(ServerSettings(**overrides))

    _run(work)


runner_app = typer.Typer(
    help="Run a runner host in the foreground (settings from OFFLOAD_RUNNER_* variables); "
    "`offload runner drain NAME` stops new placements on one; `offload runner gpus` lists the "
    "GPUs this host's runner would offer.",
)
app.add_typer(runner_app, name="runner")


def _operator_settings() -> ServerSettings:
    """The control plane's settings for operator commands run on its host; its SQLite database
    must exist (opening a missing one would make an empty one and list nothing)."""
    from offload.core.config import ServerSettings

    settings = ServerSettings()
    database = settings.data_dir / "offload.db"
    if settings.database_url is None and not database.exists():
        fix = "Set OFFLOAD_DATA_DIR (or OFFLOAD_DATABASE_URL) as the control plane has it."
        embedded = _paths().embedded_dir / "server"
        if (embedded / "offload.db").exists():
            fix = (
                f"The embedded control plane (`offload up`) keeps its data in {embedded}: "
                f"run with OFFLOAD_DATA_DIR={embedded}."
            )
        raise NotFound(f"No control-plane database at {database}.", fix)
    return settings


@runner_app.callback(invoke_without_command=True)
def runner(ctx: typer.Context) -> None:
    """Run a runner host in the foreground (settings from OFFLOAD_RUNNER_* variables)."""
    if ctx.invoked_subcommand is not None:
        return
    from offload.runner.daemon import main as runner_main

    _run(runner_main)


@runner_app.command("drain")
def runner_drain(
    name: Annotated[str, typer.Argument(help="The runner (see `offload admin runners`).")],
    undo: Annotated[bool, typer.Option("--undo", help="Take new sessions again.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Place no new sessions on a runner; its live sessions run to their end (operators, on the
    control plane's host: reads OFFLOAD_DATA_DIR / OFFLOAD_DATABASE_URL)."""
    from offload.server.bootstrap import drain_runner

    fleet = _run(lambda: drain_runner(_operator_settings(), name, not undo))
    if as_json:
        _print_json(fleet.model_dump(mode="json"))
        return
    held = next(view for view in fleet.runners if view.name == name)
    state = "takes new sessions again" if undo else "is draining: no new sessions"
    out.print(f"[green]✓[/] Runner {name} {state} ({held.live_sessions} live session(s)).")


@runner_app.command("gpus")
def runner_list_gpus(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The GPUs this host's runner would offer (OFFLOAD_RUNNER_GPUS), found through NVML as the
    runner finds them at start, and what serves `docker run --gpus` in GPU sessions."""
    from offload.cli import runner_gpus
    from offload.core.config import RunnerSettings

    found = _run(lambda: runner_gpus.survey(RunnerSettings()))
    if as_json:
        _print_json(found.model_dump(mode="json"))
        return
    runner_gpus.show(found, out)


admin_app = typer.Typer(
    help="Operator views, on the control plane's host (OFFLOAD_DATA_DIR / OFFLOAD_DATABASE_URL).",
    no_args_is_help=True,
)
app.add_typer(admin_app, name="admin")


@admin_app.command("runners")
def admin_runners(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Runner hosts: online, draining, capacity, free slots, live sessions."""
    from offload.server.bootstrap import runner_fleet

    fleet = _run(lambda: runner_fleet(_operator_settings()))
    if as_json:
        _print_json(fleet.model_dump(mode="json"))
        return
    table = Table(box=None, pad_edge=False)
    for column in (
        "Runner",
        "SSH",
        "State",
        "Sessions",
        "Free",
        "Warm",
        "Types",
        "GPUs",
        "Heartbeat",
    ):
        table.add_column(column)
    for view in fleet.runners:
        state = "offline" if not view.online else ("draining" if view.draining else "online")
        table.add_row(
            view.name,
            view.ssh,
            state,
            f"{view.live_sessions}/{view.capacity}",
            str(view.free),
            str(view.warm),
            ",".join(t.value for t in view.instance_types),
            f"{view.gpus_busy}/{view.gpus} busy" if view.gpu_devices else str(view.gpus),
            view.last_heartbeat_at.strftime("%H:%M:%S") if view.last_heartbeat_at else "never",
        )
    out.print(table if fleet.runners else "No runner has registered yet.")
    out.print(
        f"{fleet.online} online, {fleet.live_sessions} live session(s), {fleet.free} free slot(s)."
    )


@app.command(hidden=True)
def agent() -> None:
    """Run the laptop agent in the foreground (`start` launches it in the background)."""
    from offload.agent.daemon import main as agent_main

    _run(agent_main)


def main() -> None:
    """`python -m offload.cli.main`; the `offload` command's entry point is `offload.cli.entry`."""
    run_and_exit(prog_name="offload")


def run_and_exit(args: list[str] | None = None, prog_name: str = "offload") -> NoReturn:
    """Run the command, then leave without the interpreter's teardown: with asyncssh, httpx,
    pydantic and rich loaded, tearing down takes about 0.15 s of a 2-core machine's time after
    the command's work is done, and `docker offload start` waits for it. Output and logs are
    flushed first; every command ends its own work (files, children) before it returns."""
    try:
        app(args=args, prog_name=prog_name)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
