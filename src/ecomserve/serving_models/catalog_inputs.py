"""The optional inputs `search` and `similar` share: TOP_K and FILTER, read and checked the same way."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ecomserve.contract import FILTER, TOP_K
from ecomserve.errors import InvalidInput
from ecomserve.index.filters import ItemFilter, parse_filter
from ecomserve.spec import SearchSpec


def top_k_input(request, search: SearchSpec) -> int:
    """TOP_K: default search.top_k, one value from 1 to search.max_top_k."""
    tensor = pb_utils.get_input_tensor_by_name(request, TOP_K)
    if tensor is None:
        return search.top_k
    values = tensor.as_numpy().reshape(-1)
    top_k = int(values[0]) if values.size == 1 else -1
    if not 1 <= top_k <= search.max_top_k:
        raise InvalidInput(
            f"TOP_K: got {values.tolist()}, expected one value from 1 to {search.max_top_k} (search.max_top_k)"
        )
    return top_k


def filter_input(request) -> ItemFilter | None:
    """FILTER: one JSON object over catalog fields (ecomserve.index.filters), or none."""
    tensor = pb_utils.get_input_tensor_by_name(request, FILTER)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidInput(f"FILTER: expected one JSON object, got {values.size} values")
    value = values[0]
    return parse_filter(value if isinstance(value, bytes) else str(value))
