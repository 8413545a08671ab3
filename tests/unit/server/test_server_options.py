"""How `offload server` runs uvicorn, from the settings an operator gives in the environment."""

from __future__ import annotations

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
