"""The streaming detokenizer on the demo's real SentencePiece model (byte fallback on)."""

from __future__ import annotations

import pytest
import sentencepiece

from jmoshi_server.demo import TOKENIZER_NAME
from jmoshi_server.text import Detokenizer


@pytest.fixture(scope="module")
def sp(demo_dir) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(demo_dir / TOKENIZER_NAME))


def byte_id(sp, value: int) -> int:
    return sp.piece_to_id(f"<0x{value:02X}>")


def test_japanese_round_trip_without_spaces(sp):
    sentence = "こんにちは。きょうはいい天気ですね。"
    ids = sp.encode(sentence)
    assert sp.id_to_piece(ids[0]).startswith("▁")  # SentencePiece's word boundary...
    assert Detokenizer(sp).decode_all(ids) == sentence  # ...is dropped, not turned into a space


def test_pad_ids_are_skipped(sp):
    ids = sp.encode("はい")
    padded = [3, 3, ids[0], 0, 3, *ids[1:], 3, 0]
    assert Detokenizer(sp).decode_all(padded) == "はい"


def test_byte_fallback_pieces_become_one_character_once_complete(sp):
    word = "象が鼻をのばす"  # 象 and 鼻 are not in the demo vocabulary: byte pieces
    ids = sp.encode(word)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert "<0xE8>" in pieces  # 象 = E8 B1 A1: what moshi.server would print literally
    detok = Detokenizer(sp)
    outputs = [detok.push(i) for i in ids]
    assert "".join(outputs) == word
    first_char_end = pieces.index("<0xE8>") + 2
    assert outputs[first_char_end - 2 : first_char_end] == ["", ""]  # nothing until complete
    assert outputs[first_char_end] == "象"
    assert all("<0x" not in o and "\ufffd" not in o for o in outputs)


def test_invalid_and_interrupted_sequences_are_dropped(sp):
    detok = Detokenizer(sp)
    ha = sp.encode("は")[-1]
    stream = [
        byte_id(sp, 0x81),  # a lone continuation byte
        byte_id(sp, 0xE3),
        byte_id(sp, 0x81),  # a sequence cut short by...
        ha,  # ...a normal piece
        byte_id(sp, 0xE3),
        byte_id(sp, 0x81),
        byte_id(sp, 0x82),  # a valid あ
        byte_id(sp, 0xFF),  # never valid in UTF-8
        byte_id(sp, 0x08),  # a control character
    ]
    assert detok.decode_all(stream) == "はあ"


def test_unfinished_sequence_does_not_leak_into_the_next_stream(sp):
    detok = Detokenizer(sp)
    assert detok.push(byte_id(sp, 0xE3)) == ""
    detok.reset()
    assert detok.decode_all(sp.encode("ね")) == "ね"


def test_ids_outside_the_vocabulary_are_ignored(sp):
    assert Detokenizer(sp).decode_all([-1, sp.vocab_size(), 10**6]) == ""
