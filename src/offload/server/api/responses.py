"""Answers serialised once, for the hottest routes.

A route that returns its schema's model has FastAPI validate it against the schema again and
then serialise it.  The routes that runners and agents call every few seconds (activity reports,
certificate renewals, heartbeats) return the model serialised once instead, and declare it with
`response_model`, so the OpenAPI schema is the same.
"""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel


def model_response(model: BaseModel) -> Response:
    """`model` as its JSON, as FastAPI answers it (no aliases in core.schemas)."""
    return Response(model.model_dump_json(), media_type="application/json")
