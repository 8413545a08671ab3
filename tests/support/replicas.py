"""Several control-plane replicas on one PostgreSQL, behind Debian's nginx: real processes.

`ReplicaFleet` starts `offload server` N times (one data directory: they share the CA key, as
replicas must), each on its own port, and an nginx load balancer in front of them that retries
a request on the next replica when one cannot be reached (`proxy_next_upstream error timeout
non_idempotent`: every endpoint of the API is safe to repeat: a start rejoins the user's one
session, reports and heartbeats are idempotent).  Tests SIGKILL replicas and the database and
look at what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from offload.core.waiting import wait_until

NGINX = "/usr/sbin/nginx"
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  upstream offload {{
{servers}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://offload;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_next_upstream error timeout non_idempotent;
      proxy_connect_timeout 2s;
      proxy_read_timeout 90s;  # runners' long polls are held up to 60 s
      proxy_buffering off;
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, whatever it was doing."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@dataclass
class ReplicaFleet:
    root: Path
    database_url: str
    count: int = 3
    env: dict[str, str] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    lb_port: int = 0
    _nginx: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The load balancer: what agents, CLIs and runners use."""
        return f"http://127.0.0.1:{self.lb_port}"

    def server_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        return {
            **base,
            "OFFLOAD_DATA_DIR": str(self.root / "server"),
            "OFFLOAD_DATABASE_URL": self.database_url,
            "OFFLOAD_FORWARDED_ALLOW_IPS": "127.0.0.1",
            **self.env,
        }

    def start(self) -> ReplicaFleet:
        self.root.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            replica = Replica(free_port(), self.root / f"replica-{index}.log")
            self.replicas.append(replica)
            self.start_replica(replica)  # one at a time: the first migrates the database
        self._start_nginx()
        return self

    def revive(self) -> None:
        """Start again every replica a test killed."""
        for replica in self.replicas:
            if not replica.alive():
                self.start_replica(replica)

    def start_replica(self, replica: Replica) -> None:
        argv = [str(VENV_BIN / "offload"), "server", "--host", "127.0.0.1"]
        with open(replica.log, "ab") as log:
            replica.process = subprocess.Popen(
                [*argv, "--port", str(replica.port)],
                env=self.server_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self._healthy(replica), 60, f"replica on port {replica.port}")

    def _healthy(self, replica: Replica) -> bool:
        if not replica.alive():
            raise RuntimeError(f"replica exited: {replica.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{replica.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def _start_nginx(self) -> None:
        self.lb_port = free_port()
        servers = "\n".join(
            f"    server 127.0.0.1:{r.port} max_fails=1 fail_timeout=30s;" for r in self.replicas
        )
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, servers=servers, port=self.lb_port))
        log = open(self.root / "nginx.out", "ab")  # noqa: SIM115 (kept for the process's life)
        self._nginx = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(self.root)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_until(self._lb_up, 30, "nginx in front of the replicas")

    def _lb_up(self) -> bool:
        if self._nginx is not None and self._nginx.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.root / 'nginx-error.log').read_text()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.alive():
                assert replica.process is not None
                replica.process.terminate()
                try:
                    replica.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    replica.kill()
        if self._nginx is not None and self._nginx.poll() is None:
            self._nginx.terminate()
            self._nginx.wait(timeout=10)
