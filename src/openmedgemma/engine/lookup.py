"""Draft tokens for prompt-lookup decoding: what followed the latest earlier occurrence of the text's
last n-gram (the prompt and the answer so far), tried from `ngram` tokens down to 1.

Reports, summaries and long answers copy their input, so the tokens after an earlier occurrence of
the last few tokens are often the next ones. The engine checks the drafts against the model's own
greedy choices in one forward (engine/generate.py), so a bad draft costs time, never a token.
"""

from __future__ import annotations

from collections.abc import Iterable


class PromptLookup:
    """An index from each n-gram (n = 1 .. ngram) to the end of its latest occurrence that has a token
    after it, kept up to date as tokens are appended: a draft costs a few dict look-ups, not a scan.

    Image soft tokens of the prompt are given as None: no n-gram with one ever matches the text (the
    answer holds ids only) and drafts stop before one, so an image soft token is never proposed.
    """

    def __init__(self, ngram: int, history: Iterable[int | None] = ()):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.tokens: list[int | None] = []
        self._ends: list[dict[tuple, int]] = [{} for _ in range(ngram + 1)]  # [n][n-gram] -> end (exclusive)
        for token in history:
            self.append(token)

    def append(self, token: int | None) -> None:
        tokens, length = self.tokens, len(self.tokens)
        for n in range(1, min(self.ngram, length) + 1):  # the n-grams ending here now have a follower
            self._ends[n][tuple(tokens[length - n :])] = length
        tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        tokens, length = self.tokens, len(self.tokens)
        if k < 1:
            return []
        for n in range(min(self.ngram, length), 0, -1):
            end = self._ends[n].get(tuple(tokens[length - n :]))
            if end is None:
                continue
            # the suffix recurs with period length - end: past the end of the text, the draft goes on
            # repeating that period (a loop the answer is in continues)
            period = length - end
            out = []
            for i in range(k):
                token = tokens[end + i % period]
                if token is None:
                    break
                out.append(token)
            if out:
                return out
        return []
