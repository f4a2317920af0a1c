"""Issue 7's fault paths on a real GPU, with the demo model: a short one-shot check.

Not part of CI (CI has no GPU). On CUDA the recovery after a failed session re-enters
moshi's streaming state and re-captures its CUDA graphs, which the CPU tests cannot show.
It runs, against real server processes on --device cuda:

* JMOSHI_FAULT_INJECT=error@40,oom@120: a session ends with internal_error at step 40, the
  self-test passes, /readyz stays 200; the next session gets the (injected) OOM; the third
  works, is recorded, and its WAV is valid with the model's first slot silent;
* SIGTERM during a recorded session: shutting_down, close 1001, exit 0 and its time, and a
  finalised WAV + transcript;
* dead@20: /readyz turns 503 with the reason.

Results go to $OUT/result.json (default /tmp/gpu_faults), the server logs beside it. On a
device machine with PyTorch but without moshi/sphn, carry their wheels (see the device
notes) and run, from the repository root:

    PYTHONPATH=/tmp/site:$PWD OUT=$OUT python3 bench/gpu_faults.py
"""

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import aiohttp
import numpy as np

OUT = Path(os.environ.get("OUT", "/tmp/gpu_faults"))
DEMO_DIR = Path(os.environ.get("DEMO_DIR", tempfile.mkdtemp(prefix="jmoshi-demo-")))
R: dict = {}
REC = tempfile.mkdtemp(prefix="jmoshi-rec-")
PROCS: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def start(name, port, env_extra, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    log = open(OUT / f"{name}.log", "w")  # noqa: SIM115 - the server writes it until it exits
    cmd = [
        sys.executable,
        "-m",
        "jmoshi_server",
        "--demo",
        "--demo-dir",
        str(DEMO_DIR),
        "--device",
        os.environ.get("DEVICE", "cuda"),
        "--port",
        str(port),
        "--input-budget-ms",
        "1500",
        *args,
    ]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    PROCS.append(p)
    t0 = time.time()
    while time.time() - t0 < 240:
        if p.poll() is not None:
            raise SystemExit(f"{name} exited {p.returncode}")
        if get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
            R[f"{name}_ready_s"] = round(time.time() - t0, 1)
            return p
        time.sleep(0.5)
    raise SystemExit(f"{name} not ready")


def wait_free(port, timeout=60):
    """Until the model is free (after a failure it first runs its self-test)."""
    t0 = time.time()
    while json.loads(get(f"http://127.0.0.1:{port}/api/status")[1])["busy"]:
        if time.time() - t0 > timeout:
            raise SystemExit("the model stayed busy")
        time.sleep(0.1)


def tone(sec):
    t = np.arange(int(24000 * sec))
    return (0.2 * np.sin(t * 2 * np.pi * 220 / 24000)).astype(np.float32)


async def chat(port, seconds, record=True, sigterm_after=None, proc=None):
    from jmoshi_server.client import ogg_pages

    q = "?record=1" if record else ""
    out = {"errors": [], "audio": 0}
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/api/chat{q}") as ws:
        assert (await ws.receive(timeout=30)).data == b"\x00"
        out["meta"] = json.loads((await ws.receive(timeout=30)).data[1:])

        async def read():
            async for m in ws:
                if m.type == aiohttp.WSMsgType.BINARY and m.data[:1] == b"\x05":
                    out["errors"].append(json.loads(m.data[1:]))
                elif m.type == aiohttp.WSMsgType.BINARY and m.data[:1] == b"\x01":
                    out["audio"] += 1

        reader = asyncio.create_task(read())
        t0 = time.time()
        sent_term = None
        for i, page in enumerate(p for p in ogg_pages(tone(seconds)) if p):
            if reader.done():
                break
            await ws.send_bytes(b"\x01" + page)
            if sigterm_after and sent_term is None and time.time() - t0 > sigterm_after:
                proc.send_signal(signal.SIGTERM)
                sent_term = time.time()
            await asyncio.sleep(max(0, t0 + (i + 1) * 0.08 - time.time()))
        if not reader.done() and sent_term is None:
            await asyncio.sleep(0.8)
            await ws.close()
        await asyncio.wait_for(reader, 30)
        out["close"] = ws.close_code
        out["sigterm_at"] = sent_term
    return out


def wav_ok(directory, url):
    stem = hashlib.sha256(url.rsplit("/", 1)[1].encode()).hexdigest()
    raw = (Path(directory) / f"{stem}.wav").read_bytes()
    lines = [json.loads(x) for x in (Path(directory) / f"{stem}.jsonl").read_text().splitlines()]
    with wave.open(str(Path(directory) / f"{stem}.wav")) as w:
        n, ch = w.getnframes(), w.getnchannels()
    return {
        "header_ok": int.from_bytes(raw[40:44], "little") == len(raw) - 44,
        "frames": n // 1920,
        "channels": ch,
        "end": lines[-1],
    }


async def main():
    P1, P2 = free_port(), free_port()
    p1 = start("s1", P1, {"JMOSHI_FAULT_INJECT": "error@40,oom@120"}, "--recordings-dir", REC)
    a = await chat(P1, 60)  # streams until the server ends it (the fault), at most 60 s
    R["A_error"] = (a["errors"], a["close"])
    R["A_readyz"] = get(f"http://127.0.0.1:{P1}/readyz")[0]
    wait_free(P1)
    b = await chat(P1, 60)
    R["B_oom"] = (b["errors"], b["close"])
    wait_free(P1)
    c = await chat(P1, 3)
    R["C_ok"] = {"errors": c["errors"], "audio_msgs": c["audio"], "close": c["close"]}
    await asyncio.sleep(0.5)
    R["C_fetch"] = get(f"http://127.0.0.1:{P1}" + c["meta"]["recording_url"])[0]
    R["C_wav"] = wav_ok(REC, c["meta"]["recording_url"])
    R["status"] = json.loads(get(f"http://127.0.0.1:{P1}/api/status")[1])
    wait_free(P1)
    d = await chat(P1, 10, sigterm_after=2.0, proc=p1)
    code = p1.wait(30)
    R["D_sigterm"] = {
        "exit": code,
        "exit_s": round(time.time() - d["sigterm_at"], 2),
        "errors": d["errors"],
        "close": d["close"],
    }
    R["D_wav"] = wav_ok(REC, d["meta"]["recording_url"])
    p2 = start("s2", P2, {"JMOSHI_FAULT_INJECT": "dead@20"})
    e = await chat(P2, 60, record=False)
    R["E_dead"] = (e["errors"], e["close"])
    await asyncio.sleep(1)
    R["E_readyz"] = get(f"http://127.0.0.1:{P2}/readyz")
    p2.send_signal(signal.SIGTERM)
    R["E_exit"] = p2.wait(30)


OUT.mkdir(parents=True, exist_ok=True)
try:
    asyncio.run(main())
finally:
    for proc in PROCS:
        if proc.poll() is None:
            proc.kill()
    (OUT / "result.json").write_text(json.dumps(R, indent=1, default=str))
    print(json.dumps(R, indent=1, default=str)[:6000])
