"""Which generated pairs to keep: a length filter, exact and near-duplicate removal.

Duplicates are judged on the prompt (instruction + input), as Self-Instruct does: the same
question asked twice is a duplicate even when the answers differ (two answers to one question
teach the model nothing but inconsistency).

- exact: equal after normalisation (Unicode NFKC, case-folded, punctuation and whitespace runs
  collapsed to one space), so "What's X?" and "what's  x" are the same prompt.
- near: Jaccard similarity of character 5-gram sets >= `near_dup`. Candidates come from
  MinHash LSH (128 hashes in 32 bands of 4, so pairs at similarity 0.5 are found with
  probability 0.87 and at 0.6 or more with probability > 0.99) and every candidate is checked
  with the exact Jaccard, so nothing is dropped on a hash collision. Cost stays about linear in
  the number of rows.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import defaultdict
from typing import Any

from sft_job.synth.parse import Pair

NUM_HASHES = 128
BANDS = 32
SHINGLE = 5
MIN_NEAR_DUP = 0.5  # below this, LSH recall drops (see module docstring)
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Case-folded NFKC text with punctuation and whitespace runs collapsed to one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str) -> frozenset[str]:
    """Character 5-grams of normalised text (the text itself when shorter)."""
    if len(text) <= SHINGLE:
        return frozenset([text])
    return frozenset(text[i:i + SHINGLE] for i in range(len(text) - SHINGLE + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Keeper:
    """Offer pairs one at a time; each is kept or gets a reject reason. Order matters: the first
    of a group of duplicates is the one kept."""

    def __init__(self, min_chars: int = 10, max_chars: int = 8000, near_dup: float = 0.8) -> None:
        if not MIN_NEAR_DUP <= near_dup <= 1.0:
            raise ValueError(f"near_dup must be in [{MIN_NEAR_DUP}, 1], got {near_dup}")
        self.min_chars, self.max_chars, self.near_dup = min_chars, max_chars, near_dup
        self._exact: set[bytes] = set()
        self._shingles: list[frozenset[str]] = []
        self._bands: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self._perm: Any = None

    def offer(self, pair: Pair) -> str | None:
        """None if `pair` is kept (and remembered), else why it is rejected."""
        if len(pair.prompt) < self.min_chars or len(pair.response) < self.min_chars:
            return "too_short"
        if len(pair.prompt) + len(pair.input) + len(pair.response) > self.max_chars:
            return "too_long"
        text = normalize(f"{pair.prompt} {pair.input}")
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in self._exact:
            return "duplicate"
        if self.near_dup < 1.0:
            sh = shingles(text)
            bands = self._band_keys(sh)
            cands = {i for b in bands for i in self._bands.get(b, ())}
            if any(jaccard(sh, self._shingles[i]) >= self.near_dup for i in cands):
                return "near_duplicate"
            idx = len(self._shingles)
            self._shingles.append(sh)
            for b in bands:
                self._bands[b].append(idx)
        self._exact.add(key)
        return None

    def _band_keys(self, sh: frozenset[str]) -> list[tuple[int, bytes]]:
        import numpy as np

        if self._perm is None:
            rng = np.random.default_rng(20240611)  # fixed: signatures are comparable across runs
            odd = rng.integers(0, 1 << 63, NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
            self._perm = (odd, rng.integers(0, 1 << 63, NUM_HASHES, dtype=np.uint64))
        a, b = self._perm
        h = np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64, count=len(sh))
        # multiply-add-shift hashing: (a*h + b) mod 2^64 (numpy wraps), top 32 bits
        sig = ((a[:, None] * h[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1)
        rows = NUM_HASHES // BANDS
        return [(i, sig[i * rows:(i + 1) * rows].tobytes()) for i in range(BANDS)]
