"""How `offload server` runs uvicorn, from the settings an operator gives in the environment."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from offload.agent.activity import KEEPALIVE_REPORT_S
from offload.core.config import ServerSettings
from offload.core.schemas import CLIENT_KEEPALIVE_S
from offload.server.main import uvicorn_options


def test_the_server_keeps_an_idle_connection_longer_than_our_clients_do():
    """The side that reuses a connection must be the one that drops it: a server closing first
    races the client's next request on that connection.  And the agent's 5 s reports must find
    theirs open (uvicorn's and httpx's defaults were both 5 s)."""
    client = CLIENT_KEEPALIVE_S
    assert client > 2 * KEEPALIVE_REPORT_S  # the agent's cadence while Docker streams are open
    assert uvicorn_options(ServerSettings())["timeout_keep_alive"] > client


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
