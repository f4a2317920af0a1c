"""Streaming detokenizer for J-Moshi's text stream.

The model emits one SentencePiece id per 80 ms frame. Three things moshi.server gets wrong
for Japanese, and this module gets right:

* pad ids (3, and 0 for end of text) and control pieces carry no text: skipped;
* J-Moshi was trained with no whitespace before words, so ``▁`` is dropped, not turned
  into a space;
* rare characters come as byte-fallback pieces (``<0xE3>`` ``<0x81>`` ``<0x93>``) spread
  over several frames: they are assembled into UTF-8 and a character is emitted only once
  complete. An invalid or interrupted sequence is dropped, never shown as ``<0x..>`` or
  as U+FFFD; so are control characters.
"""

from __future__ import annotations

import codecs
import unicodedata

import sentencepiece

WORD_BOUNDARY = "\u2581"  # ▁
JMOSHI_PAD_IDS = frozenset({0, 3})


class Detokenizer:
    """Turns a stream of token ids into a stream of complete characters."""

    def __init__(
        self,
        tokenizer: sentencepiece.SentencePieceProcessor,
        skip_ids: frozenset[int] = JMOSHI_PAD_IDS,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_ids = skip_ids
        self._vocab_size = tokenizer.vocab_size()
        # errors="ignore": bytes that cannot start or continue a character are dropped.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def _bytes_of(self, token_id: int) -> bytes:
        sp = self._tokenizer
        if token_id in self._skip_ids or not 0 <= token_id < self._vocab_size:
            return b""
        if sp.is_byte(token_id):
            return bytes((int(sp.id_to_piece(token_id)[1:-1], 16),))  # "<0xE3>" -> 0xE3
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""
        return sp.id_to_piece(token_id).replace(WORD_BOUNDARY, "").encode("utf-8")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the characters it completes (often "")."""
        piece = self._bytes_of(token_id)
        if not piece:
            return ""
        text = self._utf8.decode(piece)
        # Control characters (a byte-fallback 0x08, say) are not text anyone should see.
        return "".join(ch for ch in text if unicodedata.category(ch) != "Cc")

    def reset(self) -> None:
        """Start a new stream: an unfinished byte sequence is dropped."""
        self._utf8.reset()

    def decode_all(self, token_ids: list[int]) -> str:
        text = "".join(self.push(t) for t in token_ids)
        self.reset()
        return text
