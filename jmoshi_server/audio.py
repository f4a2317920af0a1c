"""Ogg/Opus in and out with sphn, cut into the model's 80 ms frames.

Both run on the event loop: per 80 ms frame sphn decodes in about 0.1 ms and encodes in
about 1 ms on this project's 2-core dev machine, far below the loop's 10 ms responsiveness
target, and doing it there keeps the model thread's critical path to the model alone
(measured in docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import sphn

from .engine import FRAME_SAMPLES, SAMPLE_RATE
from .ogg import BadOgg, check_pages


class BadAudio(ValueError):
    """The client's audio is not a decodable Ogg/Opus stream."""


class OpusFrameDecoder:
    """Ogg/Opus pages in, whole 1920-sample float32 frames out.

    sphn returns the audio of every whole Opus packet a message completes; clients that send
    pages of other lengths (opus-recorder's 20 ms packets, say) are re-cut into model frames.
    """

    def __init__(self) -> None:
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)

    def feed(self, payload: bytes) -> list[np.ndarray]:
        try:
            check_pages(payload)
        except BadOgg as exc:
            raise BadAudio(str(exc)) from None
        try:
            pcm = self._reader.append_bytes(payload)
        except ValueError as exc:  # sphn reports broken pages as ValueError
            raise BadAudio(f"broken Ogg/Opus stream: {exc}") from None
        if pcm.size == 0:
            return []
        if self._pending.size == 0 and pcm.size == FRAME_SAMPLES:  # the usual 80 ms page
            return [pcm.astype(np.float32, copy=False)]
        pending = np.concatenate((self._pending, pcm.astype(np.float32, copy=False)))
        whole = len(pending) // FRAME_SAMPLES * FRAME_SAMPLES
        self._pending = pending[whole:]
        return [pending[i : i + FRAME_SAMPLES] for i in range(0, whole, FRAME_SAMPLES)]


class OpusEncoder:
    """float32 PCM in, Ogg/Opus pages out (the first call also carries the Opus headers)."""

    def __init__(self) -> None:
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._writer.append_pcm(np.clip(pcm, -1.0, 1.0).astype(np.float32, copy=False))
