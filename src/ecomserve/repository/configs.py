"""Triton model configs built as typed protobuf messages from the spec; never written by hand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from ecomserve import contract
from ecomserve.contract import (
    ATTENTION_MASK,
    CANDIDATES,
    CLASSIFY,
    DIVERSITY,
    EMBED,
    EMBEDDER,
    EMBEDDING,
    ENCODER_SCORES,
    FILTER,
    FUSION,
    IDS,
    INPUT_IDS,
    ITEM_IDS,
    LABEL,
    LABELS,
    MODE,
    QUERY,
    RANK,
    SCORES,
    SEARCH,
    SIMILAR,
    TEXT,
    TITLES,
    TOP_K,
    VOTES,
)
from ecomserve.export.tensorrt import PLAN_FILE, profile
from ecomserve.fusion import EncoderSlice
from ecomserve.parameters import (
    EmbedderEncoder,
    EmbedderParameters,
    EncoderParameters,
    FusionParameters,
    ModelParameters,
    SearchParameters,
    TokenizerParameters,
)
from ecomserve.prompts import prompt_bytes
from ecomserve.runtime import ENCODER_INPUTS, ENCODER_OUTPUT, MODEL_FILES
from ecomserve.spec import GPU_TARGETS, EncoderSpec, PipelineSpec

# The model and tensor names are ecomserve.contract's. The fused layout's one python model is EMBEDDER;
# `embed` stays an ensemble in front of it because Triton 2.51's
# response cache stores a python model's error response as an empty success (seen: a second identical
# bad request got 200 with no outputs), while an ensemble caches only successful responses.
PYTHON_BACKEND = "python"
# Warm-up input files live in <model>/warmup/ as Triton expects.
WARMUP_TEXT_FILE = "text"
WARMUP_IDS_FILE = "input_ids"
WARMUP_MASK_FILE = "attention_mask"
# BLS heads await the encoders; two instances keep one slow request from blocking the next.
HEAD_INSTANCES = 2
# How each target runs an encoder model (the tokenizer, fusion and heads are python everywhere).
TENSORRT_PLATFORM, ONNXRUNTIME_PLATFORM = "tensorrt_plan", "onnxruntime_onnx"


def tokenizer_model(encoder: EncoderSpec) -> str:
    return contract.tokenizer_model(encoder.name)


def encoder_model(encoder: EncoderSpec) -> str:
    return contract.encoder_model(encoder.name)


@dataclass(frozen=True)
class BuiltEncoder:
    """What the builder learned about an exported encoder that the configs need."""

    spec: EncoderSpec
    dim: int
    warmup_tokens: int  # sequence length of the tokenized warm-up text


def to_pbtxt(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())


def _tensor(name: str, dtype: int, dims: list[int], ragged: bool = False, optional: bool = False) -> dict:
    fields = {"name": name, "data_type": dtype, "dims": dims}
    if ragged:
        fields["allow_ragged_batch"] = True
    if optional:
        fields["optional"] = True
    return fields


def _parameters(config: pb.ModelConfig, parameters: ModelParameters) -> None:
    for key, value in parameters.to_parameters().items():
        config.parameters[key].string_value = value


def _dynamic_batching(spec: PipelineSpec) -> pb.ModelDynamicBatching:
    batching, queue = spec.serving.dynamic_batching, spec.serving.queue
    return pb.ModelDynamicBatching(
        preferred_batch_size=batching.preferred_batch_size,
        max_queue_delay_microseconds=batching.max_queue_delay_us,
        default_queue_policy=pb.ModelQueuePolicy(
            max_queue_size=queue.max_queue_size,
            default_timeout_microseconds=queue.timeout_us,
            timeout_action=pb.ModelQueuePolicy.REJECT,
        ),
    )


def _cpu_instances(count: int) -> list[pb.ModelInstanceGroup]:
    return [pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_CPU, count=count)]


def _gpu_instances(count: int) -> list[pb.ModelInstanceGroup]:
    """`count` instances on every GPU Triton sees."""
    return [pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_GPU, count=count)]


def _text_warmup() -> list[pb.ModelWarmup]:
    return [
        pb.ModelWarmup(
            name="one_text",
            batch_size=1,
            inputs={TEXT: pb.ModelWarmup.Input(data_type=pb.TYPE_STRING, dims=[1], input_data_file=WARMUP_TEXT_FILE)},
        )
    ]


def tokenizer_config(spec: PipelineSpec, built: BuiltEncoder) -> pb.ModelConfig:
    config = pb.ModelConfig(
        name=tokenizer_model(built.spec),
        backend=PYTHON_BACKEND,
        max_batch_size=spec.serving.dynamic_batching.max_batch_size,
        input=[_tensor(TEXT, pb.TYPE_STRING, [1])],
        output=[_tensor(INPUT_IDS, pb.TYPE_INT64, [-1]), _tensor(ATTENTION_MASK, pb.TYPE_INT64, [-1])],
        dynamic_batching=_dynamic_batching(spec),
        instance_group=_cpu_instances(spec.serving.instances),
        model_warmup=_text_warmup(),
    )
    gpu = spec.serving.target in GPU_TARGETS
    _parameters(
        config,
        TokenizerParameters(
            max_seq_len=built.spec.max_seq_len,
            max_text_bytes=spec.limits.max_text_bytes,
            pad_to_multiple=spec.serving.gpu.pad_to_multiple if gpu else 1,
            prompt_bytes=prompt_bytes(spec.prompts),
        ),
    )
    return config


def encoder_config(spec: PipelineSpec, built: BuiltEncoder) -> pb.ModelConfig:
    """token ids → EMBEDDING, with the exported graph's tensor names on every target."""
    max_batch = spec.serving.dynamic_batching.max_batch_size
    warmup_inputs = {
        name: pb.ModelWarmup.Input(data_type=pb.TYPE_INT64, dims=[built.warmup_tokens], input_data_file=file)
        for name, file in zip(ENCODER_INPUTS, (WARMUP_IDS_FILE, WARMUP_MASK_FILE))
    }
    # The python encoder pads a ragged batch itself; Triton's GPU backends need equal shapes per batch.
    ragged = spec.serving.target == "cpu"
    config = pb.ModelConfig(
        name=encoder_model(built.spec),
        max_batch_size=max_batch,
        input=[_tensor(name, pb.TYPE_INT64, [-1], ragged=ragged) for name in ENCODER_INPUTS],
        output=[_tensor(ENCODER_OUTPUT, pb.TYPE_FP32, [built.dim])],
        dynamic_batching=_dynamic_batching(spec),
        # The warm-up runs the largest batch too, so the runtime has sized its buffers before traffic.
        model_warmup=[
            pb.ModelWarmup(name=f"batch_{size}", batch_size=size, inputs=warmup_inputs)
            for size in sorted({1, max_batch})
        ],
    )
    _ENCODER_BACKENDS[spec.serving.target](config, spec, built)
    return config


def _python_encoder(config: pb.ModelConfig, spec: PipelineSpec, built: BuiltEncoder) -> None:
    config.backend = PYTHON_BACKEND
    config.instance_group.extend(_cpu_instances(spec.serving.instances))
    _parameters(
        config,
        EncoderParameters(
            runtime=built.spec.runtime,
            model_file=MODEL_FILES[built.spec.runtime],
            intra_op_threads=spec.serving.intra_op_threads,
            idle_threads=spec.serving.idle_threads,
            pin_cores=spec.serving.pin_cores,
            spread_batches=spec.serving.spread_batches,
            device=spec.serving.device,
        ),
    )


def _tensorrt_encoder(config: pb.ModelConfig, spec: PipelineSpec, built: BuiltEncoder) -> None:
    """A plan built on the target GPU from the ONNX beside it (export/tensorrt.py)."""
    config.platform = TENSORRT_PLATFORM
    config.default_model_filename = PLAN_FILE
    config.instance_group.extend(_gpu_instances(spec.serving.gpu.instances))


def _onnxruntime_encoder(config: pb.ModelConfig, spec: PipelineSpec, built: BuiltEncoder) -> None:
    """ONNX Runtime with the TensorRT provider (engines cached on disk), CUDA for what TensorRT cannot run."""
    config.platform = ONNXRUNTIME_PLATFORM
    config.default_model_filename = MODEL_FILES["onnxruntime"]
    config.instance_group.extend(_gpu_instances(spec.serving.gpu.instances))
    gpu, shapes = spec.serving.gpu, profile(spec, built.spec)
    parameters = {
        "precision_mode": built.spec.precision.upper(),
        "max_workspace_size_bytes": str(gpu.workspace_mb << 20),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{gpu.engine_cache_dir}/{config.name}",
        "trt_timing_cache_enable": "1",
        # One profile over every shape the tokenizer can send, so no request triggers an engine rebuild.
        "trt_profile_min_shapes": shapes.shapes("min"),
        "trt_profile_opt_shapes": shapes.shapes("opt"),
        "trt_profile_max_shapes": shapes.shapes("max"),
    }
    if built.spec.precision == "fp16":
        parameters["trt_layer_norm_fp32_fallback"] = "1"
    accelerators = pb.ModelOptimizationPolicy.ExecutionAccelerators
    config.optimization.execution_accelerators.gpu_execution_accelerator.append(
        accelerators.Accelerator(name="tensorrt", parameters=parameters)
    )


_ENCODER_BACKENDS = {"cpu": _python_encoder, "tensorrt": _tensorrt_encoder, "onnxruntime": _onnxruntime_encoder}


def _fusion_parameters(spec: PipelineSpec, built: list[BuiltEncoder]) -> dict[str, Any]:
    """The heads need each encoder's slice of the fused embedding, how to combine scores and the prompts
    (FusionParameters' fields; search adds its own)."""
    return {
        "encoders": [EncoderSlice(b.spec.name, b.dim, b.spec.weight) for b in built],
        "fusion": spec.fusion.model_dump(),
        "voting": spec.voting.model_dump(),
        "limits": spec.limits.model_dump(),
        "embed_batch": spec.serving.dynamic_batching.max_batch_size,
        "prompts": spec.prompts,
    }


def fusion_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    config = pb.ModelConfig(
        name=FUSION,
        backend=PYTHON_BACKEND,
        max_batch_size=spec.serving.dynamic_batching.max_batch_size,
        input=[_tensor(f"EMBEDDING_{i}", pb.TYPE_FP32, [b.dim]) for i, b in enumerate(built)],
        output=[_tensor(EMBEDDING, pb.TYPE_FP32, [sum(b.dim for b in built)])],
        dynamic_batching=_dynamic_batching(spec),
        instance_group=_cpu_instances(1),
    )
    _parameters(config, FusionParameters(**_fusion_parameters(spec, built)))
    return config


def embedder_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    """One python model doing validation, tokenization, every encoder and fusion: no python hops."""
    config = pb.ModelConfig(
        name=EMBEDDER,
        backend=PYTHON_BACKEND,
        max_batch_size=spec.serving.dynamic_batching.max_batch_size,
        input=[_tensor(TEXT, pb.TYPE_STRING, [1])],
        output=[_tensor(EMBEDDING, pb.TYPE_FP32, [sum(b.dim for b in built)])],
        dynamic_batching=_dynamic_batching(spec),
        instance_group=_cpu_instances(spec.serving.instances),
        model_warmup=_text_warmup(),
    )
    _parameters(
        config,
        EmbedderParameters(
            encoders=[
                EmbedderEncoder(
                    name=b.spec.name,
                    dim=b.dim,
                    weight=b.spec.weight,
                    runtime=b.spec.runtime,
                    model_file=MODEL_FILES[b.spec.runtime],
                    max_seq_len=b.spec.max_seq_len,
                )
                for b in built
            ],
            intra_op_threads=spec.serving.intra_op_threads,
            idle_threads=spec.serving.idle_threads,
            pin_cores=spec.serving.pin_cores,
            spread_batches=spec.serving.spread_batches,
            device=spec.serving.device,
            max_text_bytes=spec.limits.max_text_bytes,
            prompt_bytes=prompt_bytes(spec.prompts),
        ),
    )
    return config


def _embed_ensemble(spec: PipelineSpec, built: list[BuiltEncoder], steps: list) -> pb.ModelConfig:
    return pb.ModelConfig(
        name=EMBED,
        platform="ensemble",
        max_batch_size=spec.serving.dynamic_batching.max_batch_size,
        input=[_tensor(TEXT, pb.TYPE_STRING, [1])],
        output=[_tensor(EMBEDDING, pb.TYPE_FP32, [sum(b.dim for b in built)])],
        ensemble_scheduling=pb.ModelEnsembling(step=steps),
        response_cache=pb.ModelResponseCache(enable=spec.serving.response_cache),
    )


def fused_embed_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    """Ensemble TEXT → embedder → EMBEDDING: one step, there for the response cache."""
    step = pb.ModelEnsembling.Step(
        model_name=EMBEDDER, model_version=-1, input_map={TEXT: TEXT}, output_map={EMBEDDING: EMBEDDING}
    )
    return _embed_ensemble(spec, built, [step])


def embed_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    """Ensemble TEXT → tokenizer → encoder (per encoder) → fusion → EMBEDDING."""
    steps = []
    single = len(built) == 1
    for b in built:
        prefix = b.spec.name
        steps.append(
            pb.ModelEnsembling.Step(
                model_name=tokenizer_model(b.spec),
                model_version=-1,
                input_map={TEXT: TEXT},
                output_map={INPUT_IDS: f"{prefix}_input_ids", ATTENTION_MASK: f"{prefix}_attention_mask"},
            )
        )
        ids, mask = ENCODER_INPUTS
        steps.append(
            pb.ModelEnsembling.Step(
                model_name=encoder_model(b.spec),
                model_version=-1,
                input_map={ids: f"{prefix}_input_ids", mask: f"{prefix}_attention_mask"},
                # Fusing one encoder is the identity, so its output is the public tensor directly.
                output_map={ENCODER_OUTPUT: EMBEDDING if single else f"{prefix}_embedding"},
            )
        )
    if not single:
        steps.append(
            pb.ModelEnsembling.Step(
                model_name=FUSION,
                model_version=-1,
                input_map={f"EMBEDDING_{i}": f"{b.spec.name}_embedding" for i, b in enumerate(built)},
                output_map={EMBEDDING: EMBEDDING},
            )
        )
    return _embed_ensemble(spec, built, steps)


def _head_config(
    name: str,
    spec: PipelineSpec,
    built: list[BuiltEncoder],
    inputs: list[dict],
    outputs: list[dict],
    parameters: FusionParameters | None = None,
) -> pb.ModelConfig:
    config = pb.ModelConfig(
        name=name,
        backend=PYTHON_BACKEND,
        max_batch_size=0,
        input=inputs,
        output=outputs,
        instance_group=_cpu_instances(HEAD_INSTANCES),
    )
    _parameters(config, parameters or FusionParameters(**_fusion_parameters(spec, built)))
    return config


def rank_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    return _head_config(
        RANK,
        spec,
        built,
        inputs=[_tensor(QUERY, pb.TYPE_STRING, [1]), _tensor(CANDIDATES, pb.TYPE_STRING, [-1])],
        outputs=[
            _tensor(SCORES, pb.TYPE_FP32, [-1]),
            _tensor(ENCODER_SCORES, pb.TYPE_FP32, [len(built), -1]),
        ],
    )


def classify_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    return _head_config(
        CLASSIFY,
        spec,
        built,
        inputs=[_tensor(TEXT, pb.TYPE_STRING, [1]), _tensor(LABELS, pb.TYPE_STRING, [-1])],
        outputs=[
            _tensor(LABEL, pb.TYPE_STRING, [1]),
            _tensor(VOTES, pb.TYPE_INT32, [-1]),
            _tensor(SCORES, pb.TYPE_FP32, [-1]),
        ],
    )


def search_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    """QUERY (+ optional TOP_K, FILTER, MODE) → IDS, SCORES, TITLES from the catalog index
    (serving_models/search.py)."""
    parameters = SearchParameters(
        **_fusion_parameters(spec, built), search=spec.search.model_dump(), layout=spec.serving.layout
    )
    return _head_config(
        SEARCH,
        spec,
        built,
        inputs=[
            _tensor(QUERY, pb.TYPE_STRING, [1]),
            _tensor(TOP_K, pb.TYPE_INT32, [1], optional=True),
            _tensor(FILTER, pb.TYPE_STRING, [1], optional=True),
            _tensor(MODE, pb.TYPE_STRING, [1], optional=True),
        ],
        outputs=[
            _tensor(IDS, pb.TYPE_STRING, [-1]),
            _tensor(SCORES, pb.TYPE_FP32, [-1]),
            _tensor(TITLES, pb.TYPE_STRING, [-1]),
        ],
        parameters=parameters,
    )


def similar_config(spec: PipelineSpec, built: list[BuiltEncoder]) -> pb.ModelConfig:
    """ITEM_IDS (+ optional TOP_K, FILTER, DIVERSITY) → IDS, SCORES, TITLES from the catalog index's stored
    vectors, never the inputs (serving_models/similar.py). The same parameters as `search`: it reads the same index."""
    parameters = SearchParameters(
        **_fusion_parameters(spec, built), search=spec.search.model_dump(), layout=spec.serving.layout
    )
    return _head_config(
        SIMILAR,
        spec,
        built,
        inputs=[
            _tensor(ITEM_IDS, pb.TYPE_STRING, [-1]),
            _tensor(TOP_K, pb.TYPE_INT32, [1], optional=True),
            _tensor(FILTER, pb.TYPE_STRING, [1], optional=True),
            _tensor(DIVERSITY, pb.TYPE_FP32, [1], optional=True),
        ],
        outputs=[
            _tensor(IDS, pb.TYPE_STRING, [-1]),
            _tensor(SCORES, pb.TYPE_FP32, [-1]),
            _tensor(TITLES, pb.TYPE_STRING, [-1]),
        ],
        parameters=parameters,
    )


def all_configs(spec: PipelineSpec, built: list[BuiltEncoder]) -> list[pb.ModelConfig]:
    heads = [rank_config(spec, built), classify_config(spec, built)]
    if spec.search is not None:
        heads.append(search_config(spec, built))
        heads.append(similar_config(spec, built))
    if spec.serving.layout == "fused":
        return [embedder_config(spec, built), fused_embed_config(spec, built), *heads]
    configs = []
    for b in built:
        configs += [tokenizer_config(spec, b), encoder_config(spec, b)]
    if len(built) > 1:
        configs.append(fusion_config(spec, built))
    return [*configs, embed_config(spec, built), *heads]
