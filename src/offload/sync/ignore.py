"""Which paths a sync leaves alone: `.dockerignore` and `.offloadignore` with Docker's semantics.

Docker reads `.dockerignore` line by line (moby `dockerignore.ReadAll` + `patternmatcher`):
`#` lines are comments; each pattern is trimmed, `filepath.Clean`ed and made relative to the
root (a leading `/` means nothing more); `*` and `?` never cross `/`; `**` crosses any number of
directories; `!` re-includes; the last matching pattern wins, and a pattern that matches a
directory matches everything below it. Unlike `.gitignore`, a pattern without a slash is *not*
matched at every depth: `*.log` ignores `./x.log`, not `./sub/x.log` (write `**/*.log`).

pathspec's gitignore patterns, anchored at the root with a leading `/`, implement exactly
those rules (parent matching, `**`, character classes, last match wins), so each Docker line
becomes one anchored gitignore pattern. `.offloadignore` is read after `.dockerignore`, so
its `!` lines can bring back what the Docker build context leaves out.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pathspec

from offload.sync.protocol import TEMP_PREFIX

IGNORE_FILES = (".dockerignore", ".offloadignore")


def normalise_docker_lines(lines: list[str]) -> list[str]:
    """The patterns Docker keeps from these lines, in Docker's normal form (`!` kept)."""
    out: list[str] = []
    for index, raw in enumerate(lines):
        line = raw.lstrip("\ufeff") if index == 0 else raw
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = posixpath.normpath(line)
            if len(line) > 1 and line.startswith("/"):
                line = line.lstrip("/") or "/"
        if line in ("", ".", "/"):
            continue  # the root itself is never ignored
        out.append(("!" if invert else "") + line)
    return out


class IgnoreRules:
    """Ignore matcher for one synced root. `only`: sync just this top-level name (file mounts)."""

    def __init__(self, lines: list[str] | None = None, only: str | None = None) -> None:
        self.lines = normalise_docker_lines(list(lines or []))
        self.only = only
        anchored = [
            ("!/" + line[1:]) if line.startswith("!") else "/" + line for line in self.lines
        ]
        self._spec = pathspec.PathSpec.from_lines("gitignore", anchored)
        self.has_exceptions = any(line.startswith("!") for line in self.lines)

    @classmethod
    def load(cls, root: Path, only: str | None = None) -> IgnoreRules:
        """The rules of `root`'s `.dockerignore` then `.offloadignore` (missing files: none)."""
        lines: list[str] = []
        if only is None:
            for name in IGNORE_FILES:
                try:
                    lines += (root / name).read_text(errors="replace").splitlines()
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue
        return cls(lines, only)

    def ignored(self, rel: str) -> bool:
        """Whether the relative path `rel` stays out of the sync (both directions)."""
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(TEMP_PREFIX):
            return True
        if self.only is not None:
            return rel.split("/", 1)[0] != self.only
        return bool(self.lines) and self._spec.match_file(rel)

    def prune(self, rel_dir: str) -> bool:
        """Whether a walk can skip everything below the directory `rel_dir`."""
        if self.only is not None:
            return rel_dir.split("/", 1)[0] != self.only
        return not self.has_exceptions and self.ignored(rel_dir)
