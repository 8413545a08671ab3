"""How `offload server` runs uvicorn, from the settings an operator gives in the environment."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from offload.core.config import ServerSettings
from offload.server.main import uvicorn_options


def test_the_access_log_is_on_unless_the_operator_turns_it_off(monkeypatch):
    assert uvicorn_options(ServerSettings())["access_log"] is True
    monkeypatch.setenv("OFFLOAD_ACCESS_LOG", "false")
    assert uvicorn_options(ServerSettings())["access_log"] is False


def test_a_value_that_is_not_a_boolean_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("OFFLOAD_ACCESS_LOG", "sometimes")
    with pytest.raises(pydantic.ValidationError) as refused:
        ServerSettings()
    assert "access_log" in str(refused.value)


# The check runs in a child interpreter: freezing is for good, and the test process's own heap
# must stay collectable.
_SERVE_AND_CHECK = """
import gc, sys, weakref
import uvicorn
from offload.core.config import ServerSettings
from offload.server import main

seen = {}

def run(self, sockets=None):  # what uvicorn would serve, at the moment it would start
    seen["frozen"] = gc.get_freeze_count()
    seen["tracked"] = len(gc.get_objects())

uvicorn.Server.run = run
main.serve(ServerSettings(data_dir=sys.argv[1]))

class Node:
    pass

made_later = Node()
made_later.self = made_later  # a cycle: only the collector frees it
gone = weakref.ref(made_later)
del made_later
gc.collect()
print(seen["frozen"], seen["tracked"], gone() is None)
"""


def test_serve_leaves_start_up_objects_out_of_later_collections(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", _SERVE_AND_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    frozen, tracked, collected = child.stdout.split()
    assert int(frozen) > 50_000  # the app, its models and mappers: tens of thousands
    assert int(tracked) < int(frozen) // 10  # what a full collection still walks
    assert collected == "True"  # garbage made while serving is still freed
