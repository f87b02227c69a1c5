"""Word error rate between a reference and a hypothesis transcript (for reporting, not a decoding input)."""
from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w']+")


def normalize_words(text: str) -> list[str]:
    """Lower-case words: Unicode NFKC, punctuation (except apostrophes inside words) treated as spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [w.strip("'") for w in _NON_WORD.sub(" ", text).split() if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, number of reference words), by word-level Levenshtein."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edits / reference words (0.0 for two empty texts; inf for an empty reference with a non-empty hypothesis)."""
    errors, n = word_errors(reference, hypothesis)
    if n == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / n
