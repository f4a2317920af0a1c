"""Helpers for the page tests: Debian's chromium under Playwright with a fake microphone."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "device_scale_factor": 2,
}
DESKTOP = {"viewport": {"width": 1100, "height": 900}}
INSECURE_HOST = "jmoshi.test"  # mapped to 127.0.0.1, so the page is http:// on a non-loopback name


def chromium_path() -> str:
    for path in CHROMIUM_PATHS:
        if Path(path).exists():
            return path
    found = shutil.which("chromium")
    if found:
        return found
    pytest.fail(
        "chromium is missing: run `bash scripts/setup-system.sh` (installs chromium, fonts-noto-cjk, ...)"
    )


def launch(playwright, mic_wav: Path):
    return playwright.chromium.launch(
        executable_path=chromium_path(),
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}",
            "--autoplay-policy=no-user-gesture-required",
            f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


class PageUnderTest:
    """A page in its own browser context, recording its requests and script errors."""

    def __init__(
        self, browser, url: str, locale: str = "ja-JP", init_script: str | None = None, **context_args: Any
    ) -> None:
        self.context = browser.new_context(locale=locale, **context_args)
        self.context.grant_permissions(["microphone"])
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(url)

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def js(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    @property
    def state(self) -> str:
        return self.js("window.jmoshi && jmoshi.state")

    def status_text(self) -> str:
        return self.page.inner_text("#status")

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            self.page.wait_for_timeout(100)  # unlike time.sleep, lets Playwright run route handlers
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what}; state={self.state!r}, "
            f"status={self.status_text()!r}, errors={self.errors}"
        )

    def wait_state(self, state: str, timeout: float = 20.0) -> None:
        self.wait_for(lambda: self.state == state, f"state {state!r}", timeout)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


# Headless chromium has no screen to keep on: record the page's wake lock requests instead.
WAKE_LOCK_SPY = """
window.__wakeLock = { requested: 0, released: 0 };
Object.defineProperty(navigator, "wakeLock", { value: { request: async (type) => {
  window.__wakeLock.requested += 1;
  const lock = new EventTarget();
  lock.type = type;
  lock.release = async () => { window.__wakeLock.released += 1; lock.dispatchEvent(new Event("release")); };
  return lock;
} } });
"""


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())
