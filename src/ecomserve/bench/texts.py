"""Texts no request carried before: the peers comparison (issue 18) sends each text once.

ecomserve's `embed` has a response cache and a peer may cache too, so a benchmark that repeats texts can
measure a cache. `UniqueTexts` is an endless, deterministic stream of short queries (8–16 tokens with the
bundled tokenizer, [CLS] and [SEP] included) and product titles, built from the shipped corpus: text n is
a corpus line plus an addition that n alone decides (a template and a growing number for queries, a
colour and a pack size for titles), so every n gives a different text and no text equals a shipped one.
Every contender draws from its own stream position onwards, so the set of texts sent in one run is the
same whichever threads sent them."""

from __future__ import annotations

import itertools
import threading

from ecomserve.bench.variants import short_queries
from ecomserve.paths import corpus_lines
from ecomserve.tokenization import TextTokenizer

QUERY_TOKENS = (8, 16)  # [CLS] and [SEP] included, as ecomserve's tokenizer counts them
# Additions to a shipped query: each 1–3 words around a number of 1–2 tokens (numbers stay below 1000 for
# the first ~1.8 million queries).
QUERY_TEMPLATES = (
    "under {n} dollars",
    "size {n}",
    "pack of {n}",
    "for {n} year old",
    "model {n}",
    "{n} pack",
    "set of {n}",
)
# Shipped queries of 6–11 tokens: with an addition of 2–5 tokens every query lands in 8–16.
BASE_QUERY_TOKENS = (6, 11)
COLOURS = ("Black", "White", "Navy Blue", "Forest Green", "Red", "Silver", "Rose Gold", "Grey", "Beige", "Teal")


class UniqueTexts:
    """`query(n)` and `title(n)` are pure functions of n; `next_query()` / `next_titles(k)` walk the streams
    (thread-safe), so a run never sends a text twice."""

    def __init__(self, tokenizer: TextTokenizer):
        queries = list(dict.fromkeys(corpus_lines("queries.txt")))
        self.base_queries = short_queries(tokenizer, queries, *BASE_QUERY_TOKENS)
        self.base_titles = list(dict.fromkeys(corpus_lines("titles.txt")))
        if not self.base_queries or not self.base_titles:
            raise ValueError("the shipped corpus has no short queries or no titles")
        self._queries = itertools.count()
        self._titles = itertools.count()
        self._lock = threading.Lock()

    def query(self, n: int) -> str:
        base, k = n % len(self.base_queries), n // len(self.base_queries)
        template = QUERY_TEMPLATES[k % len(QUERY_TEMPLATES)]
        return f"{self.base_queries[base]} {template.format(n=k // len(QUERY_TEMPLATES) + 1)}"

    def title(self, n: int) -> str:
        base, k = n % len(self.base_titles), n // len(self.base_titles)
        colour = COLOURS[k % len(COLOURS)]
        return f"{self.base_titles[base]} - {colour}, Pack of {k // len(COLOURS) + 1}"

    def next_query(self) -> str:
        with self._lock:
            n = next(self._queries)
        return self.query(n)

    def next_titles(self, count: int) -> list[str]:
        with self._lock:
            numbers = [next(self._titles) for _ in range(count)]
        return [self.title(n) for n in numbers]

    def take_queries(self, count: int) -> list[str]:
        """The next `count` queries as a list (for a contender that runs out of process)."""
        return [self.next_query() for _ in range(count)]
