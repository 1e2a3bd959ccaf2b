"""The lexical side of the catalog index: BM25 (bm25s) over each item's title, brand, description and attribute
values, with a tokenizer that keeps model numbers whole and also matches their parts.

    "Sony WH-1000XM4"  → sony, wh-1000xm4, wh1000xm4, wh, 1000xm4, 1000, xm4
    "990 pro 2tb"      → 990, pro, 2tb, 2, tb

Lower case; a word is a run of letters and digits, joined by `-`, `/`, `.` or `_` inside it. A word with joiners
also yields itself without them and each of its parts; each part (or a plain word) splits where digits are
followed by letters (`1000xm4` → `1000`, `xm4`; `2tb` → `2`, `tb`). The same function tokenises items and queries,
so "wh1000xm4", "1000xm4" and "WH-1000XM4" all find the item, and the exact model number scores highest.

`LexicalIndex` (faiss backend) is built whole from a version's items at every commit (bm25s has no incremental
update; 100k titles take seconds, README) and saved into the same version folder as the vectors, so `search` reads
lexical and dense data of one version. `search` applies a FILTER inside retrieval by masking the scores of items
that do not match. The Milvus backend keeps these same tokens in its collection and uses Milvus's own BM25
(milvus_index.MilvusLexical); both answer `LexicalRetriever.search`."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import bm25s
import numpy as np

from ecomserve.files import fsync_path
from ecomserve.index.catalog import filter_fields
from ecomserve.index.filters import ItemFilter

LEXICAL = "lexical"  # the folder inside a version folder
IDS = "ids.json"
SELECTIONS_KEPT = 32  # the row masks of this many filters are kept (an index is never changed once loaded)

_WORD = re.compile(r"[^\W_]+(?:[-/._][^\W_]+)*")
_JOINER = re.compile(r"[-/._]")
_DIGITS_THEN_LETTERS = re.compile(r"(?<=\d)(?=[^\W\d_])")


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of an item's text or a query (see the module doc)."""
    tokens: list[str] = []
    for word in _WORD.findall(text.lower()):
        found = [word]
        parts = _JOINER.split(word)
        if len(parts) > 1:
            found.append("".join(parts))
            found.extend(parts)
        for part in parts:
            found.extend(_DIGITS_THEN_LETTERS.split(part))
        tokens.extend(dict.fromkeys(token for token in found if token))
    return tokens


def item_text(title: str, extras: Mapping | None) -> str:
    """What BM25 indexes of an item: title, brand, description and attribute values (strings and numbers)."""
    extras = extras or {}
    parts = [title, extras.get("brand") or "", extras.get("text") or ""]
    for value in (extras.get("attributes") or {}).values():
        if not isinstance(value, bool):
            parts.append(str(value))
    return " ".join(part for part in parts if part)


class LexicalRetriever(Protocol):
    def search(self, query: str, k: int, where: ItemFilter | None = None) -> list[tuple[str, float]]:
        """Up to k (id, BM25 score) pairs, best first, of the items that share a token with `query`; with `where`,
        only items whose catalog fields match it (the filter applies inside retrieval)."""
        ...


def tokens_text(text: str) -> str:
    """`text`'s tokens joined by spaces: what a whitespace analyzer (Milvus's) splits back into the same tokens."""
    return " ".join(tokenize(text))


class LexicalIndex:
    """BM25 over a fixed set of items (row r is `ids[r]`), with each item's filterable fields for FILTER."""

    def __init__(self, ids: list[str], model: bm25s.BM25 | None, fields: list[dict]) -> None:
        self.ids, self.model, self.fields = ids, model, fields
        self._selected: dict[str, np.ndarray] = {}

    @classmethod
    def build(cls, titles: Mapping[str, str], extras: Mapping[str, dict]) -> LexicalIndex:
        ids = sorted(titles)
        corpus = [tokenize(item_text(titles[item], extras.get(item))) for item in ids]
        model = None
        if ids:
            model = bm25s.BM25()
            model.index(corpus, show_progress=False)
        return cls(ids, model, [filter_fields(extras.get(item)) for item in ids])

    def save(self, folder: Path) -> None:
        """Into `folder`/lexical (a version folder being staged)."""
        target = folder / LEXICAL
        target.mkdir()
        if self.model is not None:
            self.model.save(str(target), show_progress=False)
        (target / IDS).write_text(json.dumps(self.ids, ensure_ascii=False), encoding="utf-8")
        for path in target.iterdir():  # on disk before the manifest names the version (as its titles)
            fsync_path(path)

    @classmethod
    def load(cls, folder: Path, extras: Mapping[str, dict]) -> LexicalIndex | None:
        """The index saved in `folder` (a version folder), None if it has none (written before lexical search).
        `extras`: the version's items.json (what FILTER matches)."""
        target = folder / LEXICAL
        if not (target / IDS).is_file():
            return None
        ids = json.loads((target / IDS).read_text(encoding="utf-8"))
        model = bm25s.BM25.load(str(target), show_progress=False) if ids else None
        return cls(ids, model, [filter_fields(extras.get(item)) for item in ids])

    def __len__(self) -> int:
        return len(self.ids)

    def allowed_rows(self, where: ItemFilter | None) -> np.ndarray | None:
        """A 0/1 mask of the rows whose fields match `where` (None: every row), kept per filter."""
        if where is None:
            return None
        mask = self._selected.get(where.key)
        if mask is None:
            mask = np.fromiter((where.matches(found) for found in self.fields), dtype=np.float32, count=len(self.ids))
            if len(self._selected) >= SELECTIONS_KEPT:
                self._selected.clear()
            self._selected[where.key] = mask
        return mask

    def search(self, query: str, k: int, where: ItemFilter | None = None) -> list[tuple[str, float]]:
        """LexicalRetriever.search: the scores of rows `where` does not match are masked before the top is taken."""
        tokens = tokenize(query)
        if self.model is None or not tokens:
            return []
        scores = self.model.get_scores(tokens)
        allowed_rows = self.allowed_rows(where)
        if allowed_rows is not None:
            scores = np.where(allowed_rows > 0, scores, 0.0)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        hits = hits[np.lexsort((hits, -scores[hits]))]  # best first; ties by row
        return [(self.ids[row], float(scores[row])) for row in hits]
