"""Fuzzing of the control plane's REST API against its own OpenAPI document (schemathesis)."""
