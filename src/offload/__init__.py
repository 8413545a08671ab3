"""Offload: run containers and builds on remote, ephemeral, isolated Docker Engines."""

__version__ = "0.1.0"
