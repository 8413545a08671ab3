"""`.dockerignore` semantics as moby's patternmatcher applies them (not .gitignore's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.sync.ignore import IgnoreRules, normalise_docker_lines


def test_lines_are_cleaned_like_docker() -> None:
    lines = ["# comment", "", "  /build/  ", "!  keep.md", "./x/../y", "/", "."]
    assert normalise_docker_lines(lines) == ["build", "!keep.md", "y"]


@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        (["*.md"], "README.md", True),
        (["*.md"], "docs/README.md", False),  # not matched at every depth, unlike gitignore
        (["**/*.md"], "docs/a/README.md", True),
        (["*/temp*"], "somedir/temporary.txt", True),
        (["*/temp*"], "somedir/sub/temporary.txt", False),
        (["*/*/temp*"], "a/b/temp", True),
        (["temp?"], "temp1", True),
        (["temp?"], "temp", False),
        (["node_modules"], "node_modules/pkg/index.js", True),  # a directory covers its content
        (["*.md", "!README.md"], "README.md", False),
        (["*.md", "!README.md"], "CHANGES.md", True),
        (["build", "!build/keep"], "build/keep/file", False),  # re-included below an ignored dir
        (["!README.md", "*.md"], "README.md", True),  # the last match wins
        (["/abs"], "abs", True),
        (["[a-c].txt"], "b.txt", True),
    ],
)
def test_docker_matching(patterns: list[str], path: str, ignored: bool) -> None:
    assert IgnoreRules(patterns).ignored(path) is ignored


def test_prune_only_without_exceptions() -> None:
    assert IgnoreRules(["build"]).prune("build")
    assert not IgnoreRules(["build", "!build/keep"]).prune("build")


def test_offloadignore_comes_after_dockerignore(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("dist\n*.log\n")
    (tmp_path / ".offloadignore").write_text("!dist\ncache/\n")
    rules = IgnoreRules.load(tmp_path)
    assert not rules.ignored("dist/app.js")
    assert rules.ignored("x.log") and rules.ignored("cache/a")
    assert not rules.ignored(".dockerignore")


def test_temp_files_and_single_file_mode() -> None:
    assert IgnoreRules([]).ignored("a/.offload-tmp-1-2")
    only = IgnoreRules([], only="app.yml")
    assert not only.ignored("app.yml") and only.ignored("other.yml")
