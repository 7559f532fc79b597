"""The RWKV "world" tokenizer (vocabulary rwkv_vocab_v20230424), through pyrwkv-tokenizer (Rust)."""

from __future__ import annotations


class WorldTokenizer:
    """Greedy longest-match over the world vocabulary; ids identical to the official runtime's."""

    def __init__(self):
        from pyrwkv_tokenizer import RWKVTokenizer

        self._tokenizer = RWKVTokenizer()

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)
