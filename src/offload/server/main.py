"""`offload server`: migrate the database, then serve the API with uvicorn."""

from __future__ import annotations

import uvicorn

from offload.core.config import ServerSettings
from offload.server.app import create_app


def serve(settings: ServerSettings) -> None:
    """Run the control plane in the foreground until interrupted.

    `create_app` applies pending migrations before the first request is accepted.  Access logs
    show method, path and status only: tokens travel in headers, never in URLs.
    """
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=True,
        # Behind a load balancer or TLS proxy: believe its X-Forwarded-For (abuse limits and the
        # audit log see the real client) and X-Forwarded-Proto (cookies get Secure).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        # Runners' long polls are parked for up to 15 s; they retry, so shutdown need not wait.
        timeout_graceful_shutdown=2,
    )
