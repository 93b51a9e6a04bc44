"""Fixtures for the Cerebrium target: a fake `cerebrium` CLI on PATH and a local stand-in for
Cerebrium's gateway (Bearer check + /v4/<project>/<app> prefix) in front of a real server."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import free_port, stop_process_group

HERE = Path(__file__).resolve().parent
PROJECT = "p-test1234"
GATEWAY_JWT = "gateway.jwt.for-tests"
APP_KEY = "app-key-for-tests"


def make_jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


SERVICE_TOKEN = make_jwt({"project_id": PROJECT, "exp": 4102444800})  # 2100-01-01


class _GatewayHandler(BaseHTTPRequestHandler):
    """Checks `Authorization: Bearer <JWT>` like Cerebrium's edge, strips /v4/<project>/<app>,
    forwards everything else (headers included) to the app's port."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        gateway: Gateway = self.server.gateway  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        gateway.requests.append((self.command, self.path, dict(self.headers)))
        prefix = f"/v4/{PROJECT}/{gateway.app_name}"
        if not (self.path == prefix or self.path.startswith(prefix + "/") or self.path.startswith(prefix + "?")):
            return self._reply(404, {"message": f"app not found: {self.path}"})
        if self.headers.get("Authorization") != f"Bearer {gateway.token}":
            return self._reply(401, {"message": "Unauthorized: invalid or missing JWT"})
        path = self.path[len(prefix):] or "/"
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        try:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.backend_port, timeout=60)
            connection.request(self.command, path, body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except OSError as error:  # replica not up yet: what a platform answers while scaling
            return self._reply(503, {"message": f"no replica available: {error}"})
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        connection.close()

    def _reply(self, status: int, data: dict) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


@dataclass
class Gateway:
    app_name: str
    token: str
    backend_port: int
    server: ThreadingHTTPServer | None = None
    requests: list = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def endpoint(self) -> str:
        return f"{self.url}/v4/{PROJECT}/{self.app_name}"


@dataclass
class FakeCli:
    bin_dir: Path
    config_path: Path
    record_path: Path
    app_log: Path
    gateway: Gateway

    def configure(self, mode: str, **extra) -> None:
        config = json.loads(self.config_path.read_text())
        config.update(mode=mode, **extra)
        self.config_path.write_text(json.dumps(config))

    def record(self) -> dict:
        return json.loads(self.record_path.read_text())

    def app_pids(self) -> list[int]:
        return self.record().get("app_pids", []) if self.record_path.is_file() else []


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """`cerebrium` on PATH (fake), a gateway on a free port, and the environment a user sets:
    service-account token, gateway JWT, app key. HOME is a fresh directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "cerebrium"
    script.write_text(f"#!{sys.executable}\n" + (HERE / "fake_cerebrium.py").read_text())
    script.chmod(0o755)
    shutil.copy(HERE.parent / "support.py", bin_dir / "support.py")  # the fake stops apps with it

    gateway = Gateway(app_name="onnxship-classifier", token=GATEWAY_JWT, backend_port=free_port())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GatewayHandler)
    server.gateway = gateway  # type: ignore[attr-defined]
    gateway.server = server
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-gateway",
                              daemon=True)
    thread.start()

    cli = FakeCli(bin_dir, bin_dir / "fake_cerebrium.json", tmp_path / "cli-record.json", tmp_path / "app.log", gateway)
    cli.config_path.write_text(json.dumps({
        "mode": "live",
        "record": str(cli.record_path),
        "app_log": str(cli.app_log),
        "project": PROJECT,
        "gateway_url": gateway.url,
        "app_env": {
            "API_KEY": APP_KEY,  # the secret set in the Cerebrium dashboard
            "ONNXSHIP_DEVICE": "cpu",  # no GPU here: the same image, run on CPU
            "ONNXSHIP_HOST": "127.0.0.1",
            "ONNXSHIP_PORT": str(gateway.backend_port),
            "ONNXSHIP_INTRA_OP_THREADS": "1",
        },
    }))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CEREBRIUM_SERVICE_ACCOUNT_TOKEN", SERVICE_TOKEN)
    monkeypatch.setenv("CEREBRIUM_API_KEY", GATEWAY_JWT)
    monkeypatch.setenv("API_KEY", APP_KEY)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config-that-must-not-leak"))
    monkeypatch.delenv("CEREBRIUM_CLI", raising=False)
    try:
        yield cli
    finally:
        for pid in cli.app_pids():
            stop_process_group(pid)
        server.shutdown()
        server.server_close()


@pytest.fixture
def bundle_settings(tmp_path):
    from flows.params import CerebriumSettings

    return CerebriumSettings(bundle_dir=tmp_path / "bundles", ready_timeout_s=90, deploy_timeout_s=60)
