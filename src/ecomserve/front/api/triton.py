"""The public Triton models as the API calls them: tritonclient's asyncio gRPC client on Triton's
private socket, behind the front's admission budget (its refusals are the app's to map), with Triton's
status codes mapped to API reasons (UNAVAILABLE, a full queue, is 429 with Retry-After)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from ecomserve.client import bytes_input, catalog_inputs
from ecomserve.contract import (
    CANDIDATES,
    CLASSIFY,
    EMBED,
    EMBEDDING,
    IDS,
    ITEM_IDS,
    LABEL,
    LABELS,
    QUERY,
    RANK,
    SCORES,
    SEARCH,
    SIMILAR,
    TEXT,
    TITLES,
    VOTES,
)
from ecomserve.front.admission import Admission
from ecomserve.front.api.errors import ApiError, Reason

_REASONS = {
    "StatusCode.INVALID_ARGUMENT": Reason.INVALID,
    "StatusCode.NOT_FOUND": Reason.NOT_FOUND,
    "StatusCode.UNAVAILABLE": Reason.OVERLOADED,
    "StatusCode.RESOURCE_EXHAUSTED": Reason.BODY_TOO_LARGE,
    "StatusCode.DEADLINE_EXCEEDED": Reason.TIMEOUT,
}


@dataclass(frozen=True)
class Classified:
    label: str
    votes: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Found:
    ids: list[str]
    scores: np.ndarray
    titles: list[str]


def _texts(name: str, texts: list[str], shape: list[int]) -> grpcclient.InferInput:
    return bytes_input(grpcclient, name, texts, shape)


class TritonModels:
    def __init__(self, target: str, admission: Admission, timeout_s: float, max_batch: int):
        self._target, self._admission, self._timeout_s, self._max_batch = target, admission, timeout_s, max_batch
        self._width: int | None = None

    async def open(self) -> None:
        # Created inside the event loop: grpc.aio channels belong to the loop that made them.
        self._client = grpcclient.InferenceServerClient(
            self._target, channel_args=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )

    async def close(self) -> None:
        await self._client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=2))
        except InferenceServerException:
            return False

    async def width(self) -> int:
        """The `EMBEDDING` width (the fused width with several encoders)."""
        if self._width is None:
            metadata = await self._call(self._client.get_model_metadata(EMBED, as_json=True))
            self._width = int(next(o for o in metadata["outputs"] if o["name"] == EMBEDDING)["shape"][-1])
        return self._width

    async def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), D], in requests of at most `embed`'s max_batch_size, run concurrently."""
        step = self._max_batch
        chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
        async with self._admission.admit(len(texts)):
            parts = await asyncio.gather(*(self._embed_chunk(chunk) for chunk in chunks))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        result = await self._infer(EMBED, [_texts(TEXT, texts, [len(texts), 1])], [EMBEDDING])
        return result.as_numpy(EMBEDDING)

    async def rank(self, query: str, candidates: list[str]) -> np.ndarray:
        inputs = [_texts(QUERY, [query], [1]), _texts(CANDIDATES, candidates, [len(candidates)])]
        async with self._admission.admit(1 + len(candidates)):
            return (await self._infer(RANK, inputs, [SCORES])).as_numpy(SCORES)

    async def classify(self, text: str, labels: list[str]) -> Classified:
        inputs = [_texts(TEXT, [text], [1]), _texts(LABELS, labels, [len(labels)])]
        async with self._admission.admit(1 + len(labels)):
            result = await self._infer(CLASSIFY, inputs, [LABEL, VOTES, SCORES])
        return Classified(result.as_numpy(LABEL)[0].decode(), result.as_numpy(VOTES), result.as_numpy(SCORES))

    async def search(self, query: str, top_k: int | None, where: dict | None = None, mode: str | None = None) -> Found:
        inputs = catalog_inputs(grpcclient, [_texts(QUERY, [query], [1])], top_k, where, mode)
        return await self._catalog(SEARCH, inputs, 1)

    async def similar(
        self, ids: list[str], top_k: int | None, where: dict | None = None, diversity: float | None = None
    ) -> Found:
        # Costs one per id, as the KServe front counts BYTES elements.
        inputs = catalog_inputs(grpcclient, [_texts(ITEM_IDS, ids, [len(ids)])], top_k, where, diversity=diversity)
        return await self._catalog(SIMILAR, inputs, len(ids))

    async def _catalog(self, model: str, inputs: list, cost: int) -> Found:
        """`search` or `similar`: IDS, SCORES and TITLES."""
        async with self._admission.admit(cost):
            result = await self._infer(model, inputs, [IDS, SCORES, TITLES])
        ids, titles = ([v.decode() for v in result.as_numpy(name)] for name in (IDS, TITLES))
        return Found(ids, result.as_numpy(SCORES), titles)

    async def _infer(self, model: str, inputs: list, outputs: list[str]):
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        return await self._call(self._client.infer(model, inputs, outputs=requested, client_timeout=self._timeout_s))

    @staticmethod
    async def _call(pending):
        try:
            return await pending
        except InferenceServerException as exc:
            status, message = exc.status() or "", exc.message() or str(exc)
            if status == "StatusCode.UNAVAILABLE" and "connect" in message.lower():
                raise ApiError(Reason.UNAVAILABLE, "the models are not reachable (starting or restarting)") from None
            raise ApiError(_REASONS.get(status, Reason.BACKEND), message) from None
