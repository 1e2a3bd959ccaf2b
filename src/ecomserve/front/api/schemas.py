"""Request bodies of every endpoint, in each peer's own schema (pydantic). OpenAI's endpoint refuses
unknown fields, as OpenAI does ("Unrecognized request argument"); the others ignore fields they do not
use, as TEI and Cohere do (their SDKs send optional fields such as `max_chunks_per_doc`)."""

from __future__ import annotations

from typing import Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ecomserve.front.api.errors import ApiError, Reason

TextOrTexts = str | list[str]
Body = TypeVar("Body", bound=BaseModel)


class _Ignoring(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _direction(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


class EmbeddingsRequest(_Strict):
    """OpenAI `POST /v1/embeddings`; `input_type` and `truncate` as NVIDIA's retrieval APIs name them."""

    input: TextOrTexts
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)
    input_type: Literal["query", "passage"] | None = None
    truncate: bool | Literal["NONE", "START", "END"] = True

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: object) -> object:
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise ValueError(
                "token arrays are not accepted (they are OpenAI tokenizer ids, not this model's): send strings; "
                "LangChain's OpenAIEmbeddings sends them unless check_embedding_ctx_length=False"
            )
        return value


class RerankDocument(_Ignoring):
    text: str


class RerankRequest(_Ignoring):
    """Cohere `POST /v1/rerank` and `/v2/rerank` (Jina's rerank has the same fields)."""

    query: str
    documents: list[str | RerankDocument]
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False


class TeiEmbedRequest(_Ignoring):
    inputs: TextOrTexts
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["left", "right"] = "right"
    prompt_name: str | None = None
    dimensions: int | None = Field(None, ge=1)

    _lower = field_validator("truncation_direction", mode="before")(_direction)


class TeiRerankRequest(_Ignoring):
    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: Literal["left", "right"] = "right"
    raw_scores: bool = False
    return_text: bool = False

    _lower = field_validator("truncation_direction", mode="before")(_direction)


class TeiTokenizeRequest(_Ignoring):
    inputs: TextOrTexts
    add_special_tokens: bool = True
    prompt_name: str | None = None


class SearchRequest(_Strict):
    query: str
    top_k: int | None = Field(None, ge=1)
    filter: dict | None = None  # FILTER: the search model checks it (ecomserve.index.filters)
    mode: str | None = None  # MODE: hybrid | dense | lexical; the search model checks it
    model: str | None = None


class SimilarRequest(_Strict):
    """`POST /v1/similar`: one item, or a shopper's recent items, most recent last."""

    ids: list[str] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    filter: dict | None = None  # FILTER: the similar model checks it (ecomserve.index.filters)
    diversity: float | None = None  # DIVERSITY (MMR): the similar model checks it
    model: str | None = None


class ClassifyRequest(_Strict):
    text: str
    labels: list[str]
    model: str | None = None


def parse(schema: type[Body], body: bytes) -> Body:
    """`body` as `schema`; errors name the field. orjson parses first: it refuses invalid UTF-8, lone
    surrogates and nesting past 1,024 levels, so no text reaches a model that Triton's rules would not."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(Reason.INVALID, f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(Reason.INVALID, "body must be a JSON object")
    try:
        return schema.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        problem = "unrecognized request argument" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ApiError(Reason.INVALID, f"{field}: {problem}{more}", param=field) from None


def as_list(texts: TextOrTexts) -> list[str]:
    return [texts] if isinstance(texts, str) else texts
