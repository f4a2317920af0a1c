"""The page in a real browser against a real demo server (issue 4).

Debian's chromium runs headless under Playwright with a fake microphone that plays espeak-ng
Japanese speech. One browser serves the whole module (the dev box has 2 cores); each test
opens its own context. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from page_browser import DESKTOP, INSECURE_HOST, PHONE, WAKE_LOCK_SPY, PageUnderTest, get_json, launch

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "static"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - a broken dev environment, not a skip
    sync_playwright = None


@pytest.fixture(scope="module")
def mic_wav(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test speech at 48 kHz: chromium's fake capture device plays it in a loop."""
    out = tmp_path_factory.mktemp("mic") / "speech48k.wav"
    subprocess.run(["sox", str(speech_wav), "-r", "48000", "-c", "1", "-b", "16", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def browser(mic_wav: Path):
    if sync_playwright is None:
        pytest.fail("playwright is missing: run `scripts/venv.sh dev` (and `bash scripts/setup-system.sh`)")
    with sync_playwright() as playwright:
        browser = launch(playwright, mic_wav)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    pages: list[PageUnderTest] = []

    def open_(url: str, **kwargs) -> PageUnderTest:
        page = PageUnderTest(browser, url, **kwargs)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


def status(server) -> dict:
    return get_json(server.url + "/api/status")


# ---- no browser needed -------------------------------------------------------------------


def test_page_and_vendor_files_are_served(server):
    with urllib.request.urlopen(server.url + "/") as response:
        html = response.read().decode()
    for needle in ('id="start"', 'id="stop"', 'id="transcript"', 'lang="ja"'):
        assert needle in html
    # Nothing the page loads may come from another origin: it must work on a LAN without internet.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    with urllib.request.urlopen(server.url + "/vendor/opus-recorder/decoderWorker.min.wasm") as response:
        assert response.headers["Content-Type"] == "application/wasm"
        assert response.read(4) == b"\0asm"
    licence = (STATIC / "vendor/opus-recorder/LICENSE.md").read_text()
    assert "MIT" in licence and "Xiph.Org" in licence
    assert "opus-recorder 8.0.5" in (STATIC / "vendor/opus-recorder/VERSION").read_text()


# ---- a conversation ----------------------------------------------------------------------


def start_with_settings(alice: PageUnderTest, server) -> None:
    """Type settings into the form, press Start: they must reach the server as query parameters."""
    alice.page.click("#settings summary")
    alice.page.fill("#set-seed", "4242")
    alice.page.fill("#set-text_temperature", "0.55")
    alice.page.click("#start")
    alice.wait_state("talking")
    assert alice.js("window.__wakeLock.requested") == 1, "the screen must stay on while talking"
    assert alice.js("jmoshi.audioState") == "running", "the AudioContext is resumed by the tap"
    sampling = alice.wait_for(lambda: alice.js("jmoshi.metadata && jmoshi.metadata.sampling"), "metadata")
    assert sampling["seed"] == 4242
    assert sampling["text_temperature"] == pytest.approx(0.55)
    assert sampling["text_topk"] == 25, "fields left empty must use the server's default"
    assert "seed 4242" in server.log_text()
    assert alice.js("jmoshi.metadata.recording") is False, "no recording unless the box is checked"
    assert not alice.page.is_visible("#recording")
    assert '"seed":"4242"' in alice.js("localStorage.getItem('jmoshi.settings.v1')")


def assert_audio_and_text_flow(person: PageUnderTest, server, frames_before: int) -> None:
    """The server hears the microphone; the page plays the model's audio and shows its words."""
    person.wait_for(
        lambda: status(server)["frames_processed"] >= frames_before + 12,
        "the server to process ~1 s of audio",
    )
    half_second = person.js("jmoshi.sampleRate") // 2
    person.wait_for(lambda: person.js("jmoshi.renderedSamples") > half_second, "0.5 s of audio played")
    person.wait_for(lambda: person.page.inner_text("#transcript").strip(), "transcript text")
    person.wait_for(lambda: person.js("jmoshi.levels.mic") > 0.1, "the microphone meter to move")
    person.wait_for(lambda: person.js("jmoshi.levels.model") > 0.1, "the model meter to move")
    counters = person.js("jmoshi.counters")
    assert counters["pagesSent"] > 10 and counters["audioMessages"] > 5 and counters["textMessages"] > 0


def assert_stats_then_english(alice: PageUnderTest) -> None:
    alice.page.click("#stats-toggle")
    alice.wait_for(lambda: "ms" in alice.page.inner_text("#stat-step"), "server step time")
    alice.wait_for(lambda: "ms" in alice.page.inner_text("#stat-latency"), "latency estimate")
    latency = alice.js("jmoshi.latencyMs")
    assert 0 < latency < 5000, latency
    assert "話せます" in alice.status_text()
    alice.screenshot("page-talking-ja.png")

    alice.page.click("#lang-en")
    assert alice.js("document.documentElement.lang") == "en"
    assert "Go ahead and talk" in alice.status_text()
    assert alice.page.inner_text("#stop") == "Stop"
    alice.screenshot("page-talking-en.png")


def assert_same_origin_only(person: PageUnderTest, server) -> None:
    assert not person.errors, person.errors
    origins = {m.group(0) for url in person.requests if (m := re.match(r"^\w+://[^/]+", url))}
    assert origins == {server.url}, f"requests left the origin: {origins}"


def test_talk_busy_retry_and_settings(server, open_page):
    """Start talks for real; a second person is told the server is busy and gets in after Stop."""
    frames_before = status(server)["frames_processed"]
    alice = open_page(server.url + "/", init_script=WAKE_LOCK_SPY, **DESKTOP)
    alice.wait_state("ready")
    assert alice.page.is_visible("#headphones"), "headphones advice must show before the first start"
    start_with_settings(alice, server)
    assert_audio_and_text_flow(alice, server, frames_before)
    assert_stats_then_english(alice)

    # A second person on a phone: told it is busy, with a retry and a countdown, never a hang.
    bob = open_page(server.url + "/", **PHONE)
    bob.wait_state("ready")
    bob.page.tap("#start")
    bob.wait_state("busy")
    text = bob.status_text()
    assert "ほかの人が J-Moshi と話しています" in text and "秒後に自動でもう一度試します" in text
    assert bob.page.is_visible("#retry") and bob.page.is_enabled("#stop")
    assert bob.js("jmoshi.errors")[-1]["code"] == "busy"
    bob.screenshot("page-phone-busy-ja.png")
    bob.page.focus("#retry")
    before = bob.status_text()
    bob.wait_for(lambda: bob.status_text() != before, "the countdown to tick")
    assert bob.js("document.activeElement.id") == "retry", "a countdown tick must not steal focus"

    alice.page.click("#stop")
    alice.wait_state("stopped")
    assert alice.js("window.__wakeLock.released") == 1
    alice.wait_for(lambda: not status(server)["busy"], "the server to free the model", timeout=10)

    frames_before = status(server)["frames_processed"]
    if bob.state == "busy":  # else its own 10 s countdown already retried
        bob.page.tap("#retry")
    bob.wait_state("talking")
    assert_audio_and_text_flow(bob, server, frames_before)
    bob.screenshot("page-phone-talking-ja.png")
    bob.page.tap("#stop")
    bob.wait_state("stopped")
    for person in (alice, bob):
        assert_same_origin_only(person, server)


def test_connection_lost_reconnect_then_session_limit(start_server, open_page):
    """A server that goes away mid-talk is reconnected to; a session that reaches its limit says so."""
    own = start_server()
    page = open_page(own.url + "/", **DESKTOP)
    page.wait_state("ready")
    page.page.click("#start")
    page.wait_state("talking")
    page.wait_for(lambda: page.js("jmoshi.counters.audioMessages") > 0, "audio")

    own.stop()
    page.wait_state("reconnecting", timeout=15)
    assert "接続が切れました" in page.status_text()
    assert page.page.is_visible("#reconnect")

    # Back on the same port (the last --port wins; ServerProcess would poll its own port, so the
    # page's reconnect is what waits), this time with a 3 s session limit.
    start_server("--port", str(own.port), "--max-session-seconds", "3", wait=False)
    page.wait_state("talking", timeout=60)
    page.wait_for(lambda: "再接続しました" in page.page.inner_text("#transcript"), "the reconnect note")
    # A fresh Ogg stream reached the new server and its answer plays.
    audio_before = page.js("jmoshi.counters.audioMessages")
    page.wait_for(lambda: status(own)["frames_processed"] > 0, "the restarted server to hear the microphone")
    page.wait_for(lambda: page.js("jmoshi.counters.audioMessages") > audio_before, "audio after reconnecting")

    page.wait_state("sessionLimit", timeout=15)
    text = page.status_text()
    assert "会話の時間の上限に達しました" in text and "3 秒" in text, text
    assert page.page.is_enabled("#start") and page.page.is_disabled("#stop")


# ---- recording and the stats message --------------------------------------------------------

# The stats panel's step time as the page must render it from the last 0x08 message (p95 is only
# in that message, not in /api/status), and its server-side drop count.
STEP_FROM_STATS = """(() => {
  const s = jmoshi.stats && jmoshi.stats.step_ms;
  if (!s) return false;
  const r = Math.round;
  const want = `${r(s.p50.total)} ms（p95 ${r(s.p95.total)} ms・LM ${r(s.p50.lm)} ms）`;
  return document.getElementById('stat-step').textContent === want;
})()"""
DROPS_FROM_STATS = """(() => jmoshi.stats && document.getElementById('stat-server-dropped')
  .textContent.endsWith(`（${jmoshi.stats.dropped_frames} フレーム）`))()"""


def test_recording_opt_in_download_and_stats_message(start_server, open_page, tmp_path):
    """Record box checked: the server records, the page says so, and the files download after Stop.

    The same conversation checks that the stats panel takes its server figures from the 0x08
    stats message (and stops polling /api/status), with no slow-GPU warning on a fast server.
    """
    own = start_server("--recordings-dir", str(tmp_path / "rec"), "--input-budget-ms", "1500")
    page = open_page(own.url + "/", **DESKTOP)
    page.wait_state("ready")
    assert not page.page.is_checked("#record"), "recording is off unless the person asks"
    assert "ダウンロード" in page.page.inner_text("#record-note")
    page.page.check("#record")
    page.page.reload()
    page.wait_state("ready")
    assert page.page.is_checked("#record"), "the choice is remembered like the other settings"

    page.page.click("#stats-toggle")
    page.page.click("#start")
    page.wait_state("talking")
    metadata = page.wait_for(lambda: page.js("jmoshi.metadata"), "metadata")
    assert metadata["recording"] is True, metadata
    assert metadata["recording_url"].startswith("/api/recordings/")
    assert page.page.is_visible("#recording") and "録音中" in page.page.inner_text("#recording")
    assert page.page.is_disabled("#record"), "the box cannot change a conversation under way"

    page.wait_for(lambda: page.js("jmoshi.counters.statsMessages") >= 1, "a stats message")
    polls = sum("/api/status" in url for url in page.requests)
    page.wait_for(lambda: page.js("jmoshi.counters.statsMessages") >= 4, "four stats messages", timeout=30)
    page.wait_for(lambda: page.js(STEP_FROM_STATS), "the step time from the 0x08 message")
    page.wait_for(lambda: page.js(DROPS_FROM_STATS), "the drop count from the 0x08 message")
    assert sum("/api/status" in url for url in page.requests) <= polls + 1, "polling stops once 0x08 arrives"
    assert page.js("jmoshi.stats.frame_ms") == 80
    assert not page.js("jmoshi.slowWarning") and not page.page.is_visible("#slow-warning")
    page.screenshot("page-recording-ja.png")

    page.page.click("#stop")
    page.wait_state("stopped")
    assert not page.page.is_visible("#recording")
    ready = "jmoshi.recordings.length === 1 && jmoshi.recordings[0].ready"
    page.wait_for(lambda: page.js(ready), "the recording to be ready for download")
    page.screenshot("page-recording-done-ja.png")
    wav_url = page.page.eval_on_selector("#recording-list a.recording-wav", "a => a.href")
    json_url = page.page.eval_on_selector("#recording-list a.recording-transcript", "a => a.href")
    assert wav_url == own.url + metadata["recording_url"]
    assert json_url == wav_url + "?part=transcript"
    wav = page.context.request.get(wav_url)  # the page's cookies and origin
    assert wav.status == 200
    body = wav.body()
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE" and len(body) > 44 + 1920 * 4
    doc = page.context.request.get(json_url)
    assert doc.status == 200
    assert doc.json()["complete"] is True
    assert not page.js("jmoshi.slowWarning"), "a normal demo server keeps up"


def test_slow_gpu_warning(start_server, open_page):
    """A server whose model steps slower than real time: the page says so in plain words."""
    slow = start_server("--bench-step-delay-ms", "150")
    page = open_page(slow.url + "/", **PHONE)
    page.wait_state("ready")
    assert not page.page.is_visible("#slow-warning")
    page.page.tap("#start")
    page.wait_state("talking")
    page.wait_for(lambda: page.js("jmoshi.slowWarning"), "the slow-GPU warning", timeout=30)
    assert page.page.is_visible("#slow-warning")
    assert "このGPUでは処理が実時間に間に合っていません" in page.page.inner_text("#slow-warning")
    stats = page.js("jmoshi.stats")
    assert stats["realtime"] is False and stats["realtime_factor"] > 1, stats
    assert page.js("jmoshi.counters.statsMessages") >= 3, "one slow message alone is not enough"
    page.screenshot("page-slow-gpu-phone-ja.png")
    page.page.tap("#lang-en")
    assert "too slow for real time" in page.page.inner_text("#slow-warning")
    page.page.tap("#stop")
    page.wait_state("stopped")
    slow.stop()


# ---- states explained without a conversation --------------------------------------------


def test_insecure_origin_explains_https(server, open_page):
    url = f"http://{INSECURE_HOST}:{server.port}/"
    page = open_page(url, **PHONE)
    page.wait_state("insecure")
    text = page.status_text()
    assert "マイクが使えません" in text and "https://" in text
    assert page.page.get_attribute("#status-actions a", "href") == f"https://{INSECURE_HOST}:{server.port}/"
    assert page.page.is_disabled("#start")
    page.screenshot("page-insecure-phone-ja.png")

    english = open_page(url, locale="en-US", **DESKTOP)
    english.wait_state("insecure")
    assert english.js("document.documentElement.lang") == "en", "English when the browser says English"
    assert "Browsers only allow the microphone on secure pages" in english.status_text()


def test_model_loading_polls_readyz(server, open_page):
    loading = '{"ready": false, "phase": "loading", "reason": "downloading model.safetensors"}'
    hits = []

    def not_ready(route):
        hits.append(route.request.url)
        route.fulfill(status=503, content_type="application/json", body=loading)

    page = open_page("about:blank", **DESKTOP)
    page.page.route("**/readyz*", not_ready)
    page.page.goto(server.url + "/")
    page.wait_state("loading")
    assert "downloading model.safetensors" in page.status_text()
    assert page.page.is_disabled("#start")
    page.wait_for(lambda: len(hits) >= 2, "a second /readyz poll", timeout=10)
    page.page.unroute("**/readyz*")
    page.wait_state("ready", timeout=10)
    assert page.page.is_enabled("#start")


def test_mic_denied_is_explained(server, browser):
    context = browser.new_context(locale="ja-JP")  # no microphone permission granted
    try:
        page = context.new_page()
        context.add_init_script(
            "navigator.mediaDevices.getUserMedia = () =>"
            " Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
        )
        page.goto(server.url + "/")
        page.wait_for_function("jmoshi.state === 'ready'")
        page.click("#start")
        page.wait_for_function("jmoshi.state === 'micDenied'")
        assert "マイクの使用が許可されていません" in page.inner_text("#status")
        assert page.is_enabled("#start") and page.is_disabled("#stop")
    finally:
        context.close()


def test_settings_validate_persist_and_reset(server, open_page):
    page = open_page(server.url + "/", **DESKTOP)
    page.wait_state("ready")
    page.page.click("#settings summary")
    page.page.fill("#set-text_temperature", "abc")
    page.page.fill("#set-audio_topk", "300")
    assert "0 から 5" in page.page.inner_text("#err-text_temperature")
    assert page.page.get_attribute("#set-text_temperature", "aria-invalid") == "true"
    page.page.focus("#start")
    page.page.keyboard.press("Enter")
    time.sleep(0.3)
    assert page.state == "ready", "an invalid setting must stop Start before it connects"
    assert page.js("document.activeElement.id") == "set-text_temperature", "focus goes to the bad field"

    page.page.reload()
    page.wait_state("ready")
    assert page.page.input_value("#set-audio_topk") == "300", "settings survive a reload"
    page.page.click("#settings summary")
    page.page.click("#settings-reset")
    assert page.page.input_value("#set-audio_topk") == ""
    assert page.page.input_value("#set-text_temperature") == ""
    assert page.js("localStorage.getItem('jmoshi.settings.v1')") is None


def test_transcript_splits_on_sentence_ends_and_pauses(server, open_page):
    page = open_page(server.url + "/", **DESKTOP)
    lines = page.js(
        """(async () => {
          const { Transcript } = await import('/js/transcript.js');
          let now = 0;
          const el = document.createElement('div');
          const tr = new Transcript(el, { pauseMs: 1000, now: () => now });
          tr.push('こんにちは。元気');
          tr.push('ですか？はい');
          now = 500; tr.push('、そうです');
          now = 2000; tr.push('あのね「ほんと。」');
          tr.push('\\u0007よ!');
          return [...el.children].map((p) => p.textContent);
        })()"""
    )
    assert lines == ["こんにちは。", "元気ですか？", "はい、そうです", "あのね「ほんと。」", "よ!"]


def test_jitter_buffer_starts_late_and_drops_oldest(server, open_page):
    page = open_page(server.url + "/", **DESKTOP)
    result = page.js(
        """(async () => {
          const ctx = new AudioContext();
          await ctx.resume();
          await ctx.audioWorklet.addModule('/worklets/player.js');
          const node = new AudioWorkletNode(ctx, 'jitter-buffer-player', {
            numberOfInputs: 0, outputChannelCount: [1],
            processorOptions: { startMs: 80, maxMs: 320, keepMs: 160 } });
          node.connect(ctx.destination);
          let stats = null;
          node.port.onmessage = (e) => { stats = e.data; };
          const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
          const ms = (n) => new Float32Array(Math.round(ctx.sampleRate * n / 1000)).fill(0.1);
          node.port.postMessage({ type: 'push', samples: ms(40) });
          await sleep(300);
          const early = stats;
          node.port.postMessage({ type: 'push', samples: ms(1000) });
          await sleep(300);
          const burst = stats;
          await sleep(600);
          const after = stats;
          await ctx.close();
          return { early, burst, after };
        })()"""
    )
    early, burst, after = result["early"], result["burst"], result["after"]
    assert early["rendered"] == 0 and not early["playing"], "40 ms is below the 80 ms start threshold"
    # 1040 ms queued against a 320 ms limit: the oldest is dropped back to 160 ms.
    assert burst["droppedMs"] == pytest.approx(1040 - 160, abs=5)
    assert burst["bufferedMs"] <= 320 and burst["rendered"] > 0
    assert after["underruns"] >= 1 and after["bufferedMs"] == 0, "it ran dry and said so"
