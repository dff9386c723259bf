"""Keeper: length filter, exact and near-duplicate prompts, and LSH recall."""

from __future__ import annotations

import random
import string

import pytest

from sft_job.synth.dedup import Keeper, jaccard, normalize, shingles
from sft_job.synth.parse import Pair

ANSWER = "An answer that is long enough."


def offer(k: Keeper, prompt: str, inp: str = "") -> str | None:
    return k.offer(Pair(prompt, ANSWER, inp))


def test_exact_duplicates_after_normalisation() -> None:
    k = Keeper()
    assert offer(k, "What's the difference between a list and a tuple?") is None
    assert offer(k, "  WHAT'S the difference between a LIST and a tuple ") == "duplicate"
    assert offer(k, "What’s the difference between a list, and a tuple??") == "duplicate"
    # the input is part of the prompt: same instruction, other input is not a duplicate
    assert offer(k, "Translate to French", "good morning") is None
    assert offer(k, "Translate to French", "good night") is None
    assert offer(k, "translate to french", "Good night!") == "duplicate"


def test_near_duplicates_and_distinct_lookalikes() -> None:
    k = Keeper(near_dup=0.8)
    base = "What is the difference between a list and a tuple in Python?"
    assert offer(k, base) is None
    assert offer(k, "What is the difference between a list and tuple in Python?") == "near_duplicate"
    assert offer(k, "What's the difference between a list and a tuple in Python?") == "near_duplicate"
    # same frame, different subject: kept
    assert offer(k, "What is the difference between a set and a dict in Python?") is None
    assert offer(k, "Explain how Python's garbage collector handles reference cycles.") is None


def test_near_dup_one_means_exact_only() -> None:
    k = Keeper(near_dup=1.0)
    assert offer(k, "What is the difference between a list and a tuple in Python?") is None
    assert offer(k, "What is the difference between a list and tuple in Python?") is None


def test_length_filter() -> None:
    k = Keeper(min_chars=10, max_chars=100)
    assert k.offer(Pair("Short?", ANSWER)) == "too_short"
    assert k.offer(Pair("A long enough question?", "ok")) == "too_short"
    assert k.offer(Pair("A long enough question?", "x" * 100)) == "too_long"
    assert k.offer(Pair("A long enough question?", ANSWER)) is None


def test_rejected_rows_do_not_block_later_ones() -> None:
    k = Keeper(min_chars=10)
    assert k.offer(Pair("A long enough question?", "no")) == "too_short"
    assert k.offer(Pair("A long enough question?", ANSWER)) is None


def test_lsh_finds_every_near_duplicate_among_many() -> None:
    """200 random prompts, then a variant of each (one word changed): the Keeper must flag
    exactly the variants whose true Jaccard with a kept prompt reaches the threshold."""
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(3000)]
    originals = [" ".join(rng.choices(words, k=16)) for _ in range(200)]
    k = Keeper(near_dup=0.7, min_chars=1)
    kept = []
    for p in originals:
        assert offer(k, p) is None
        kept.append(shingles(normalize(p)))
    near = 0
    for p in originals:
        toks = p.split()
        toks[rng.randrange(len(toks))] = rng.choice(words)
        sh = shingles(normalize(" ".join(toks)))
        truth = max(jaccard(sh, o) for o in kept)
        want = "duplicate" if truth == 1.0 else ("near_duplicate" if truth >= 0.7 else None)
        assert offer(k, " ".join(toks)) == want, truth
        near += want == "near_duplicate"
        if want is None:
            kept.append(sh)
    assert near > 150  # the test really exercised near-duplicates


def test_threshold_bounds() -> None:
    with pytest.raises(ValueError):
        Keeper(near_dup=0.3)
