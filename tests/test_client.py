"""jmoshi-client as a user runs it: a WAV in, the model's audio and text out."""

from __future__ import annotations

import subprocess
import sys

import sphn

from jmoshi_server.client import chat_url


def run_client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jmoshi_server.client", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


def test_chat_url_from_http_and_ws_bases():
    assert chat_url("http://h:1") == "ws://h:1/api/chat"
    assert chat_url("https://h:1/", seed=3) == "wss://h:1/api/chat?seed=3"
    assert chat_url("ws://h:1/api/chat", text_topk=None) == "ws://h:1/api/chat"


def test_client_cli_writes_the_reply(server, speech_wav, tmp_path):
    out = tmp_path / "reply.wav"
    run = run_client(server.url, "--input", str(speech_wav), "--output", str(out), "--seed", "1")
    assert run.returncode == 0, run.stderr
    reply, rate = sphn.read(str(out))
    sent, _ = sphn.read(str(speech_wav), sample_rate=24000)
    assert rate == 24000
    assert reply.shape[-1] / sent.shape[-1] >= 0.8
    assert run.stdout.strip(), "the model's text is printed"
    assert "received" in run.stderr


def test_client_cli_reports_a_refusal(server, speech_wav):
    run = run_client(server.url, "--input", str(speech_wav), "--text-topk", "0", timeout=60)
    assert run.returncode == 1
    assert "bad_parameter" in run.stderr
