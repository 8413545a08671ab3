"""Move a built image from the organisation's builder into the session's engine, sending only the
layers that engine lacks.

`docker save` (`GET /images/get`) of the builder writes every layer; `docker load`
(`POST /images/load`) of dockerd registers a layer only when the engine has no layer of the same
chain id, and then never opens its file (moby's image/tarexport/load.go). So the runner saves
the image to its own disk, learns which layers the session's engine has (the layer chains of
its images), and loads into the session a copy of the archive without those layers' tarballs:
a one-line source change moves one layer.

The other way, before each build, the builder gets the session's local-only tagged images it
lacks (`sync_tags`: no RepoDigests, so never pulled; a pulled base the builder pulls itself):
a Dockerfile may say `FROM` an image the session built, loaded, imported or committed, as with
a local engine. The builder keeps the images it built or received, so the next build finds
them there and nothing moves; the versions a new build replaced (now untagged) are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
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

    def describe(self) -> str:
        if not self.image_bytes:
            return "Offload: the session's engine has this image already; nothing moved"
        return (
            f"Offload: moved {self.layers_sent} of {self.layers} layers into the session's "
            f"engine ({_size(self.bytes_sent)} sent; the whole image is {_size(self.image_bytes)})"
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
    builder: Path, session: Path, image_id: str, tags: Iterable[str], work_dir: Path
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
            transfer = await _save_and_load(source, target, image_id, keep, work_dir)
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
            await move_image(session, builder, image_id, [tag], work_dir)
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


async def _save_and_load(
    source: httpx.AsyncClient,
    target: httpx.AsyncClient,
    image_id: str,
    keep: list[bool],
    work_dir: Path,
) -> Transfer:
    """Save to the runner's disk (the manifest comes last in the archive), then stream the
    archive without the present layers straight into the load. With every layer missing
    (a fresh engine), the save streams into the load as it comes."""
    if all(keep):
        return await _stream_whole(source, target, image_id, len(keep))
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = Path(tempfile.mkstemp(prefix="save-", suffix=".tar", dir=work_dir)[1])
    try:
        async with source.stream("GET", "/images/get", params={"names": image_id}) as answer:
            if answer.status_code != 200:
                raise _refused("save the built image on the builder", await answer.aread())
            with saved.open("wb") as out:
                async for chunk in answer.aiter_raw(CHUNK):
                    out.write(chunk)
        layers_sent = 0
        read_end, write_end = os.pipe()
        sink = _Counting(os.fdopen(write_end, "wb"))
        writing = asyncio.create_task(asyncio.to_thread(_without_present_layers, saved, sink, keep))
        try:
            answer = await target.post(
                "/images/load", params={"quiet": "1"}, content=_read_fd(read_end),
                headers={"Content-Type": "application/x-tar"},
            )  # fmt: skip
        finally:
            os.close(read_end)  # a writer still going gets EPIPE and ends
            with contextlib.suppress(BrokenPipeError):
                layers_sent = await writing
        _check_stream(answer)
        return Transfer(image_id, len(keep), layers_sent, sink.count, saved.stat().st_size)
    finally:
        saved.unlink(missing_ok=True)


async def _stream_whole(
    source: httpx.AsyncClient, target: httpx.AsyncClient, image_id: str, layers: int
) -> Transfer:
    sent = 0

    async def archive(answer: httpx.Response) -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in answer.aiter_raw(CHUNK):
            sent += len(chunk)
            yield chunk

    async with source.stream("GET", "/images/get", params={"names": image_id}) as saved:
        if saved.status_code != 200:
            raise _refused("save the built image on the builder", await saved.aread())
        answer = await target.post(
            "/images/load", params={"quiet": "1"}, content=archive(saved),
            headers={"Content-Type": "application/x-tar"},
        )  # fmt: skip
    _check_stream(answer)
    return Transfer(image_id, layers, layers, sent, sent)


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
