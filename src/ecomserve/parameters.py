"""Typed parameters of the python-backend models, one dataclass per kind of model: the repository
builder writes them into each config's `parameters` (`ecomserve.repository.configs`) and the models
read them back (`ecomserve.serving_models`), so both sides share the keys, their types and defaults.

In the config every field is one parameter's string_value: a str as itself, anything else as JSON (a
list of dataclasses as a list of objects). A field with a default may be missing from a config: the
repository was built before the parameter existed. `fusion`, `voting`, `limits` and `search` are the
spec sections' `model_dump()`, kept as dicts: the models read a few keys (search validates its section
with `ecomserve.spec.SearchSpec`), and the stubs of the other models need not import pydantic."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Self

from ecomserve.fusion import EncoderSlice


@dataclass(frozen=True, kw_only=True)
class ModelParameters:
    def to_parameters(self) -> dict[str, str]:
        """The config's parameters: field name → string_value, in field order."""
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict) -> Self:
        """From the model config Triton hands a python model (`args["model_config"]`, parsed)."""
        given, hints, values = config.get("parameters", {}), typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                values[f.name] = _decode(given[f.name]["string_value"], hints[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f"model config parameter '{f.name}' is missing (rebuild the repository)")
        return cls(**values)


def _encode(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        value = [dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item for item in value]
    return json.dumps(value)


def _decode(text: str, hint: Any) -> object:
    if hint is str:
        return text
    value = json.loads(text)
    (item,) = typing.get_args(hint) if typing.get_origin(hint) is list else (None,)
    if dataclasses.is_dataclass(item):
        return [item(**entry) for entry in value]
    return value


@dataclass(frozen=True, kw_only=True)
class TokenizerParameters(ModelParameters):
    """`<name>_tokenizer` (split layout)."""

    max_seq_len: int
    max_text_bytes: int
    pad_to_multiple: int = 1
    prompt_bytes: int = 0  # allowed beyond max_text_bytes: room for a prompt the heads put before a text


@dataclass(frozen=True, kw_only=True)
class EncoderParameters(ModelParameters):
    """`<name>_encoder` on the cpu target (the GPU targets run Triton's own backends)."""

    runtime: str
    model_file: str  # in the model's version folder
    intra_op_threads: int
    idle_threads: int | None = None  # serving_models/cpu_share.py
    pin_cores: bool = True  # serving_models/cpu_share.py
    spread_batches: bool = False  # serving_models/cpu_share.py; False in repositories built before it existed
    device: str = "cpu"


@dataclass(frozen=True)
class EmbedderEncoder:
    """One encoder of the fused layout's `embedder`; its files are in <version>/<name>/."""

    name: str
    dim: int
    weight: float
    runtime: str
    model_file: str
    max_seq_len: int


@dataclass(frozen=True, kw_only=True)
class EmbedderParameters(ModelParameters):
    """`embedder` (fused layout): every encoder, then fusion."""

    encoders: list[EmbedderEncoder]
    intra_op_threads: int
    idle_threads: int | None = None  # serving_models/cpu_share.py
    pin_cores: bool = True  # serving_models/cpu_share.py
    spread_batches: bool = False  # serving_models/cpu_share.py; False in repositories built before it existed
    device: str = "cpu"
    max_text_bytes: int
    prompt_bytes: int = 0  # allowed beyond max_text_bytes: room for a prompt the heads put before a text

    @property
    def slices(self) -> list[EncoderSlice]:
        return [EncoderSlice(e.name, e.dim, e.weight) for e in self.encoders]


@dataclass(frozen=True, kw_only=True)
class FusionParameters(ModelParameters):
    """`fusion` (split layout) and the heads `rank` and `classify`: each encoder's slice of the fused
    embedding, how to combine scores and votes, the request limits, the chunk size for `embed`, the
    query and passage prompts (`rank` and `search` use them)."""

    encoders: list[EncoderSlice]
    fusion: dict[str, Any]  # spec.fusion: mode, rrf_k
    voting: dict[str, Any]  # spec.voting: mode
    limits: dict[str, Any]  # spec.limits: max_text_bytes, max_candidates, max_labels, …
    embed_batch: int
    prompts: dict[str, str] = field(default_factory=dict)  # spec.prompts: query, passage (only those set)


@dataclass(frozen=True, kw_only=True)
class SearchParameters(FusionParameters):
    """`search`: the heads' parameters, its spec section and the layout it embeds queries with."""

    search: dict[str, Any]  # spec.search, validated by the model with ecomserve.spec.SearchSpec
    layout: str
