"""The runner-side policy: a Docker authorization plugin that each session engine consults.

Each environment's dockerd starts with `--authorization-plugin offload-policy-<env>` and finds this
plugin by its socket, `/run/docker/plugins/<name>.sock` (a "legacy" plugin: no plugin manager).
The protocol is three JSON calls over HTTP/1.1 (content type
`application/vnd.docker.plugins.v1.2+json`):

  POST /Plugin.Activate          -> {"Implements": ["authz"]}
  POST /AuthZPlugin.AuthZReq     {RequestMethod, RequestUri, RequestBody (base64), …}
                                 -> {"Allow": bool, "Msg": str, "Err": str}
  POST /AuthZPlugin.AuthZRes     -> {"Allow": true}   (responses are never filtered)

dockerd checks the plugin when it starts, so the plugin must listen before its engine starts.
Anything other than a 200 answer makes dockerd refuse the request, so the policy fails closed:
a plugin that is down, slow to come back or confused never lets a request through.

The rules themselves live in `policy_rules.py` (`evaluate`); this module only serves them.  Since
session engines run in their own sandboxes, the rules are a second wall that refuses legacy API
versions and GPU requests the session cannot have; the plugin still fails closed on anything it
cannot read.  Each plugin serves one environment and knows its GPUs from the start (a GPU
environment is created for its GPUs, warm or not, and keeps them to the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h11

from offload.core.errors import EnvironmentError_
from offload.runner.gpus import SandboxGpu
from offload.runner.policy_rules import (
    AuthzRequest,
    Decision,
    evaluate,
    request_from_plugin_call,
    split_uri,
)

__all__ = ["AuthzRequest", "Decision", "PolicyPlugin", "evaluate"]

log = logging.getLogger(__name__)

DEFAULT_PLUGIN_DIR = Path("/run/docker/plugins")
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
# dockerd passes at most a 1 MiB request body, base64-encoded inside JSON: 8 MiB is ample.
MAX_CALL_BYTES = 8 * 1024 * 1024
# AuthZRes carries whole JSON responses (a large `docker inspect`): read and dropped, never kept.
_DISCARD_BODY_OF = "/AuthZPlugin.AuthZRes"
_READ_CHUNK = 64 * 1024

_INTERNAL_ERROR = Decision(
    False,
    "Offload policy: this request could not be checked (internal error in the runner's policy). "
    "Try again; if it persists, tell your Offload operator.",
    "internal-error",
)


class _CallError(Exception):
    """A plugin call that gets a non-200 answer with `Err`: dockerd then refuses the request."""

    def __init__(self, status: int, err: str) -> None:
        super().__init__(err)
        self.status = status
        self.err = err


class PolicyPlugin:
    """Serves the policy for one environment's engine on `socket_path`.

    Many instances can run in one event loop (one per environment).  `mount_area` is kept for the
    callers' sake: the rules no longer look at bind sources (the sandbox confines them).  `gpus`:
    the environment's GPUs as its engine numbers them (none: a session without a GPU).
    """

    def __init__(
        self,
        name: str,
        mount_area: Path,
        plugin_dir: Path = DEFAULT_PLUGIN_DIR,
        gpus: Sequence[SandboxGpu] = (),
    ) -> None:
        self.name = name
        self.mount_area = Path(mount_area)
        self.plugin_dir = Path(plugin_dir)
        self.gpus = tuple(gpus)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def socket_path(self) -> Path:
        return self.plugin_dir / f"{self.name}.sock"

    @property
    def running(self) -> bool:
        return self._server is not None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the socket (idempotent). Refuses a socket another process still serves."""
        if self._server is not None:
            return
        self.plugin_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        await self._refuse_if_served()
        try:
            # A stale socket file (a runner that died) is replaced by start_unix_server.
            self._server = await asyncio.start_unix_server(
                self._serve_connection, path=str(self.socket_path)
            )
            # Only dockerd (root) has any business here.
            os.chmod(self.socket_path, 0o600)
        except OSError as exc:
            await self.stop()
            raise EnvironmentError_(
                f"The policy plugin {self.name} cannot listen on {self.socket_path} "
                f"({exc.strerror or exc}).",
                "Run the runner as root so that it can write to the Docker plugin directory.",
            ) from None

    async def stop(self) -> None:
        """Stop serving, close open connections and remove the socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def _refuse_if_served(self) -> None:
        try:
            _, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError:
            return  # no socket, or a stale one nobody listens on
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise EnvironmentError_(
            f"The policy plugin socket {self.socket_path} is already served by another process.",
            "Stop the other runner using this environment name, or pick another name.",
        )

    # ---- HTTP over the socket --------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            # dockerd keeps connections alive: serve calls until it closes the connection.
            while True:
                call = await _read_call(conn, reader)
                if call is None:
                    break
                target, body = call
                status, answer = await self._answer(target, body)
                await _write_answer(conn, writer, status, answer)
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a broken client: drop the connection; dockerd treats that as a refusal
        except Exception:
            log.exception("policy %s: a plugin call failed; dropping its connection", self.name)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _answer(self, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
        endpoint = target.split("?", 1)[0]
        try:
            if endpoint == "/Plugin.Activate":
                return 200, {"Implements": ["authz"]}
            if endpoint == "/AuthZPlugin.AuthZReq":
                return 200, await self._authorize(_json_object(body))
            if endpoint == "/AuthZPlugin.AuthZRes":
                return 200, {"Allow": True}
            return 404, {"Err": f"unknown plugin call {endpoint[:100]!r}"}
        except _CallError as exc:
            log.warning("policy %s: refused a malformed call: %s", self.name, exc.err)
            return exc.status, {"Err": exc.err}

    async def _authorize(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            request = request_from_plugin_call(payload)
        except ValueError as exc:
            raise _CallError(400, str(exc)) from None
        try:
            decision = evaluate(request, self.mount_area, self.gpus)
        except Exception:
            log.exception("policy %s: evaluating a request failed; denying it", self.name)
            decision = _INTERNAL_ERROR
        if not decision.allow:
            self._log_denial(request, decision)
        return {"Allow": decision.allow, "Msg": decision.msg, "Err": ""}

    def _log_denial(self, request: AuthzRequest, decision: Decision) -> None:
        # The path without its query (build args can carry secrets) and the rule: never the body.
        try:
            version, rest = split_uri(request.uri)
            path = f"/v{version}{rest}" if version else rest
        except Exception:
            path = "<unreadable>"
        log.warning(
            "policy %s denied %s %s (rule %s)",
            self.name,
            request.method[:16],
            path[:200],
            decision.rule,
        )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _CallError(400, "the call body is not JSON") from None
    if not isinstance(value, dict):
        raise _CallError(400, "the call body is not a JSON object")
    return value


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_READ_CHUNK))  # b"" tells h11 the peer closed


async def _read_call(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[str, bytes] | None:
    """(target, body) of the next request on the connection, or None once the peer is done."""
    event = await _next_event(conn, reader)
    if not isinstance(event, h11.Request):
        return None  # ConnectionClosed, or anything h11 did not take for a request
    target = event.target.decode("ascii", "replace")
    keep = target.split("?", 1)[0] != _DISCARD_BODY_OF
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            if not keep:
                continue
            size += len(event.data)
            if size > MAX_CALL_BYTES:
                raise h11.RemoteProtocolError("plugin call body too large")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return target, b"".join(chunks)
        else:
            return None


async def _write_answer(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, answer: dict[str, Any]
) -> None:
    data = json.dumps(answer).encode()
    headers = [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(data)))]
    for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=data)):
        writer.write(conn.send(event) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()
