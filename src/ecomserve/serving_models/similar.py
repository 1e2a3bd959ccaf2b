"""similar: ITEM_IDS (+ optional TOP_K, FILTER) → IDS, SCORES (and the items' TITLES): similar items and
recommendations from the catalog index, best first, never one of the ITEM_IDS. FILTER is `search`'s
(ecomserve.index.filters), applied inside the index search.

Nothing is embedded at request time: the items' stored vectors are read from the index (`VectorIndex.vectors`)
and combined with recency weights into one profile (ecomserve.index.history: wᵢ = 0.5^(aᵢ / half_life), aᵢ =
how many items came after item i, renormalised), which the index is searched with. The inputs are excluded by
asking for TOP_K + their count and dropping them. With DIVERSITY d > 0 (default: the spec's search.diversity) the
answer is picked from the top search.diversity_candidates by maximal marginal relevance (history.diverse_order):
SCORES stay each item's cosine to the profile, in the picked order, so they need not decrease. The index is the
live version the `search` model answers from:
its manifest is looked at every 0.25 s and the version it names loaded whole (ecomserve.index.loading.LiveIndex).
An id the live version does not hold is refused (INVALID_ARGUMENT) naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ecomserve.contract import IDS, ITEM_IDS, SCORES, TITLES
from ecomserve.errors import InvalidInput
from ecomserve.index.history import diverse_order, history_profile
from ecomserve.index.loading import LiveIndex
from ecomserve.index.milvus_index import milvus_token
from ecomserve.index.vector_index import ID_MAX_BYTES, MissingIds
from ecomserve.parameters import SearchParameters
from ecomserve.serving_models.base import (
    Unavailable,
    bytes_array,
    input_array,
    model_config,
    output,
    respond_each,
)
from ecomserve.serving_models.catalog_inputs import diversity_input, filter_input, top_k_input
from ecomserve.spec import SearchSpec

_SHOWN_UNKNOWN = 20  # unknown ids named in one error message


def item_ids(values: np.ndarray, max_history: int) -> list[str]:
    """ITEM_IDS as strings: 1 to `max_history` of them, each valid UTF-8 of 1 to ID_MAX_BYTES bytes."""
    values = np.asarray(values, dtype=np.object_).reshape(-1)
    if not 1 <= values.size <= max_history:
        raise InvalidInput(f"ITEM_IDS: got {values.size} ids, expected 1 to {max_history} (search.max_history)")
    ids = []
    for position, value in enumerate(values):
        raw = value if isinstance(value, bytes) else str(value).encode()
        if not raw:
            raise InvalidInput(f"ITEM_IDS[{position}]: the id is empty")
        if len(raw) > ID_MAX_BYTES:
            raise InvalidInput(f"ITEM_IDS[{position}]: the id is {len(raw)} bytes, over the limit of {ID_MAX_BYTES}")
        try:
            ids.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"ITEM_IDS[{position}]: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    return ids


def unknown_ids_error(unknown: list[str]) -> InvalidInput:
    more = f" and {len(unknown) - _SHOWN_UNKNOWN} more" if len(unknown) > _SHOWN_UNKNOWN else ""
    return InvalidInput(f"ITEM_IDS: unknown item ids {unknown[:_SHOWN_UNKNOWN]}{more}: not in the catalog index")


class TritonPythonModel:
    def initialize(self, args):
        parameters = SearchParameters.from_config(model_config(args))
        self.search = SearchSpec.model_validate(parameters.search)
        folder = Path(self.search.index_dir)
        index_dir = folder if folder.is_absolute() else Path(args["model_repository"]).parents[1] / folder
        if self.search.backend == "milvus":
            milvus_token(self.search.milvus, index_dir.parent)  # a missing token fails the load, not a request
        self.live = LiveIndex(self.search, index_dir)

    def execute(self, requests):
        return respond_each(requests, self._handle)

    def _handle(self, request):
        ids = item_ids(input_array(request, ITEM_IDS), self.search.max_history)
        top_k = top_k_input(request, self.search)
        where = filter_input(request)
        diversity = diversity_input(request, self.search)
        self.live.refresh()
        index, titles = self.live.index, self.live.titles
        if index is None:
            raise Unavailable(f"no catalog index at {self.live.target}: run `ecomserve index build CATALOG`")
        inputs = list(dict.fromkeys(ids))
        unknown = [item for item in inputs if item not in titles]
        if unknown:
            raise unknown_ids_error(unknown)
        try:
            vectors = index.vectors(ids)
        except MissingIds as exc:  # Milvus: deleted from the collection ahead of the next version's titles
            raise unknown_ids_error(exc.missing) from None
        profile = history_profile(vectors, self.search.history_half_life)
        excluded = set(inputs)
        wanted = max(top_k, self.search.diversity_candidates) if diversity > 0 else top_k
        hits = index.search(profile[None, :], wanted + len(excluded), where=where)[0]
        found = [(item, score) for item, score in hits if item not in excluded and item in titles][:wanted]
        if diversity > 0 and len(found) > 1:
            candidates = index.vectors([item for item, _ in found])
            found = [found[row] for row in diverse_order([s for _, s in found], candidates, top_k, diversity)]
        found = found[:top_k]
        found_ids = [item for item, _ in found]
        return pb_utils.InferenceResponse(
            output_tensors=[
                output(IDS, bytes_array(found_ids)),
                output(SCORES, np.asarray([score for _, score in found], np.float32)),
                output(TITLES, bytes_array([titles[item] for item in found_ids])),
            ]
        )
