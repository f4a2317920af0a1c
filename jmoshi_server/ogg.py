"""Validate that a message holds whole, intact Ogg pages before it reaches the Opus decoder.

sphn's reader buffers a truncated page silently and decodes a page with a flipped bit as
if nothing happened, so a broken client would get neither an error nor sensible audio.
Every known moshi client (Kyutai's web client, opus-recorder with ``streamPages``, this
project's page and jmoshi-client) sends whole pages per message, so each message is
checked on its own: capture pattern, version, lengths, and the page CRC (RFC 3533).
"""

from __future__ import annotations

import struct
import zlib

CAPTURE = b"OggS"
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, seq, crc, segments
_CRC_OFFSET = 22


class BadOgg(ValueError):
    """The bytes are not a sequence of whole, intact Ogg pages."""


# Ogg's CRC is zlib's CRC-32 polynomial with the bits in the other order. Reversing each
# byte's bits, running zlib's C implementation and reversing the 32-bit result gives the same
# value ~35x faster than a table loop in Python, which ran on the event loop for every page.
_REVERSED_BITS = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, zero init, no final xor (RFC 3533)."""
    # zlib inverts the register before and after; starting from ~0 and inverting the result
    # back gives the plain register with zero init and no final xor.
    reflected = zlib.crc32(data.translate(_REVERSED_BITS), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def check_pages(data: bytes) -> int:
    """Raise BadOgg unless ``data`` is one or more whole, intact Ogg pages; return the count."""
    offset, pages = 0, 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            raise BadOgg(f"truncated Ogg page header at byte {offset}")
        capture, version, _, _, _, _, crc, segments = _HEADER.unpack_from(data, offset)
        if capture != CAPTURE:
            raise BadOgg(f"no 'OggS' capture pattern at byte {offset}")
        if version != 0:
            raise BadOgg(f"unsupported Ogg version {version}")
        table_end = offset + _HEADER.size + segments
        if table_end > len(data):
            raise BadOgg("truncated Ogg segment table")
        page_end = table_end + sum(data[offset + _HEADER.size : table_end])
        if page_end > len(data):
            raise BadOgg("truncated Ogg page body")
        page = bytearray(data[offset:page_end])
        page[_CRC_OFFSET : _CRC_OFFSET + 4] = b"\0\0\0\0"
        if ogg_crc(page) != crc:
            raise BadOgg("Ogg page checksum mismatch (corrupted page)")
        offset, pages = page_end, pages + 1
    if pages == 0:
        raise BadOgg("empty audio message")
    return pages
