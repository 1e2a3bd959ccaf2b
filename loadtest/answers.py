"""What a correct answer from embed, rank, classify, search and similar looks like, from Triton and from the HTTP API.

Triton's checks take the response's outputs by name (numpy arrays, decoded the same way for HTTP and gRPC); the API's
take the parsed JSON body (OpenAI's /v1/embeddings and /v1/models, Cohere's /v1/rerank, ecomserve's /v1/search and
/v1/similar). Each raises WrongAnswer
naming the output or field and the rule it breaks; the users report that as a failed request. Plain numpy, no
Locust, so the rules can be tested on their own."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Unit norm as served (FP32, normalised inside the ONNX graph) is exact to about 1e-6.
NORM_TOLERANCE = 1e-3
# Cosine similarities lie in [-1, 1]; FP32 rounding may step just outside.
COSINE_LIMIT = 1.0 + 1e-3
# Cohere's relevance_score lies in [0, 1] (ecomserve reports a cosine c as (c + 1) / 2).
RELEVANCE_TOLERANCE = 1e-3


class WrongAnswer(Exception):
    """The server answered, but not with what the public API promises."""


def _output(outputs: Mapping[str, np.ndarray], name: str, shape: Sequence[int | None]) -> np.ndarray:
    """The output `name`, checked against `shape` (None: any positive size)."""
    if name not in outputs:
        raise WrongAnswer(f"{name}: missing from the response (got {sorted(outputs)})")
    value = np.asarray(outputs[name])
    expected = "[" + ", ".join("D" if size is None else str(size) for size in shape) + "]"
    if value.ndim != len(shape) or any(
        (actual == 0) if size is None else (actual != size) for actual, size in zip(value.shape, shape)
    ):
        raise WrongAnswer(f"{name}: shape {list(value.shape)}, expected {expected}")
    if value.size == 0:
        raise WrongAnswer(f"{name}: empty")
    return value


def _vector(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """The output `name`, one-dimensional and possibly empty (search's IDS when nothing matches)."""
    if name not in outputs:
        raise WrongAnswer(f"{name}: missing from the response (got {sorted(outputs)})")
    value = np.asarray(outputs[name])
    if value.ndim != 1:
        raise WrongAnswer(f"{name}: shape {list(value.shape)}, expected [k]")
    return value


def _finite(name: str, value: np.ndarray) -> np.ndarray:
    value = value.astype(np.float64)
    if not np.all(np.isfinite(value)):
        raise WrongAnswer(f"{name}: {int(np.sum(~np.isfinite(value)))} NaN or infinite values")
    return value


def _cosines(name: str, value: np.ndarray) -> None:
    worst = float(np.max(np.abs(_finite(name, value))))
    if worst > COSINE_LIMIT:
        raise WrongAnswer(f"{name}: |score| {worst:.4f} is not a cosine similarity")


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def check_embeddings(outputs: Mapping[str, np.ndarray], texts: int) -> None:
    """embed: EMBEDDING is [texts, D], finite, every row a unit vector."""
    _unit_rows("EMBEDDING", _output(outputs, "EMBEDDING", (texts, None)))


def _unit_rows(name: str, value: np.ndarray) -> None:
    error = float(np.max(np.abs(np.linalg.norm(_finite(name, value), axis=1) - 1.0)))
    if error > NORM_TOLERANCE:
        raise WrongAnswer(f"{name}: a row's norm is off from 1 by {error:.3g} (unit vectors expected)")


def check_scores(outputs: Mapping[str, np.ndarray], candidates: int) -> None:
    """rank: one fused SCORE per candidate and an [encoders, candidates] ENCODER_SCORES, all cosines."""
    _cosines("SCORES", _output(outputs, "SCORES", (candidates,)))
    _cosines("ENCODER_SCORES", _output(outputs, "ENCODER_SCORES", (None, candidates)))


def check_classification(outputs: Mapping[str, np.ndarray], labels: Sequence[str]) -> None:
    """classify: LABEL is one of the labels sent, VOTES and SCORES have one entry per label."""
    label = _text(_output(outputs, "LABEL", (1,))[0])
    if label not in labels:
        raise WrongAnswer(f"LABEL: {label!r} is not one of the {len(labels)} labels sent")
    votes = _output(outputs, "VOTES", (len(labels),))
    if np.any(votes < 0) or int(np.sum(votes)) < 1:
        raise WrongAnswer(f"VOTES: {votes.tolist()} (at least one vote, none negative, expected)")
    _cosines("SCORES", _output(outputs, "SCORES", (len(labels),)))


@dataclass(frozen=True)
class Hits:
    """What a right `search` or `similar` answer holds, best first: at most top_k distinct ids of catalog items
    that the FILTER sent selects (`matching`: the whole catalog without one), never one of `excluded` (similar's
    ITEM_IDS); exactly min(top_k, those items) of them unless `exact` is off (lexical: only items sharing a token
    with the query come back)."""

    top_k: int
    catalog: Mapping[str, str] = field(repr=False)  # id → title, every item of the indexed catalog
    matching: frozenset[str] = field(repr=False)
    excluded: frozenset[str] = frozenset()
    exact: bool = True
    cosines: bool = False  # dense search and similar: SCORES are cosines

    @property
    def most(self) -> int:
        return min(self.top_k, len(self.matching - self.excluded))


def check_hits(outputs: Mapping[str, np.ndarray], hits: Hits) -> None:
    """search, similar: IDS and SCORES of the same length k, as `hits` describes them."""
    ids, scores = _vector(outputs, "IDS"), _vector(outputs, "SCORES")
    if scores.size != ids.size:
        raise WrongAnswer(f"SCORES: {scores.size} scores for {ids.size} IDS")
    _found([_text(item) for item in ids], scores, hits, "IDS", "SCORES")


def _found(ids: list[str], scores: Sequence | np.ndarray, hits: Hits, name: str, score_name: str) -> None:
    count, most = len(ids), hits.most
    if count > hits.top_k:
        raise WrongAnswer(f"{name}: {count} results for TOP_K {hits.top_k}")
    if (count != most) if hits.exact else (count > most):
        expected = most if hits.exact else f"at most {most}"
        matching = "matching " if len(hits.matching) < len(hits.catalog) else ""
        available = f"{len(hits.matching - hits.excluded)} {matching}items"
        raise WrongAnswer(f"{name}: {count} results, expected {expected} (TOP_K {hits.top_k}, {available})")
    seen: set[str] = set()
    for position, item in enumerate(ids):
        where = f"{name}[{position}]"
        if item in hits.excluded:
            raise WrongAnswer(f"{where}: {item[:40]!r} is one of the items asked about (ITEM_IDS)")
        if item not in hits.catalog:
            raise WrongAnswer(f"{where}: {item[:40]!r} is not an item of the catalog")
        if item not in hits.matching:
            raise WrongAnswer(f"{where}: {item!r} does not match the FILTER sent")
        if item in seen:
            raise WrongAnswer(f"{where}: {item!r} again")
        seen.add(item)
    if count:
        values = _finite(score_name, np.asarray(scores))
        if hits.cosines:
            _cosines(score_name, values)
        if np.any(np.diff(values) > 0):
            raise WrongAnswer(f"{score_name}: not sorted, best first")


# The HTTP API: parsed JSON bodies. Field paths in the messages are written as in the body: data[2].index.


def _field(body, key: str, kinds: type | tuple[type, ...], where: str = ""):
    """body[key], which must be one of `kinds` (a JSON true or false is not a number)."""
    name = f"{where}.{key}" if where else key
    if not isinstance(body, dict):
        raise WrongAnswer(f"{where or 'body'}: {type(body).__name__}, expected a JSON object")
    if key not in body:
        raise WrongAnswer(f"{name}: missing")
    value, kinds = body[key], kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise WrongAnswer(f"{name}: {type(value).__name__} {repr(value)[:40]}, expected {expected}")
    return value


def _constant(body, key: str, expected: str, where: str = "") -> None:
    value = _field(body, key, str, where)
    if value != expected:
        raise WrongAnswer(f"{f'{where}.' if where else ''}{key}: {value[:40]!r}, expected {expected!r}")


def _name(body, key: str, where: str = "") -> str:
    value = _field(body, key, str, where)
    if not value.strip():
        raise WrongAnswer(f"{f'{where}.' if where else ''}{key}: empty")
    return value


def _embedding(item, encoding_format: str, where: str) -> np.ndarray:
    """One data[i].embedding: a list of numbers, or with encoding_format base64 the float32 little-endian bytes."""
    name = f"{where}.embedding"
    if encoding_format == "base64":
        encoded = _field(item, "embedding", str, where)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WrongAnswer(f"{name}: not base64 ({exc})") from None
        if len(raw) % 4:
            raise WrongAnswer(f"{name}: {len(raw)} bytes, not a whole number of float32 values")
        row = np.frombuffer(raw, dtype="<f4")
    else:
        row = np.asarray(_field(item, "embedding", list, where))
        if row.ndim != 1 or (row.size and row.dtype.kind not in "if"):
            raise WrongAnswer(f"{name}: expected a flat list of numbers (encoding_format {encoding_format})")
    if row.size == 0:
        raise WrongAnswer(f"{name}: empty")
    return row.astype(np.float64)


def check_api_models(body) -> list[str]:
    """GET /v1/models (OpenAI): a non-empty list of models, each with an id; returns the ids in order."""
    _constant(body, "object", "list")
    data = _field(body, "data", list)
    if not data:
        raise WrongAnswer("data: no models listed")
    ids = []
    for position, item in enumerate(data):
        where = f"data[{position}]"
        _constant(item, "object", "model", where)
        ids.append(_name(item, "id", where))
    return ids


def check_api_embeddings(body, texts: int, encoding_format: str = "float") -> None:
    """POST /v1/embeddings (OpenAI): one embedding per input, data[i].index == i (the inputs' order), every one a unit
    vector of the same size, the model named and the tokens counted (at least one per input)."""
    _constant(body, "object", "list")
    data = _field(body, "data", list)
    if len(data) != texts:
        raise WrongAnswer(f"data: {len(data)} embeddings for {texts} inputs")
    rows = []
    for position, item in enumerate(data):
        where = f"data[{position}]"
        _constant(item, "object", "embedding", where)
        index = _field(item, "index", int, where)
        if index != position:
            raise WrongAnswer(f"{where}.index: {index}, expected {position} (the inputs' order)")
        rows.append(_embedding(item, encoding_format, where))
    sizes = sorted({row.size for row in rows})
    if len(sizes) > 1:
        raise WrongAnswer(f"data[].embedding: sizes {sizes} in one answer")
    _unit_rows("data[].embedding", np.stack(rows))
    _name(body, "model")
    usage = _field(body, "usage", dict)
    prompt, total = (_field(usage, key, int, "usage") for key in ("prompt_tokens", "total_tokens"))
    if prompt < texts:
        raise WrongAnswer(f"usage.prompt_tokens: {prompt} for {texts} inputs (at least one token each)")
    if total != prompt:
        raise WrongAnswer(f"usage.total_tokens: {total}, expected prompt_tokens ({prompt}): embeddings generate none")


def _outside(relevance: np.ndarray) -> float:
    return float(relevance[np.argmax(np.maximum(-relevance, relevance - 1))])


def check_api_rerank(body, documents: Sequence[str], top_n: int, return_documents: bool = False) -> None:
    """POST /v1/rerank (Cohere): min(top_n, documents) results, each a distinct document index with a relevance_score
    in [0, 1], highest first (with return_documents, the document's text as sent), an id and a meta object."""
    _name(body, "id")
    results = _field(body, "results", list)
    expected = min(top_n, len(documents))
    if len(results) != expected:
        raise WrongAnswer(
            f"results: {len(results)} results, expected {expected} (top_n {top_n}, {len(documents)} documents)"
        )
    seen, scores = set(), []
    for position, result in enumerate(results):
        where = f"results[{position}]"
        index = _field(result, "index", int, where)
        if not 0 <= index < len(documents):
            raise WrongAnswer(f"{where}.index: {index}, not one of the {len(documents)} documents sent")
        if index in seen:
            raise WrongAnswer(f"{where}.index: {index} again (every document ranked once)")
        seen.add(index)
        scores.append(_field(result, "relevance_score", (int, float), where))
        if return_documents:
            text = _field(_field(result, "document", dict, where), "text", str, f"{where}.document")
            if text != documents[index]:
                raise WrongAnswer(f"{where}.document.text: not the text of document {index} as sent")
    if scores:
        relevance = _finite("results[].relevance_score", np.asarray(scores))
        if np.any(relevance < -RELEVANCE_TOLERANCE) or np.any(relevance > 1 + RELEVANCE_TOLERANCE):
            raise WrongAnswer(f"results[].relevance_score: {_outside(relevance):.4f} is outside [0, 1]")
    if any(higher < lower for higher, lower in zip(scores, scores[1:])):
        raise WrongAnswer("results: not sorted by relevance_score, highest first")
    _field(body, "meta", dict)


def check_api_hits(body, hits: Hits) -> None:
    """POST /v1/search, /v1/similar (ecomserve): results of {id, score, title}, the title the catalog's, as `hits`
    describes them; the model named."""
    _constant(body, "object", "list")
    _name(body, "model")
    results = _field(body, "results", list)
    ids, scores = [], []
    for position, result in enumerate(results):
        where = f"results[{position}]"
        item = _field(result, "id", str, where)
        scores.append(_field(result, "score", (int, float), where))
        title = _field(result, "title", str, where)
        if item in hits.catalog and title != hits.catalog[item]:
            raise WrongAnswer(f"{where}.title: {title[:40]!r} is not the catalog's title of {item!r}")
        ids.append(item)
    _found(ids, scores, hits, "results[].id", "results[].score")
