"""What a correct answer from embed, rank and classify looks like.

Each check takes the response's outputs by name (numpy arrays, decoded the same way for HTTP and gRPC) and raises
WrongAnswer naming the output and the rule it breaks; the users report that as a failed request. Plain numpy, no
Locust, so the rules can be tested on their own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Unit norm as served (FP32, normalised inside the ONNX graph) is exact to about 1e-6.
NORM_TOLERANCE = 1e-3
# Cosine similarities lie in [-1, 1]; FP32 rounding may step just outside.
COSINE_LIMIT = 1.0 + 1e-3


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
    embeddings = _finite("EMBEDDING", _output(outputs, "EMBEDDING", (texts, None)))
    error = float(np.max(np.abs(np.linalg.norm(embeddings, axis=1) - 1.0)))
    if error > NORM_TOLERANCE:
        raise WrongAnswer(f"EMBEDDING: a row's norm is off from 1 by {error:.3g} (unit vectors expected)")


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
