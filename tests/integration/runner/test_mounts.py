"""mountinfo parsing: escaped names and deepest-first order (what unmounting relies on)."""

from __future__ import annotations

from pathlib import Path

from offload.runner.mounts import mounts_under

MOUNTINFO = """\
22 1 8:1 / / rw - ext4 /dev/vda rw
30 22 0:40 / /srv/env-1/data rw - ext4 /dev/vda rw
31 30 0:41 / /srv/env-1/data/overlay2/abc/merged rw - overlay overlay rw
32 22 0:4 net:[4026532] /run/e/env-1/exec/netns/x rw - nsfs nsfs rw
33 22 0:42 / /srv/env-1/with\\040space rw - tmpfs tmpfs rw
34 22 0:43 / /srv/env-10/data rw - ext4 /dev/vda rw
"""


def test_mounts_under_lists_only_the_environment_deepest_first() -> None:
    found = mounts_under([Path("/srv/env-1"), Path("/run/e/env-1")], MOUNTINFO)
    assert found == [
        "/srv/env-1/data/overlay2/abc/merged",
        "/run/e/env-1/exec/netns/x",
        "/srv/env-1/with space",
        "/srv/env-1/data",
    ]
