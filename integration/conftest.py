"""Fixtures that start real MLflow tracking servers.

Each server is ``mlflow server --backend-store-uri sqlite:///<tmp>/db --artifacts-destination
<tmp>/art --host 127.0.0.1 --port <free port>`` in its own process group, waited on by polling
``/health`` and killed (the whole group) at the end. Two servers start in parallel once per
session: ``mlflow_server`` stays up; ``doomed_server`` is for the tests that kill it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

START_TIMEOUT_S = float(os.environ.get("DFMPC_TEST_MLFLOW_START_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    root: Path
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return requests.get(self.uri + "/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy(1.0):
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server's process group (server, uvicorn worker); idempotent."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        # wait until nothing answers on the port any more
        deadline = time.monotonic() + 15
        while self.healthy(0.5) and time.monotonic() < deadline:
            time.sleep(0.2)


def launch_server(root: Path) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no background job consumers
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'db'}",
        "--artifacts-destination", str(root / "art"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    log_path = root / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return MlflowServer(root, port, proc, log_path)


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, MlflowServer]]:
    base = tmp_path_factory.mktemp("mlflow-servers")
    live = launch_server(base / "live")
    doomed = launch_server(base / "doomed")
    try:
        live.wait_ready()
        doomed.wait_ready()
        yield live, doomed
    finally:
        live.kill()
        doomed.kill()


@pytest.fixture(scope="session")
def mlflow_server(_servers: tuple[MlflowServer, MlflowServer]) -> MlflowServer:
    """A live tracking server for the whole session."""
    server = _servers[0]
    assert server.healthy(), server.log_tail()
    return server


@pytest.fixture(scope="session")
def doomed_server(_servers: tuple[MlflowServer, MlflowServer]) -> MlflowServer:
    """A tracking server that fault tests kill (``server.kill()``)."""
    return _servers[1]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
