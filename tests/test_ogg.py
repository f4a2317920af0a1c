"""Ogg page validation against pages sphn's real Opus writer produces."""

from __future__ import annotations

import numpy as np
import pytest

from jmoshi_server.audio import BadAudio, OpusFrameDecoder
from jmoshi_server.client import ogg_pages
from jmoshi_server.ogg import BadOgg, check_pages, ogg_crc


@pytest.fixture(scope="module")
def pages() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [p for p in ogg_pages((rng.standard_normal(24000) * 0.1).astype(np.float32)) if p]


def test_crc_of_known_vector():
    # CRC-32/MPEG-2 without the final inversion and init: "123456789" -> 0x89A1897F (Ogg's variant).
    assert ogg_crc(b"123456789") == 0x89A1897F


def test_real_pages_pass(pages):
    counts = [check_pages(p) for p in pages]
    assert all(c >= 1 for c in counts)
    # sphn writes two 40 ms pages per 80 ms; messages may hold several whole pages.
    assert check_pages(pages[1] + pages[2]) == counts[1] + counts[2]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda p: p[:-4], "truncated"),
        (lambda p: p[:20], "truncated"),
        (lambda p: b"OggX" + p[4:], "capture"),
        (lambda p: p[:4] + b"\x01" + p[5:], "version"),
        (lambda p: p[:-1] + bytes([p[-1] ^ 0xFF]), "checksum"),
        (lambda p: p + b"trailing", "truncated|capture"),
        (lambda p: b"", "empty"),
    ],
)
def test_broken_pages_are_refused(pages, mangle, reason):
    with pytest.raises(BadOgg, match=reason):
        check_pages(mangle(pages[3]))


def test_decoder_cuts_whole_frames(pages):
    decoder = OpusFrameDecoder()
    frames = [f for p in pages for f in decoder.feed(p)]
    assert frames and all(f.shape == (1920,) and f.dtype == np.float32 for f in frames)
    with pytest.raises(BadAudio):
        decoder.feed(b"garbage")
