"""Shared fixtures: the demo checkpoint, real servers on real ports, Japanese test speech."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from jmoshi_server.client import read_audio
from jmoshi_server.demo import build_demo_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Kana only: espeak-ng's Japanese voice reads kana, not kanji.
SPEECH_TEXT = "こんにちは。きょうは いい てんきですね。わたしは にほんごを はなします。おげんきですか。"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, log: IO | None = None, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; close its log; return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()
    return proc.returncode


class ServerProcess:
    """``python -m jmoshi_server --demo`` on a free port, as a user would run it.

    ``scheme="https"`` for a server that serves TLS (readiness is polled without checking the
    certificate). Its data dir (the generated certificate) is a temporary one unless the
    arguments or ``env`` name another. ``demo_dir=None`` serves whatever the arguments name.
    """

    def __init__(
        self, demo_dir: Path | None, log_path: Path, *args: str, env: dict | None = None, scheme: str = "http"
    ) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = log_path
        model = ["--demo", "--demo-dir", str(demo_dir)] if demo_dir else []
        cmd = [sys.executable, "-m", "jmoshi_server", *model, "--port", str(self.port), *args]
        data_dir = str(log_path.with_suffix(".data"))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "JMOSHI_DATA_DIR": data_dir, **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2, context=unchecked) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        return stop_process(self.proc, self._log)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


@pytest.fixture(scope="session")
def start_server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: ``start_server("--flag", ...)`` returns a ready ServerProcess, stopped at the end."""
    started: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(
        *args: str, env: dict | None = None, wait: bool = True, demo: bool = True, scheme: str = "http"
    ) -> ServerProcess:
        log = logs / f"server-{len(started)}.log"
        server = ServerProcess(demo_dir if demo else None, log, *args, env=env, scheme=scheme)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:  # signal all first: they shut down in parallel
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """One shared demo server; tests that need other flags start their own.

    Its input budget is generous so a busy CI machine delays audio rather than dropping it;
    the drop policy itself is tested with bursts far beyond any budget.
    """
    return start_server("--input-budget-ms", "1500")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: run `bash scripts/setup-system.sh` (installs espeak-ng, sox, ...)")
    return path


def make_speech_wav(out: Path, espeak: str = "espeak-ng", sox: str = "sox") -> Path:
    """SPEECH_TEXT spoken by espeak-ng, as 24 kHz mono 16-bit WAV in ``out`` (tests, benches)."""
    raw = out / "espeak.wav"
    subprocess.run([espeak, "-v", "ja", "-s", "140", "-w", str(raw), SPEECH_TEXT], check=True)
    wav = out / "speech24k.wav"
    subprocess.run([sox, str(raw), "-r", "24000", "-c", "1", "-b", "16", str(wav)], check=True)
    return wav


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 6 s of Japanese speech from espeak-ng at 24 kHz mono 16-bit."""
    return make_speech_wav(tmp_path_factory.mktemp("speech"), _need("espeak-ng"), _need("sox"))


@pytest.fixture(scope="session")
def speech_pcm(speech_wav: Path) -> np.ndarray:
    pcm = read_audio(str(speech_wav))
    assert len(pcm) / 24000 >= 5.0, "test speech must last at least 5 s"
    return pcm
