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


def _bitwise_crc(data: bytes) -> int:
    """RFC 3533's CRC the slow, obvious way: one bit at a time, MSB first."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def test_crc_matches_the_bitwise_definition():
    rng = np.random.default_rng(1)
    for size in (0, 1, 2, 3, 4, 27, 255, 1000, 4096):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert ogg_crc(data) == _bitwise_crc(data), size


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


def _split_pages(message: bytes) -> list[bytes]:
    """The Ogg pages inside one message, each on its own."""
    out = []
    while message:
        segments = message[26]
        end = 27 + segments + sum(message[27 : 27 + segments])
        out.append(message[:end])
        message = message[end:]
    return out


def test_decoder_output_does_not_depend_on_how_pages_are_grouped(pages):
    """80 ms messages take the fast path; single 40 ms pages are re-cut into 80 ms frames."""
    single = [page for message in pages for page in _split_pages(message)]
    assert len(single) > len(pages)  # sphn's writer puts two pages in each 80 ms message
    by_message, by_page = OpusFrameDecoder(), OpusFrameDecoder()
    grouped = [f for p in pages for f in by_message.feed(p)]
    one_by_one = [f for p in single for f in by_page.feed(p)]
    assert all(f.shape == (1920,) for f in grouped + one_by_one)
    assert len(grouped) == len(one_by_one)
    np.testing.assert_array_equal(np.concatenate(grouped), np.concatenate(one_by_one))
