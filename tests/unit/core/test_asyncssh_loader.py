"""`import_asyncssh`: asyncssh imported in a fresh interpreter without its liboqs search (each
`find_library` look runs ldconfig, gcc and ld), every other lookup untouched and
`ctypes.util.find_library` itself as it was afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent(
    """
    import ctypes.util, json, sys
    asked = []
    real = ctypes.util.find_library
    def recording(name):
        asked.append(name)
        return real(name)
    ctypes.util.find_library = recording
    from offload.core.asyncssh_loader import import_asyncssh
    import_asyncssh()
    import asyncssh.crypto.pq as pq
    print(json.dumps({
        "imported": "asyncssh" in sys.modules,
        "asked": asked,
        "oqs_lib": pq._oqs_lib,
        "restored": ctypes.util.find_library is recording,
        "c_found": ctypes.util.find_library("c") is not None,
    }))
    """
)


def test_asyncssh_is_imported_without_searching_for_liboqs() -> None:
    result = subprocess.run(
        [sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(result.stdout)
    assert seen["imported"] is True
    assert not {"oqs", "liboqs"} & set(seen["asked"])
    assert seen["oqs_lib"] is None
    assert seen["restored"] is True
    assert seen["c_found"] is True  # after the import, lookups search again
