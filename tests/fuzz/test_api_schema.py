"""The control plane keeps the contract of its own OpenAPI document, under schemathesis.

One engine run (what `st run` does) against the live document of a real server (uvicorn on
127.0.0.1, real user and runner tokens), on a SQLite file, then on PostgreSQL: examples, coverage cases (boundaries, odd strings,
wrong types, unexpected methods), random positive and negative cases, and stateful sequences
along the links between operations.  Every response must

- not be a 5xx;
- have a status code, a content type and a body its operation documents;
- if a 4xx, carry ErrorBody with a fix (the RFC 8628 token endpoint's 400 excepted, by name:
  see `harness.DEVICE_TOKEN_OPERATION`);

and schemathesis's other default checks hold (schema-valid data accepted, invalid data refused,
authentication not ignored, 405 with its `Allow` …), with the exceptions named in the harness.

The budget is small and the seed fixed, so CI stays fast and a failure reproduces; the long run
is `bench/fuzz_api.py` (the same harness, more examples, a random seed).  Environment:
OFFLOAD_FUZZ_EXAMPLES (per operation and phase, default 10) and OFFLOAD_FUZZ_SEED (default
fixed).  No time limit is set: schemathesis spends a time limit in full (it keeps fuzzing until
it is up), so the examples bound the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from offload.core import schemas as s
from offload.core.errors import ErrorBody
from offload.core.schemas import API_PREFIX
from tests.support.postgres import INSTALL_HINT, PostgresCluster, find_bin_dir, running_cluster
from tests.web.support import LiveServer

from .harness import (
    DEVICE_TOKEN_OPERATION,
    SCHEMA_PATH,
    Target,
    fuzz,
    load_schema,
    operation_labels,
    schema_config,
    serve,
)

EXAMPLES = int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "10"))
SEED = int(os.environ.get("OFFLOAD_FUZZ_SEED", "20261201"))
# What the run sent and found, for a failure's post-mortem (artifacts/ is not committed).
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "fuzz"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """The server on a SQLite file (as `offload up` has it), then on PostgreSQL, which refuses
    values SQLite takes (a NUL character, an integer beyond 32 bits)."""
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres").create_database("fuzz")
    with serve(tmp_path_factory.mktemp("fuzz-server"), database_url) as live:
        yield live


def test_the_api_keeps_its_documented_contract(target: Target) -> None:
    config = schema_config(target.tokens, max_examples=EXAMPLES, seed=SEED)
    tally = fuzz(load_schema(target.schema_url, config))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = ARTIFACTS / f"api-{target.database}.json"
    report.write_text(json.dumps(tally.summary(), indent=2) + "\n")

    assert not tally.errors, tally.errors
    assert tally.stop_reason == "completed", f"the run stopped early: {tally.stop_reason}"
    # The checks really ran: every operation of the live document got requests …
    live = operation_labels(target.schema_url)
    assert len(live) >= 25, f"the live document lists only {len(live)} operations"
    assert not live - set(tally.statuses), f"never fuzzed: {sorted(live - set(tally.statuses))}"
    assert tally.requests >= 20 * len(live), tally.summary()
    assert DEVICE_TOKEN_OPERATION in tally.statuses
    # … authenticated ones got past authentication, and links led to sessions that exist.
    assert tally.count(f"GET {API_PREFIX}/me", 200) > 0
    assert tally.links > 0 and tally.phases["stateful"] > 0, tally.summary()
    assert tally.count(f"GET {API_PREFIX}/sessions/{{session_id}}", 200) > 0, tally.summary()

    assert not tally.findings, "\n".join(finding.describe() for finding in tally.findings)


# ---- the checks catch what they are for ---------------------------------------------------------


def _broken_app() -> FastAPI:
    """Operations that each break their document in one way (but the last one)."""
    app = FastAPI(openapi_url=SCHEMA_PATH)
    api = APIRouter(prefix=API_PREFIX)
    error_body = {"model": ErrorBody}

    @api.get("/shape", responses={404: error_body})
    async def wrong_shape() -> s.VersionInfo:
        return JSONResponse({"server_version": 1})  # type: ignore[return-value]

    @api.get("/bare-error", responses={404: {"description": "no schema: only ErrorBody's check"}})
    async def bare_error() -> s.VersionInfo:
        return JSONResponse({"detail": "nope"}, status_code=404)  # type: ignore[return-value]

    @api.get("/crash")
    async def crash() -> s.VersionInfo:
        body = ErrorBody(code="internal", message="boom", fix="none")
        return JSONResponse(body.model_dump(), status_code=500)  # type: ignore[return-value]

    @api.get("/split", responses={404: error_body})
    async def split_get() -> s.VersionInfo:
        return s.VersionInfo(server_version="1", min_client_version="1")

    @api.put("/split", responses={404: error_body})  # FastAPI's 405 names GET only
    async def split_put() -> s.VersionInfo:
        return s.VersionInfo(server_version="1", min_client_version="1")

    rfc_error: dict[int | str, dict[str, Any]] = {400: {"model": s.DeviceTokenError}}

    @api.post("/lookalike/token", responses=rfc_error)
    async def lookalike() -> s.VersionInfo:
        body = s.DeviceTokenError(error="invalid_grant")
        return JSONResponse(body.model_dump(), status_code=400)  # type: ignore[return-value]

    @api.post("/device/token", responses=rfc_error)
    async def device_token() -> s.VersionInfo:
        body = s.DeviceTokenError(error="invalid_grant")
        return JSONResponse(body.model_dump(), status_code=400)  # type: ignore[return-value]

    app.include_router(api)
    return app


def test_the_checks_catch_broken_responses() -> None:
    server = LiveServer(_broken_app()).start()
    try:
        config = schema_config({}, max_examples=3, seed=SEED)
        schema = load_schema(server.url + SCHEMA_PATH, config)
        schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
        tally = fuzz(schema)
    finally:
        server.stop()
    found = {(f.operation.split()[-1], f.check, f.status) for f in tally.findings}
    assert (f"{API_PREFIX}/shape", "response_schema_conformance", 200) in found
    assert (f"{API_PREFIX}/bare-error", "error_body_conformance", 404) in found
    assert (f"{API_PREFIX}/crash", "not_a_server_error", 500) in found
    assert (f"{API_PREFIX}/crash", "status_code_conformance", 500) in found
    assert (f"{API_PREFIX}/split", "allow_names_the_methods", 405) in found
    # The RFC 8628 exception is that endpoint's 400, not any 400 shaped like it.
    assert (f"{API_PREFIX}/lookalike/token", "error_body_conformance", 400) in found
    assert (f"{API_PREFIX}/device/token", "error_body_conformance", 400) not in found
    assert f"POST {API_PREFIX}/device/token" in tally.statuses
