"""The control plane under schemathesis: a live server, real credentials, the checks, a tally.

Shared by the fuzz test (a small budget, in CI) and `bench/fuzz_api.py` (the long run):

- `serve(data_dir, database_url)`: the real app (`create_app`: a SQLite file in `data_dir`, or
  the PostgreSQL database named, migrated) served by uvicorn on 127.0.0.1 in a thread, with a real owner of a real organisation and its API token
  (`off_u_…`), and a runner token (`off_r_…`) whose runner registered over HTTP, so that sessions
  get placed.  Time is frozen (`FakeClock`): the runner stays online however long the run, and
  its long poll is clamped under half its (short) timeout, so a fuzzed `wait=60` costs 0.1 s.
- `load_schema(url, config)`: the live OpenAPI document (`/api/v1/openapi.json`), loaded over
  HTTP, each security scheme (UserToken, RunnerToken) given its real token, and a hook that puts
  a real OpenSSH key into most generated bodies that carry one, so that sessions get created
  and the links between operations (create → get / stop / renew …) lead somewhere.
- `fuzz(schema)`: what `st run` does, in this process: every phase (examples, coverage,
  fuzzing, stateful) and every default check, plus two of ours: `error_body_conformance` (each
  4xx carries ErrorBody with a fix, except the RFC 8628 token endpoint's 400, named below) and
  `allow_names_the_methods` (a 405's `Allow` names the path's methods).
- `Tally`: what a run sent (requests by operation, phase and status) and what it found.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, Response
from schemathesis.engine import events, from_schema
from schemathesis.engine.recorder import ScenarioRecorder
from schemathesis.specs.openapi.schemas import OpenApiSchema

from offload.core import schemas as s
from offload.core.api_client import RunnerClient
from offload.core.config import ServerSettings
from offload.core.schemas import API_PREFIX
from offload.server.app import create_app
from offload.server.context import ServerContext
from offload.server.services import accounts, tokens
from tests.unit.server.support import PASSWORD, FakeClock, stand_in_gpu
from tests.web.support import LiveServer

SCHEMA_PATH = f"{API_PREFIX}/openapi.json"

# The one documented exception to ErrorBody (see offload.server.api.device): RFC 8628's token
# endpoint answers 400 `{error, error_description}`, where `authorization_pending` and
# `slow_down` tell the client to keep polling, and `invalid_grant` answers an unknown code.
DEVICE_TOKEN_OPERATION = f"POST {API_PREFIX}/device/token"
DEVICE_TOKEN_ERROR_STATUS = 400

# Body fields that must hold an OpenSSH public key line for a request to get anywhere.
KEY_FIELDS = ("client_public_key", "host_key")
# The operations whose body carries one.  A JSON schema cannot say what an OpenSSH key is, so a
# schema-valid random string is rightly refused with 422 there: positive_data_acceptance
# (schema-valid data is accepted) allows that one status on these operations only.
KEY_OPERATIONS = (
    f"POST {API_PREFIX}/sessions",
    f"POST {API_PREFIX}/sessions/{{session_id}}/certificate",
    f"POST {API_PREFIX}/runners/register",
)
# A JSON schema cannot say that the GPUs a runner reports have distinct UUIDs (uniqueItems
# compares whole objects), so schema-valid duplicates are rightly refused with 422 there.
GPU_REPORT_OPERATIONS = (f"POST {API_PREFIX}/runners/{{runner_id}}/heartbeat",)
STATEFUL_MAX_STEPS = 8


def public_key_line() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_public_key().decode().strip()


@dataclass
class Target:
    """The control plane being fuzzed and the credentials of its real users."""

    server: LiveServer
    ctx: ServerContext
    org: str
    user_token: str
    runner_token: str
    runner_id: str
    database: str  # "sqlite" or "postgresql"

    @property
    def schema_url(self) -> str:
        return self.server.url + SCHEMA_PATH

    @property
    def tokens(self) -> dict[str, str]:
        """Token by security scheme of the document (see offload.server.api.deps)."""
        return {"UserToken": self.user_token, "RunnerToken": self.runner_token}


@contextmanager
def serve(data_dir: Path, database_url: str | None = None) -> Iterator[Target]:
    """`database_url`: None for a SQLite file in `data_dir`, or e.g. a PostgreSQL database."""
    settings = ServerSettings(
        data_dir=data_dir,
        database_url=database_url,
        tick_interval_s=0,  # the lifecycle clock stays off: time is frozen anyway
        runner_timeout_s=0.2,  # frozen time: the runner never times out; polls stay short
    )
    app = create_app(settings, FakeClock())
    ctx: ServerContext = app.state.context
    server = LiveServer(app).start()
    try:
        now = ctx.now()
        with ctx.db.transaction() as db:
            org = accounts.get_or_create_org(db, "fuzz-org", now)
            user = accounts.create_user(db, "fuzzer", PASSWORD, now)
            # An owner: owners' writes (org settings, billing) get past the role check.
            accounts.add_member(db, user, org, s.Role.OWNER, now)
            user_token = tokens.issue_api_token(db, user.id, "fuzz", now)
        runner_token = ctx.db.call(tokens.issue_runner_token, "fuzz-runner", now)
        runner_id = asyncio.run(_register_runner(server.url, runner_token))
        database = "postgresql" if database_url else "sqlite"
        yield Target(server, ctx, "fuzz-org", user_token, runner_token, runner_id, database)
    finally:
        server.stop()


async def _register_runner(url: str, token: str) -> str:
    async with RunnerClient(url, token) as client:
        registered = await client.register(
            s.RunnerRegister(
                name="fuzz-runner",
                ssh_host="127.0.0.1",
                ssh_port=8422,
                host_key=public_key_line(),
                capacity=1000,
                instance_types=[s.InstanceType.STANDARD, s.InstanceType.GPU],
                # GPU sessions are placed too, not refused with 503
                gpu_devices=[stand_in_gpu("fuzz-runner", index) for index in range(8)],
            )
        )
    return registered.id


def schema_config(
    tokens: dict[str, str],
    *,
    max_examples: int,
    seed: int | None = None,
    max_time_s: int | None = None,
) -> schemathesis.Config:
    """Examples per operation and phase, the seed, a time bound; the named exceptions."""
    data: dict[str, Any] = {
        "auth": {
            "openapi": {scheme: {"bearer": token} for scheme, token in tokens.items()},
            "auto-signup": False,  # the users are real ones, made by `serve`
        },
        "generation": {"max-examples": max_examples, "database": "none"},
        "phases": {"stateful": {"max-steps": STATEFUL_MAX_STEPS}},
        "operations": [
            {
                "include-name": DEVICE_TOKEN_OPERATION,
                "checks": _accepts_positive_data_with(DEVICE_TOKEN_ERROR_STATUS),
            },
            *(
                {"include-name": name, "checks": _accepts_positive_data_with(422)}
                for name in KEY_OPERATIONS + GPU_REPORT_OPERATIONS
            ),
        ],
    }
    if not tokens:
        del data["auth"]
    if seed is not None:
        data["seed"] = seed
    if max_time_s is not None:
        data["max-time"] = max_time_s
    return schemathesis.Config.from_dict(data)


def _accepts_positive_data_with(status: int) -> dict[str, Any]:
    # schemathesis's default list (a 5xx is not_a_server_error's to report), plus `status`.
    expected = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx", str(status)]
    return {"positive_data_acceptance": {"expected-statuses": expected}}


def load_schema(url: str, config: schemathesis.Config) -> OpenApiSchema:
    """The live document, loaded over HTTP like any client would."""
    schema = schemathesis.openapi.from_url(url, config=config)
    keys = [public_key_line() for _ in range(4)]

    @schema.hook("flatmap_body")
    def real_keys(_context: Any, body: Any) -> st.SearchStrategy[Any]:
        # Three in four generated bodies that carry a key get a real one; the fourth keeps the
        # fuzzed value (as do all coverage cases, which hooks do not touch), so that the key
        # parsing is fuzzed too.
        if not isinstance(body, dict) or not any(isinstance(body.get(f), str) for f in KEY_FIELDS):
            return st.just(body)
        real = {f: st.sampled_from(keys) for f in KEY_FIELDS if isinstance(body.get(f), str)}
        with_real = st.fixed_dictionaries(real).map(lambda k: {**body, **k})
        return st.sampled_from([False, True, True, True]).flatmap(
            lambda use_real: with_real if use_real else st.just(body)
        )

    return schema


def operation_labels(schema_url: str) -> set[str]:
    """Every operation of the live document, as `METHOD /path` (as schemathesis names them)."""
    document = httpx.get(schema_url, timeout=10).json()
    return {
        f"{method.upper()} {path}"
        for path, methods in document["paths"].items()
        for method in methods
        if method in ("get", "put", "post", "delete", "patch")
    }


# ---- the check ------------------------------------------------------------------------------


@schemathesis.check
def error_body_conformance(_ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 4xx carries ErrorBody with a code, a message and a fix; the RFC 8628 token endpoint's
    400 carries DeviceTokenError instead (and only that one)."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"{response.status_code} without a JSON body: {response.content[:200]!r}"
        ) from None
    if case.operation.label == DEVICE_TOKEN_OPERATION and (
        response.status_code == DEVICE_TOKEN_ERROR_STATUS
    ):
        if not (isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]):
            raise AssertionError(f"RFC 8628 token error without an `error` code: {body!r}")
        return True
    missing = [
        name
        for name in ("code", "message", "fix")
        if not (isinstance(body, dict) and isinstance(body.get(name), str) and body[name].strip())
    ]
    if missing:
        raise AssertionError(
            f"{response.status_code} body lacks ErrorBody's {', '.join(missing)}: {body!r}"
        )
    return True


@schemathesis.check
def allow_names_the_methods(_ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 405's `Allow` names every method the document declares at the path (schemathesis's
    own checks let an empty `Allow` through)."""
    if response.status_code != 405:
        return None
    allow = ",".join(response.headers.get("allow", []))
    advertised = {method.strip().upper() for method in allow.split(",") if method.strip()}
    declared = {method.upper() for method in case.operation.schema[case.operation.path]}
    if not declared <= advertised:
        raise AssertionError(f"405 with `Allow: {allow}`; the path serves {sorted(declared)}")
    return True


# ---- a run --------------------------------------------------------------------------------------


@dataclass
class Finding:
    operation: str
    check: str
    title: str
    message: str
    status: int | None
    curl: str

    def describe(self) -> str:
        return f"{self.operation} [{self.check}] {self.title}: {self.message} (got {self.status})\n    {self.curl}"


@dataclass
class Tally:
    """What one run sent (requests per operation and phase, status codes) and what failed."""

    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    elapsed_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # by operation
    phases: Counter[str] = field(default_factory=Counter)
    phase_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the engine's own (not the server's)
    stateful_scenarios: int = 0
    links: int = 0
    seconds: float = 0.0
    stop_reason: str = ""

    @property
    def requests(self) -> int:
        return sum(self.phases.values())

    def count(self, operation: str, status: int) -> int:
        return self.statuses.get(operation, Counter())[status]

    def add(self, phase: str, recorder: ScenarioRecorder) -> None:
        for case_id, interaction in recorder.interactions.items():
            if interaction.response is None:
                continue
            node = recorder.cases.get(case_id)
            label = node.value.operation.label if node is not None else recorder.label
            self.statuses[label][interaction.response.status_code] += 1
            self.elapsed_s[label] += interaction.response.elapsed
            self.phases[phase] += 1
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                node = recorder.cases.get(failure.case_id or case_id)
                response = recorder.find_response(case_id=failure.case_id or case_id)
                self.findings.append(
                    Finding(
                        operation=node.value.operation.label if node else recorder.label,
                        check=check.name,
                        title=failure.title,
                        message=failure.message,
                        status=response.status_code if response is not None else None,
                        curl=check.failure_info.code_sample,
                    )
                )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "operations": len(self.statuses),
            "by_phase": dict(self.phases),
            "phase_seconds": {name: round(s, 1) for name, s in self.phase_seconds.items()},
            "stateful_scenarios": self.stateful_scenarios,
            "links": self.links,
            "server_errors": sum(
                n
                for counter in self.statuses.values()
                for code, n in counter.items()
                if code >= 500
            ),
            "findings": [asdict(finding) for finding in self.findings],
            "engine_errors": self.errors,
            "seconds": round(self.seconds, 1),
            "stop_reason": self.stop_reason,
            "by_operation": {
                label: {
                    "statuses": {str(code): n for code, n in sorted(counter.items())},
                    "seconds": round(self.elapsed_s[label], 2),
                }
                for label, counter in sorted(self.statuses.items())
            },
        }


def fuzz(schema: OpenApiSchema) -> Tally:
    """Every phase schemathesis has (examples, coverage, fuzzing, stateful), with every check
    enabled by default plus ours (registered above): what `st run` does, in this process."""
    tally = Tally(links=schema.statistic.transitions.total)
    started = phase_started = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tally.add(event.phase.value, event.recorder)
            if event.phase.value == "stateful":
                tally.stateful_scenarios += 1
        elif isinstance(event, events.FuzzScenarioFinished):
            tally.add("fuzz", event.recorder)
        elif isinstance(event, events.PhaseStarted):
            phase_started = time.monotonic()
            if event.payload is not None:
                tally.links = max(tally.links, event.payload.transitions_total)
        elif isinstance(event, events.PhaseFinished):
            tally.phase_seconds[event.phase.name.value] += time.monotonic() - phase_started
        elif isinstance(event, events.NonFatalError):
            tally.errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            tally.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            tally.stop_reason = event.stop_reason.value
            for failure in event.failures:
                tally.findings.append(
                    Finding("(run)", "after_run", failure.title, failure.message, None, "")
                )
    tally.seconds = time.monotonic() - started
    return tally
