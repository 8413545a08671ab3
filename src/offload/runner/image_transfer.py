"""Move a built image from the organisation's builder into the session's engine, sending only the
layers that engine lacks.

`docker save` (`GET /images/get`) of the builder writes every layer; `docker load`
(`POST /images/load`) of dockerd registers a layer only when the engine has no layer of the same
chain id, and then never opens its file (moby's image/tarexport/load.go). So the runner saves
the image to its own disk, learns which layers the session's engine has (the layer chains of
its images), and loads into the session a copy of the archive without those layers' tarballs:
a one-line source change moves one layer.

The archive of each image moved is kept (`export_cache`): the next move of the same image (a
teammate's fresh session that built what the builder built before) loads it without a new save.

The other way, before each build, the builder gets the session's local-only tagged images it
lacks (`sync_tags`: no RepoDigests, so never pulled; a pulled base the builder pulls itself):
a Dockerfile may say `FROM` an image the session built, loaded, imported or committed, as with
a local engine. The builder keeps the images it built or received, so the next build finds
them there and nothing moves; the versions a new build replaced (now untagged) are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from offload.core.engine_http import engine_client
from offload.core.errors import EnvironmentError_
from offload.runner.export_cache import ExportCache

log = logging.getLogger(__name__)

TIMEOUT = httpx.Timeout(600.0, connect=10.0)
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Transfer:
    image_id: str
    layers: int
    layers_sent: int
    bytes_sent: int  # the archive loaded into the session's engine
    image_bytes: int  # the whole image as `docker save` writes it
    from_cache: bool = False  # loaded from the kept archive: the builder saved nothing

    def describe(self) -> str:
        if not self.image_bytes:
            return "Offload: the session's engine has this image already; nothing moved"
        source = "; from the runner's copy of the build" if self.from_cache else ""
        return (
            f"Offload: moved {self.layers_sent} of {self.layers} layers into the session's "
            f"engine ({_size(self.bytes_sent)} sent; the whole image is "
            f"{_size(self.image_bytes)}{source})"
        )


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The layer chain id of each prefix of an image's `RootFS.Layers` (the OCI image spec)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            joined = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return chains


async def move_image(
    builder: Path,
    session: Path,
    image_id: str,
    tags: Iterable[str],
    work_dir: Path,
    cache: ExportCache | None = None,
) -> Transfer:
    """Make `image_id` (tagged `tags`) exist in the session's engine; see the module doc."""
    started = time.monotonic()
    async with engine_client(builder, TIMEOUT) as source, engine_client(session, TIMEOUT) as target:
        built = await _json(source, "GET", f"/images/{image_id}/json")
        diff_ids = list(built.get("RootFS", {}).get("Layers") or [])
        if (await target.get(f"/images/{image_id}/json")).status_code == 200:
            transfer = Transfer(image_id, len(diff_ids), 0, 0, 0)
        else:
            present = await _chains_present(target)
            wanted = chain_ids(diff_ids)
            keep = [chain not in present for chain in wanted]
            transfer = await _deliver(source, target, image_id, keep, work_dir, cache)
        for tag in tags:
            await _tag(target, image_id, tag)
    log.info("%s (image %s, %.2fs)", transfer.describe(), image_id[:19], time.monotonic() - started)
    return transfer


async def sync_tags(session: Path, builder: Path, work_dir: Path) -> list[str]:
    """Give the builder every local-only tagged image of the session's engine it lacks under
    that tag; returns the tags that changed there."""
    async with engine_client(session, TIMEOUT) as source, engine_client(builder, TIMEOUT) as target:
        local = [i for i in await _json_list(source, "/images/json") if not i.get("RepoDigests")]
        theirs = _tag_map(local)
        ours = _tag_map(await _json_list(target, "/images/json"))
    changed = []
    for tag, image_id in sorted(theirs.items()):
        if ours.get(tag) == image_id:
            continue
        if image_id in ours.values():
            async with engine_client(builder, TIMEOUT) as target:
                await _tag(target, image_id, tag)
        else:
            await move_image(session, builder, image_id, [tag], work_dir)  # nothing kept
        changed.append(tag)
    return changed


async def prune_replaced(builder: Path) -> None:
    """Remove the builder's untagged images (the versions later builds replaced)."""
    async with engine_client(builder, TIMEOUT) as client:
        await _ok(client, "POST", "/images/prune")


def _tag_map(images: list[dict[str, Any]]) -> dict[str, str]:
    return {
        tag: str(image["Id"])
        for image in images
        for tag in image.get("RepoTags") or []
        if tag != "<none>:<none>"
    }


async def _tag(client: httpx.AsyncClient, image_id: str, reference: str) -> None:
    repo, tag = split_tag(reference)
    await _ok(client, "POST", f"/images/{image_id}/tag?repo={quote(repo)}&tag={quote(tag)}")


async def _chains_present(target: httpx.AsyncClient) -> set[str]:
    images = await _json_list(target, "/images/json?all=1")
    present: set[str] = set()
    for image in images:
        info = await target.get(f"/images/{image['Id']}/json")
        if info.status_code == 200:
            present.update(chain_ids(list(info.json().get("RootFS", {}).get("Layers") or [])))
    return present


async def _deliver(
    source: httpx.AsyncClient,
    target: httpx.AsyncClient,
    image_id: str,
    keep: list[bool],
    work_dir: Path,
    cache: ExportCache | None,
) -> Transfer:
    """Load the image into `target` from its kept archive, or else from a new save of it."""
    kept = cache.lookup(image_id) if cache is not None else None
    if cache is not None and kept is not None:
        try:
            transfer = await _load_archive(target, image_id, kept, keep)
            if await _has_image(target, image_id):
                return dataclasses.replace(transfer, from_cache=True)
            log.warning("the kept archive of %s did not load that image: dropped", image_id)
        except EnvironmentError_ as exc:
            log.warning("the kept archive of %s did not load (%s): dropped", image_id, exc)
        cache.drop(image_id)
    keeper = cache if cache is not None and cache.enabled else None
    if all(keep):
        return await _stream_whole(source, target, image_id, len(keep), keeper)
    saved = keeper.staging() if keeper is not None else _staging(work_dir)
    try:
        await _save(source, image_id, saved)
        transfer = await _load_archive(target, image_id, saved, keep)
    except BaseException:
        saved.unlink(missing_ok=True)
        raise
    if keeper is not None:
        keeper.keep(image_id, saved)
    else:
        saved.unlink(missing_ok=True)
    return transfer


def _staging(work_dir: Path) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix="save-", suffix=".tar", dir=work_dir)
    os.close(fd)
    return Path(name)


async def _save(source: httpx.AsyncClient, image_id: str, saved: Path) -> None:
    async with source.stream("GET", "/images/get", params={"names": image_id}) as answer:
        if answer.status_code != 200:
            raise _refused("save the built image on the builder", await answer.aread())
        with saved.open("wb") as out:
            async for chunk in answer.aiter_raw(CHUNK):
                out.write(chunk)


async def _load_archive(
    target: httpx.AsyncClient, image_id: str, saved: Path, keep: list[bool]
) -> Transfer:
    """Stream the saved archive into the load, without the tarballs of the layers present
    (the manifest comes last in a `docker save` archive, so the archive is read from disk)."""
    size = saved.stat().st_size
    if all(keep):
        await _load(target, _read_file(saved))
        return Transfer(image_id, len(keep), len(keep), size, size)
    layers_sent = 0
    read_end, write_end = os.pipe()
    sink = _Counting(os.fdopen(write_end, "wb"))
    writing = asyncio.create_task(asyncio.to_thread(_without_present_layers, saved, sink, keep))
    try:
        await _load(target, _read_fd(read_end))
    finally:
        os.close(read_end)  # a writer still going gets EPIPE and ends
        with contextlib.suppress(BrokenPipeError):
            layers_sent = await writing
    return Transfer(image_id, len(keep), layers_sent, sink.count, size)


async def _stream_whole(
    source: httpx.AsyncClient,
    target: httpx.AsyncClient,
    image_id: str,
    layers: int,
    cache: ExportCache | None,
) -> Transfer:
    """Every layer is missing (a fresh engine): the save streams into the load as it comes,
    and into the cache on the way."""
    sent = 0
    copy = _Tee(cache.staging()) if cache is not None else None

    async def archive(answer: httpx.Response) -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in answer.aiter_raw(CHUNK):
            sent += len(chunk)
            if copy is not None:
                copy.write(chunk)
            yield chunk

    try:
        async with source.stream("GET", "/images/get", params={"names": image_id}) as saved:
            if saved.status_code != 200:
                raise _refused("save the built image on the builder", await saved.aread())
            await _load(target, archive(saved))
    except BaseException:
        if copy is not None:
            copy.discard()
        raise
    if cache is not None and copy is not None and copy.close():
        cache.keep(image_id, copy.path)
    return Transfer(image_id, layers, layers, sent, sent)


async def _load(target: httpx.AsyncClient, archive: AsyncIterator[bytes]) -> httpx.Response:
    answer = await target.post(
        "/images/load", params={"quiet": "1"}, content=archive,
        headers={"Content-Type": "application/x-tar"},
    )  # fmt: skip
    _check_stream(answer)
    return answer


async def _has_image(target: httpx.AsyncClient, image_id: str) -> bool:
    return (await target.get(f"/images/{image_id}/json")).status_code == 200


class _Tee:
    """The copy of a streamed archive on its way into the cache; a failed write (a full disk)
    gives up the copy, never the move."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out: BinaryIO | None = path.open("wb")

    def write(self, chunk: bytes) -> None:
        if self.out is None:
            return
        try:
            self.out.write(chunk)
        except OSError as exc:
            log.warning("not keeping the archive (%s): %s", self.path.name, exc)
            self.discard()

    def close(self) -> bool:
        """True when the whole copy is on disk."""
        if self.out is None:
            return False
        try:
            self.out.close()
        except OSError as exc:
            log.warning("not keeping the archive (%s): %s", self.path.name, exc)
            self.discard()
            return False
        self.out = None
        return True

    def discard(self) -> None:
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.close()
            self.out = None
        self.path.unlink(missing_ok=True)


class _Counting(io.RawIOBase):
    """A write-only file that counts what passes (the bytes moved)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.count = out, 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)

    def close(self) -> None:
        self.out.close()
        super().close()


def _without_present_layers(saved: Path, sink: _Counting, keep: list[bool]) -> int:
    """Write the `docker save` archive to `sink`, leaving out the tarballs of layers not to
    send; closes `sink`."""
    with sink, tarfile.open(saved) as archive:
        manifest = json.load(_member(archive, "manifest.json"))
        (item,) = manifest
        layers = list(item["Layers"])
        if len(layers) != len(keep):
            raise EnvironmentError_(
                f"The saved image lists {len(layers)} layers, its config {len(keep)}.",
                "Build again; if it persists, report it with the runner's log.",
            )
        dropped = {path for path, wanted in zip(layers, keep, strict=True) if not wanted}
        with tarfile.open(fileobj=sink, mode="w|") as out:
            for member in archive:
                if member.name in dropped:
                    continue
                data = archive.extractfile(member) if member.isfile() else None
                out.addfile(member, data)
    return len(layers) - len(dropped)


def _member(archive: tarfile.TarFile, name: str) -> Any:
    handle = archive.extractfile(name)
    if handle is None:
        raise EnvironmentError_(f"The saved image has no {name}.", "Build again.")
    return handle


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as archive:
        while chunk := await asyncio.to_thread(archive.read, CHUNK):
            yield chunk


async def _read_fd(fd: int) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(os.read, fd, CHUNK):
        yield chunk


def split_tag(reference: str) -> tuple[str, str]:
    """`registry:5000/team/app:1` → (`registry:5000/team/app`, `1`); no tag → `latest`."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return reference, "latest"
    return name, tag


async def _json(client: httpx.AsyncClient, method: str, path: str) -> dict[str, Any]:
    answer = await client.request(method, path)
    if answer.status_code >= 400:
        raise _refused(f"{method} {path}", answer.content)
    body = answer.json()
    return body if isinstance(body, dict) else {}


async def _json_list(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    answer = await client.get(path)
    if answer.status_code >= 400:
        raise _refused(f"GET {path}", answer.content)
    return [item for item in answer.json() or [] if isinstance(item, dict)]


async def _ok(client: httpx.AsyncClient, method: str, path: str) -> None:
    answer = await client.request(method, path)
    if answer.status_code >= 400:
        raise _refused(f"{method} {path}", answer.content)


def _check_stream(answer: httpx.Response) -> None:
    if answer.status_code >= 400:
        raise _refused("load the image into the session's engine", answer.content)
    for line in answer.text.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("errorDetail"):
            raise _refused("load the image into the session's engine", line.encode())


def _refused(what: str, body: bytes) -> EnvironmentError_:
    try:
        detail = str(json.loads(body).get("message") or body.decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")
    return EnvironmentError_(
        f"Could not {what}: {detail.strip()}",
        "Build again; the image stays in the organisation's build cache.",
    )


def _size(count: int) -> str:
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.1f} MiB"
