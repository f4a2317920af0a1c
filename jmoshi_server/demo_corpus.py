"""A few hundred everyday Japanese sentences for training the demo checkpoint's tokenizer.

Built from small phrase lists so the corpus stays readable and deterministic. It only has to
give the SentencePiece model realistic Japanese pieces (kana, common kanji, punctuation);
characters outside it reach the model as byte-fallback pieces, which the demo needs too.
"""

from __future__ import annotations

import itertools

_OPENERS = [
    "こんにちは。",
    "おはようございます。",
    "こんばんは。",
    "はじめまして。",
    "ええと、",
    "そうですね、",
    "なるほど、",
    "へえ、",
    "うん、",
    "あの、",
    "ところで、",
    "じつは、",
]
_TOPICS = [
    "きょうは",
    "あしたは",
    "きのうは",
    "しゅうまつは",
    "さいきん",
    "東京では",
    "大阪では",
    "わたしの家では",
    "学校で",
    "会社で",
    "駅のちかくで",
    "夏休みに",
]
_EVENTS = [
    "いい天気ですね",
    "雨がふっていました",
    "友だちと映画を見ました",
    "ラーメンを食べました",
    "本を読んでいます",
    "散歩に行きたいです",
    "仕事がいそがしいです",
    "電車がおくれました",
    "新しいカフェができました",
    "さくらがきれいでした",
    "ねこがあそびに来ました",
    "音楽をききながら料理しました",
    "サッカーの試合を見ました",
    "海に行く予定です",
    "日本語を勉強しています",
    "おまつりがありました",
]
_CLOSERS = [
    "",
    "よ。",
    "ね。",
    "か？",
    "！",
    "と思います。",
    "って聞きました。",
    "んですよ。",
]
_REPLIES = [
    "はい、そうなんです。",
    "いいですね！",
    "ほんとうですか？",
    "それはたいへんでしたね。",
    "わたしもそう思います。",
    "もう少しくわしく教えてください。",
    "なるほど、おもしろいですね。",
    "うんうん。",
    "へえ、すごい！",
    "ありがとうございます。",
    "またあとで話しましょう。",
    "どうしてですか？",
    "たのしそうですね。",
    "よかったですね。",
    "ちょっとわかりません。",
]


def sentences() -> list[str]:
    """About four hundred sentences, always the same ones in the same order."""
    out = []
    combos = itertools.product(_OPENERS, _TOPICS, _EVENTS, _CLOSERS)
    # A fixed stride walks the product evenly without taking every combination.
    for index, (opener, topic, event, closer) in enumerate(combos):
        if index % 53 == 0:
            ending = closer if closer else "。"
            out.append(f"{opener}{topic}{event}{ending}")
    out.extend(_REPLIES)
    for first, second in zip(_REPLIES, reversed(_REPLIES), strict=True):
        out.append(first + second)
    return out
