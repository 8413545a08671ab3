"""The `docker save` archives of the images a builder moved lately, kept on the runner by image id.

A teammate's fresh session that builds what the builder built before gets the same image (the
same id: BuildKit's cache gives the same config and layers), and that image has to move into the
new session's empty engine in full. `docker save` writes every layer into a temporary directory
before it sends a byte (moby's image/tarexport/save.go), and `docker load` receives the whole
archive before it registers a layer, so the two never overlap: the save is about a third of a
move. Keeping the archive of each moved image lets the next move of that image skip the save.

Trust: an image id is the digest of the image's config, and `docker load` checks every layer
against the config's diff ids (load.go: "invalid diffID for layer"), so a kept archive either
loads that very image or fails; the caller checks the image is there afterwards and drops an
archive that did not give it.

Archives live outside the builder's sandbox (root-only `data_dir/exports/<builder id>`), up to
`OFFLOAD_RUNNER_BUILDER_EXPORT_CACHE_MB` per builder, the least recently used leaving first, and
never when keeping one would leave its filesystem under a tenth free. Wiping the builder and an
owner's `offload builder prune` remove them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MIN_FREE_FRACTION = 10  # keep nothing that would leave under 1/10 of the filesystem free


class ExportCache:
    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.directory = directory
        self.limit_bytes = limit_bytes

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    def lookup(self, image_id: str) -> Path | None:
        """The kept archive of `image_id`, marked as just used; None when there is none."""
        path = self._path(image_id)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def staging(self) -> Path:
        """A new empty file to save an archive into (then `keep` or unlink it)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix=".staging-", suffix=".tar", dir=self.directory)
        os.close(fd)
        return Path(name)

    def keep(self, image_id: str, staged: Path) -> bool:
        """Keep `staged` as the archive of `image_id` when it fits; removes it otherwise."""
        size = staged.stat().st_size
        if not self.enabled or size > self.limit_bytes or not self._room_left():
            staged.unlink(missing_ok=True)
            return False
        staged.replace(self._path(image_id))
        self._evict()
        return True

    def drop(self, image_id: str) -> None:
        self._path(image_id).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def size_bytes(self) -> int:
        return sum(size for _, size in self._archives())

    def _path(self, image_id: str) -> Path:
        digest = image_id.removeprefix("sha256:")
        if not digest.isalnum():  # an image id is hex; never a path
            raise ValueError(f"not an image id: {image_id!r}")
        return self.directory / f"{digest}.tar"

    def _archives(self) -> list[tuple[Path, int]]:
        """Kept archives, least recently used first, with their sizes."""
        found = []
        for path in self.directory.glob("[!.]*.tar"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((stat.st_mtime_ns, path, stat.st_size))
        return [(path, size) for _, path, size in sorted(found)]

    def _evict(self) -> None:
        archives = self._archives()
        total = sum(size for _, size in archives)
        for path, size in archives:
            if total <= self.limit_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            log.info("export cache %s over its limit: removed %s", self.directory.name, path.name)

    def _room_left(self) -> bool:
        """The filesystem keeps a tenth free with the staged archive on it."""
        usage = shutil.disk_usage(self.directory)
        return usage.free >= usage.total // MIN_FREE_FRACTION
