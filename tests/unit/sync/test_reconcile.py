"""Who wins at (re)connection: the laptop, unless only the runner changed a path since base."""

from __future__ import annotations

from offload.sync.laptop import reconcile
from offload.sync.protocol import Entry

A = Entry("f", 1, 100, 0o644)
A2 = Entry("f", 2, 200, 0o644)
A3 = Entry("f", 3, 300, 0o644)
SAME_SIZE = Entry("f", 1, 999, 0o644)
D = Entry("d", mode=0o755)


def kinds(plan):  # type: ignore[no-untyped-def]
    return [(op.kind, op.rel, op.expect) for op in plan.ops]


def test_first_sync_pushes_everything_parents_first() -> None:
    plan = reconcile({"d": D, "d/f": A, "a": A}, {}, {}, read_only=False)
    assert kinds(plan) == [("file", "a", None), ("mkdir", "d", None), ("file", "d/f", None)]


def test_equal_entries_are_agreed() -> None:
    plan = reconcile({"a": A, "d": D}, {"a": A, "d": D}, {}, read_only=False)
    assert plan.agreed == {"a": A, "d": D} and plan.ops == []


def test_without_base_the_runner_version_is_kept_aside() -> None:
    plan = reconcile({"a": A2}, {"a": A3}, {}, read_only=False)
    assert kinds(plan) == [("file", "a", None)]  # expect=None: the runner keeps its version aside
    assert reconcile({"a": A}, {"a": SAME_SIZE}, {}, read_only=False).hash_check == {"a": SAME_SIZE}


def test_with_base_one_sided_changes_go_their_way() -> None:
    assert kinds(reconcile({"a": A2}, {"a": A}, {"a": A}, read_only=False)) == [("file", "a", A)]
    assert reconcile({"a": A}, {"a": A2}, {"a": A}, read_only=False).pull == {"a": A}
    both = reconcile({"a": A2}, {"a": A3}, {"a": A}, read_only=False)
    assert kinds(both) == [("file", "a", None)]  # both changed: the laptop wins


def test_deletions_while_disconnected() -> None:
    gone_remote = reconcile({"a": A}, {}, {"a": A}, read_only=False)
    assert gone_remote.delete_local == {"a": A} and gone_remote.ops == []
    gone_local = reconcile({}, {"d": D, "d/a": A}, {"d": D, "d/a": A}, read_only=False)
    assert kinds(gone_local) == [("delete", "d/a", A), ("delete", "d", D)]
    new_remote = reconcile({}, {"n": A}, {}, read_only=False)
    assert new_remote.pull == {"n": None}


def test_read_only_makes_the_runner_a_mirror() -> None:
    plan = reconcile({"a": A2}, {"a": A, "x": A}, {}, read_only=True)
    assert kinds(plan) == [("delete", "x", A), ("file", "a", A)]
    assert plan.pull == {}
