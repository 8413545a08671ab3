"""Helpers of the control-plane tests (imported by conftest and tests)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh

from offload.core import schemas as s
from offload.core.api_client import RunnerClient, UserClient

PASSWORD = "correct horse battery staple"


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, start: datetime = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)) -> None:
        self.current = start

    def __call__(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> datetime:
        self.current += timedelta(seconds=seconds)
        return self.current


@dataclass
class UserHandle:
    id: str
    username: str
    password: str
    org: str
    token: str
    client: UserClient


@dataclass
class RunnerHandle:
    id: str
    name: str
    token: str
    client: RunnerClient
    registered: s.RunnerRegistered

    async def heartbeat(self, wait_s: float = 0, warm: int = 1) -> s.RunnerDesired:
        report = s.RunnerHeartbeat(capacity=4, warm=warm)
        return await self.client.heartbeat(self.id, report, wait_s=wait_s)

    async def session_ids(self) -> list[str]:
        return [item.session_id for item in (await self.heartbeat()).sessions]


def new_host_key_line() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_public_key().decode().strip()


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def session_request(key: asyncssh.SSHKey, **changes: Any) -> s.SessionCreate:
    return s.SessionCreate(client_public_key=public_line(key), client_name="laptop", **changes)


async def describe_certificate(text: str, directory: Path) -> dict[str, str | list[str]]:
    """What OpenSSH itself reads in a certificate (`ssh-keygen -L`), as field -> value(s)."""
    path = directory / "session-cert.pub"
    path.write_text(text + "\n")
    process = await asyncio.create_subprocess_exec(
        "ssh-keygen",
        "-L",
        "-f",
        str(path),
        env={**os.environ, "TZ": "UTC"},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    fields: dict[str, str | list[str]] = {}
    current = ""
    for line in out.decode().splitlines()[1:]:
        key, sep, value = line.strip().partition(": ")
        if sep and line.startswith("        ") and not line.startswith("                "):
            current = key
            fields[key] = value.strip()
        elif line.strip().endswith(":") and not line.startswith("                "):
            current = line.strip().rstrip(":")
            fields[current] = []
        else:
            values = fields.setdefault(current, [])
            assert isinstance(values, list)
            values.append(line.strip())
    return fields


BUSY = s.ActivityReport(api_calls=1)


async def keep_busy(
    user: UserHandle,
    session_id: str,
    clock: FakeClock,
    tick: Any,
    seconds: float,
    step: float = 1800,
    answer_prompts: bool = True,
) -> s.SessionInfo:
    """Advance `seconds` in steps of `step`: activity, a tick, and "keep" to any prompt."""
    info = await user.client.get_session(session_id)
    left = seconds
    while left > 0:
        clock.advance(min(step, left))
        left -= step
        await user.client.report_activity(session_id, BUSY)
        await tick()
        info = await user.client.get_session(session_id)
        if answer_prompts and info.prompt is not None:
            answer = s.PromptAnswer(answer=s.PromptAnswerChoice.KEEP, prompt_id=info.prompt.id)
            info = await user.client.answer_prompt(session_id, answer)
    return info


def stand_in_gpu(runner_name: str, index: int) -> s.GpuDevice:
    """A GPU as a runner reports it (a stand-in: no GPU exists on the machines tests run on)."""
    return s.GpuDevice(
        uuid=f"GPU-{runner_name}-{index}",
        index=index,
        model="NVIDIA H200 (stand-in)",
        memory_bytes=141 * 1024**3,
        driver_version="570.00",
    )
