"""The optional inputs of `search` and `similar`: TOP_K and FILTER (both), read and checked the same way, and
DIVERSITY (`similar`)."""

from __future__ import annotations

import math

import triton_python_backend_utils as pb_utils

from ecomserve.contract import DIVERSITY, FILTER, TOP_K
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


def diversity_input(request, search: SearchSpec) -> float:
    """DIVERSITY: default search.diversity, one value from 0 to 1."""
    tensor = pb_utils.get_input_tensor_by_name(request, DIVERSITY)
    if tensor is None:
        return search.diversity
    values = tensor.as_numpy().reshape(-1)
    diversity = float(values[0]) if values.size == 1 else math.nan
    if not 0 <= diversity <= 1:  # NaN fails too
        raise InvalidInput(f"DIVERSITY: got {values.tolist()[:4]}, expected one value from 0 to 1")
    return diversity


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
