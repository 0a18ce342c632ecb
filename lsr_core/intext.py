"""In-text terms for zero-shot prompting (zeroshot_prompt.py and bench/zeroshot_ablation.py): the vocabulary ids of
a text's own non-stopword words, the filter that keeps only them, and cutting texts before they go into a prompt."""
from __future__ import annotations

import re

import torch

from lsr_core.stopwords import ENGLISH_STOPWORDS

WORD = re.compile(r"\w+")


def truncate_texts(tokenizer, texts: list[str], max_len: int) -> list[str]:
    """Cut each text after its first `max_len` tokens (on the original string, so the text is not re-spelled)."""
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len,
                    return_offsets_mapping=tokenizer.is_fast)
    out = []
    for i, text in enumerate(texts):
        ids = enc["input_ids"][i]
        if len(ids) < max_len:
            out.append(text)
        elif tokenizer.is_fast:
            out.append(text[:enc["offset_mapping"][i][-1][1]])
        else:
            out.append(tokenizer.decode(ids))
    return out


class TextVocabulary:
    """Vocabulary ids of a text's non-stopword words.

    A word is a `\\w+` match; stopwords (lsr_core.stopwords, case-insensitive) are skipped. Each remaining word is
    tokenized alone, as written and lower-cased, each both bare and with a leading space — so BPE vocabularies
    contribute the word-initial variant (GPT-2/Llama-3 `Ġword`, SentencePiece `▁word`) besides the bare one, and a
    word split into pieces contributes all its pieces. Ids whose surface is empty, whitespace or itself a stopword
    (e.g. a lone `▁`, or `s` from a split) and special tokens are dropped. Results are cached per word.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.words: dict[str, frozenset[int]] = {}

    def _useful(self, token_id: int) -> bool:
        surface = self.tokenizer.decode([token_id]).strip().lower()
        return token_id not in self.special and bool(surface) and surface not in ENGLISH_STOPWORDS

    def word_ids(self, word: str) -> frozenset[int]:
        if word not in self.words:
            ids = set()
            for form in {word, word.lower()}:
                for variant in (form, " " + form):
                    ids.update(self.tokenizer.encode(variant, add_special_tokens=False))
            self.words[word] = frozenset(i for i in ids if self._useful(i))
        return self.words[word]

    def __call__(self, text: str) -> set[int]:
        ids: set[int] = set()
        for word in set(WORD.findall(text)):
            if word.lower() not in ENGLISH_STOPWORDS:
                ids |= self.word_ids(word)
        return ids


def keep_text_terms(reps: torch.Tensor, allowed: list[set[int]]) -> tuple[torch.Tensor, int]:
    """Zero every id outside each row's `allowed` set; rows left with no positive weight keep the full vector.
    reps [B, V] -> (reps [B, V], number of rows that fell back)."""
    mask = torch.zeros_like(reps, dtype=torch.bool)
    for row, ids in enumerate(allowed):
        if ids:
            mask[row, torch.tensor(sorted(ids), dtype=torch.long, device=reps.device)] = True
    kept = reps * mask
    empty = ~(kept > 0).any(dim=1)
    return torch.where(empty[:, None], reps, kept), int(empty.sum())
