"""Organisations' builders with real sandboxed engines: the cache outlives the builder's stop
and a runner restart, stays on the organisation's own identity slot, and moves into a session's
engine with only the layers that engine lacks."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest

from offload.core.engine_http import engine_client
from offload.core.schemas import InstanceSpec
from offload.runner.builders import BuilderPool, builder_id
from offload.runner.environment import EnvPaths, RootlessDriver, cleanup_orphans
from offload.runner.export_cache import ExportCache
from offload.runner.image_transfer import move_image
from tests.integration.runner.conftest import SMALL, MakeSettings
from tests.support.images import BUSYBOX

DEBIAN_DOCKER = Path("/usr/bin/docker")  # BuildKit built in


async def _buildkit(socket: Path, context: Path, tag: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(DEBIAN_DOCKER), "-H", f"unix://{socket}", "build", "--progress=plain", "-t", tag,
        str(context), env={"DOCKER_BUILDKIT": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def _cache_records(socket: Path) -> int:
    async with engine_client(socket, 30) as client:
        return len((await client.get("/system/df")).json().get("BuildCache") or [])


def _context(directory: Path, marker: str, app: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    (directory / "app.txt").write_text(app)
    (directory / "Dockerfile").write_text(
        "FROM scratch\nCOPY busybox /bin/busybox\n"
        f'RUN ["/bin/busybox", "sh", "-c", "echo {marker} > /deps"]\nCOPY app.txt /app.txt\n'
    )
    return directory


@pytest.mark.skipif(not DEBIAN_DOCKER.exists(), reason="needs Debian's docker.io CLI")
async def test_cache_survives_a_runner_restart_and_only_missing_layers_move(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings()
    marker = uuid.uuid4().hex
    context = _context(tmp_path / "ctx", marker, "v1\n")

    pool = BuilderPool(settings, RootlessDriver(settings))
    env = await pool.for_org("acme")
    assert env.id == builder_id("acme")
    slot = int(EnvPaths.of(settings, env.id).identity_file.read_text())
    assert slot == settings.capacity  # the first builder slot, after the sessions' ones
    first = await _buildkit(env.engine_socket, context, "app:1")
    assert "CACHED" not in first.split(marker)[1].split("\n#")[0]
    records = await _cache_records(env.engine_socket)
    assert records > 0
    await pool.close()  # the runner stops
    assert not env.engine_socket.exists()

    await cleanup_orphans(settings)  # a new runner process starts
    driver = RootlessDriver(settings)
    pool = BuilderPool(settings, driver)
    try:
        again = await pool.for_org("acme")
        assert int(EnvPaths.of(settings, again.id).identity_file.read_text()) == slot
        assert await _cache_records(again.engine_socket) >= records
        rebuilt = await _buildkit(again.engine_socket, context, "app:1")
        step = rebuilt.split(marker)[1].split("\n\n")[0]
        assert "CACHED" in step, rebuilt

        other = await pool.for_org("globex")
        assert int(EnvPaths.of(settings, other.id).identity_file.read_text()) == slot + 1
        assert await _cache_records(other.engine_socket) == 0

        session = await driver.create(InstanceSpec(cpus=1, memory_bytes=512 * 1024**2))
        try:
            async with engine_client(again.engine_socket, 30) as client:
                image_id = (await client.get("/images/app:1/json")).json()["Id"]
            moved = await move_image(again.engine_socket, session.engine_socket, image_id,
                                     ["app:1"], settings.data_dir / "transfers")  # fmt: skip
            assert moved.layers_sent == moved.layers == 3
            (context / "app.txt").write_text("v2\n")
            await _buildkit(again.engine_socket, context, "app:2")
            async with engine_client(again.engine_socket, 30) as client:
                image_id = (await client.get("/images/app:2/json")).json()["Id"]
            moved = await move_image(again.engine_socket, session.engine_socket, image_id,
                                     ["app:2"], settings.data_dir / "transfers")  # fmt: skip
            assert (moved.layers_sent, moved.layers) == (1, 3)
            assert moved.bytes_sent < moved.image_bytes / 10
            async with engine_client(session.engine_socket, 30) as client:
                tags = {t for i in (await client.get("/images/json")).json() for t in i["RepoTags"]}
            assert {"app:1", "app:2"} <= tags
        finally:
            await driver.destroy(session)
    finally:
        await pool.close()
    assert list((settings.data_dir / "transfers").iterdir()) == []  # nothing staged is left


async def _image_id(socket: Path, reference: str) -> str:
    async with engine_client(socket, 30) as client:
        return str((await client.get(f"/images/{reference}/json")).json()["Id"])


async def _has(socket: Path, image_id: str) -> bool:
    async with engine_client(socket, 30) as client:
        return (await client.get(f"/images/{image_id}/json")).status_code == 200


@pytest.mark.skipif(not DEBIAN_DOCKER.exists(), reason="needs Debian's docker.io CLI")
async def test_the_next_fresh_engine_gets_the_kept_archive_and_a_false_one_is_dropped(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    """A teammate's fresh engine loads the kept archive (the builder saves nothing); an archive
    that does not give the image it is kept for (another image's, a truncated one) is dropped and
    the image saved again."""
    settings = make_settings()
    pool = BuilderPool(settings, RootlessDriver(settings))
    driver = RootlessDriver(settings)
    work = settings.data_dir / "transfers"
    try:
        builder = await pool.for_org("acme")
        exports = ExportCache(EnvPaths.of(settings, builder.id).exports, 64 * 1024**2)
        await _buildkit(builder.engine_socket, _context(tmp_path / "a", "a", "a\n"), "app:a")
        await _buildkit(builder.engine_socket, _context(tmp_path / "b", "a", "b\n"), "app:b")
        app_a = await _image_id(builder.engine_socket, "app:a")
        app_b = await _image_id(builder.engine_socket, "app:b")

        first = await driver.create(SMALL)  # alice's fresh engine: saved, streamed, kept
        try:
            moved = await move_image(builder.engine_socket, first.engine_socket, app_a,
                                     ["app:a"], work, exports)  # fmt: skip
            assert not moved.from_cache and moved.layers_sent == moved.layers == 3
            # A partial move (two layers present) is kept too.
            moved = await move_image(builder.engine_socket, first.engine_socket, app_b,
                                     ["app:b"], work, exports)  # fmt: skip
            assert not moved.from_cache and (moved.layers_sent, moved.layers) == (1, 3)
        finally:
            await driver.destroy(first)
        kept_a, kept_b = exports.lookup(app_a), exports.lookup(app_b)
        assert kept_a is not None and kept_b is not None

        second = await driver.create(SMALL)  # bob's fresh engine: from the kept archive
        try:
            moved = await move_image(builder.engine_socket, second.engine_socket, app_a,
                                     ["app:a"], work, exports)  # fmt: skip
            assert moved.from_cache and moved.layers_sent == 3, moved
            assert "from the runner's copy of the build" in moved.describe()
            assert await _has(second.engine_socket, app_a)
        finally:
            await driver.destroy(second)

        kept_a.write_bytes(kept_b.read_bytes())  # app:a's archive now loads app:b
        third = await driver.create(SMALL)
        try:
            moved = await move_image(builder.engine_socket, third.engine_socket, app_a,
                                     ["app:a"], work, exports)  # fmt: skip
            assert not moved.from_cache  # dropped, saved again (and kept again)
            assert await _has(third.engine_socket, app_a)
            async with engine_client(third.engine_socket, 30) as client:
                tagged = (await client.get("/images/app:a/json")).json()["Id"]
            assert tagged == app_a
        finally:
            await driver.destroy(third)

        kept_a = exports.lookup(app_a)
        assert kept_a is not None
        with kept_a.open("r+b") as archive:
            archive.truncate(kept_a.stat().st_size // 2)
        fourth = await driver.create(SMALL)
        try:
            moved = await move_image(builder.engine_socket, fourth.engine_socket, app_a,
                                     ["app:a"], work, exports)  # fmt: skip
            assert not moved.from_cache and await _has(fourth.engine_socket, app_a)
        finally:
            await driver.destroy(fourth)
    finally:
        await pool.close()
    assert not work.exists()  # with a cache, every save is staged in it
    kept = {p.name for p in exports.directory.iterdir()}
    assert kept == {f"{app_a[7:]}.tar", f"{app_b[7:]}.tar"}  # and no staging left


@pytest.mark.skipif(not DEBIAN_DOCKER.exists(), reason="needs Debian's docker.io CLI")
async def test_an_idle_builder_stops_and_its_cache_stays(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings(builder_idle_stop_s=600)
    now = [1000.0]
    pool = BuilderPool(settings, RootlessDriver(settings), clock=lambda: now[0])
    try:
        env = await pool.for_org("idle-org")
        await _buildkit(env.engine_socket, _context(tmp_path / "ctx", uuid.uuid4().hex, "x\n"), "x")
        records = await _cache_records(env.engine_socket)
        pool.acquire(env.id, "ses_idle")  # a build channel is open
        now[0] += 601
        assert await pool.stop_idle() == []  # never while a build uses it
        pool.release(env.id)  # the channel ends: last use is now
        now[0] += 599
        assert await pool.stop_idle() == []
        now[0] += 1
        assert await pool.stop_idle() == [env.id]
        assert pool.running() == [] and not env.engine_socket.exists()
        again = await pool.for_org("idle-org")
        assert again.id == env.id and await _cache_records(again.engine_socket) >= records
    finally:
        await pool.close()


async def test_builder_time_is_counted_once_for_the_session_that_began_the_stretch(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings()
    now = [1000.0]
    pool = BuilderPool(settings, RootlessDriver(settings), clock=lambda: now[0])
    try:
        env = await pool.for_org("billing-org")
        pool.acquire(env.id, "ses_a")  # a's build begins the busy stretch
        now[0] += 30
        pool.acquire(env.id, "ses_b")  # b's build runs beside it: the builder is busy once
        assert pool.build_seconds("ses_a") == 30  # under way: counted as it grows
        now[0] += 20
        pool.release(env.id)
        now[0] += 10
        pool.release(env.id)  # the stretch ends: 60 s, a's
        now[0] += 100  # idle: nobody's
        assert (pool.build_seconds("ses_a"), pool.build_seconds("ses_b")) == (60, 0)
        pool.acquire(env.id, "ses_b")
        now[0] += 5
        pool.release(env.id)
        assert (pool.build_seconds("ses_a"), pool.build_seconds("ses_b")) == (60, 5)
        pool.forget("ses_a")  # its session is gone from this runner
        assert pool.build_seconds("ses_a") == 0
    finally:
        await pool.close()
