"""JSON object keys as Go's encoding/json matches them to struct fields (dockerd's decoder).

Shared by the runner's policy (which reads bodies as dockerd will) and the agent (which edits
a body without adding a second spelling of a key dockerd would read as the same field).
"""

from __future__ import annotations


def _fold_char(ch: str) -> str:
    if ch.isascii():
        return ch.lower()
    # Go's EqualFold uses simple (one rune to one rune) folding: U+212A KELVIN SIGN is "k",
    # U+017F LONG S is "s".  Multi-character folds (ß -> ss) do not match in Go, so keep those.
    folded = ch.casefold()
    return folded if len(folded) == 1 else ch


def fold_key(key: str) -> str:
    """`key` folded: two keys Go decodes into the same field fold to the same string."""
    return "".join(_fold_char(ch) for ch in key)
