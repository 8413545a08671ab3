"""Each test gets a laptop directory, a mount area and a real SSH link to a sync endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .support import SyncLink, open_link


@pytest.fixture
def laptop(tmp_path: Path) -> Path:
    path = tmp_path / "laptop"
    path.mkdir()
    return path


@pytest.fixture
def mount_area(tmp_path: Path) -> Path:
    path = tmp_path / "area"
    path.mkdir()
    return path


@pytest.fixture
async def link(mount_area: Path) -> AsyncIterator[SyncLink]:
    link = await open_link(mount_area)
    try:
        yield link
    finally:
        await link.close()
