"""Export to ONNX and the parity check, on tiny random encoders."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from support import make_tiny_bert, spec_from

from ecomserve.cpu import has_int8_dot_product
from ecomserve.errors import ExportError
from ecomserve.export.onnx_export import export_onnx
from ecomserve.export.parity import check_parity
from ecomserve.export.pooled_encoder import PooledEncoder, load_encoder
from ecomserve.repository.builder import build_repository, is_built
from ecomserve.runtime import MODEL_FILES, load_runner
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_export"), seed=7)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_matches_pytorch_with_dynamic_axes(tiny, tmp_path, pooling):
    reference = PooledEncoder(load_encoder(tiny, None), pooling)
    path = tmp_path / "model.onnx"
    export_onnx(reference, path)
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 17
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    tokenizer = TextTokenizer(tiny / TOKENIZER_FILE, 32)
    report = check_parity(load_runner("onnxruntime", path), reference, tokenizer, "tiny", "onnx fp32", 0.9999)
    assert report.min_cosine >= 0.9999 and report.texts > 20
    # a batch shape the trace never saw, with padding
    batch = tokenizer.encode(["a", "a much longer product title with several words", "mid length text"])
    (onnx_out,) = ort.InferenceSession(str(path)).run(
        None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    )
    assert np.allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)


def test_parity_failure_names_encoder_and_bar(tiny, tmp_path_factory, tmp_path):
    other = make_tiny_bert(tmp_path_factory.mktemp("tiny_other"), seed=8)
    path = tmp_path / "model.onnx"
    export_onnx(PooledEncoder(load_encoder(other, None), "mean"), path)
    reference = PooledEncoder(load_encoder(tiny, None), "mean")
    message = r"encoder 'tiny' \(onnx fp32\): output differs from PyTorch: min cosine .* < 0.9999"
    with pytest.raises(ExportError, match=message):
        tokenizer = TextTokenizer(tiny / TOKENIZER_FILE, 32)
        check_parity(load_runner("onnxruntime", path), reference, tokenizer, "tiny", "onnx fp32", 0.9999)


def test_pruned_export_keeps_first_layers(tiny, tmp_path):
    pruned = PooledEncoder(load_encoder(tiny, keep_layers=1), "mean")
    full = PooledEncoder(load_encoder(tiny, None), "mean")
    assert len(pruned.encoder.encoder.layer) == 1
    tokenizer = TextTokenizer(tiny / TOKENIZER_FILE, 32)
    batch = tokenizer.encode(["red running shoes"])
    from ecomserve.export.pooled_encoder import reference_embeddings

    a = reference_embeddings(pruned, batch.input_ids, batch.attention_mask).numpy()
    b = reference_embeddings(full, batch.input_ids, batch.attention_mask).numpy()
    assert not np.allclose(a, b, atol=1e-5)  # the pruned model really computes something else


def test_failed_build_leaves_the_repository_untouched(tiny, tmp_path):
    repository = tmp_path / "repo"
    good = spec_from({"encoders": [{"name": "tiny", "source": str(tiny), "max_seq_len": 32}]})
    build_repository(good, repository)
    assert is_built(repository)
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    bad = spec_from({"encoders": [{"name": "other", "source": str(tiny), "keep_layers": 9}]})
    with pytest.raises(ExportError, match="keep_layers=9 but the model has only 2 layers"):
        build_repository(bad, repository)
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before
    assert not repository.with_name("repo.building").exists()


def _drop_spread_batches(repository) -> None:
    """The embedder's config as an ecomserve from before `spread_batches` wrote it: the stub would run without it."""
    from ecomserve.contract import EMBEDDER
    from ecomserve.repository.releases import read_config, write_config

    embedder = read_config(repository, EMBEDDER)
    del embedder.parameters["spread_batches"]
    write_config(repository, embedder)


def test_serve_finds_configs_written_by_an_older_ecomserve(tiny, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    from ecomserve.contract import EMBED, EMBEDDER
    from ecomserve.repository.builder import BUILD_INFO, outdated_models
    from ecomserve.repository.releases import read_config, write_config

    repository = tmp_path / "repo"
    build_repository(spec_from({"encoders": [{"name": "tiny", "source": str(tiny), "max_seq_len": 32}]}), repository)
    assert outdated_models(repository, None) == []
    # A publish pins the versions `embed` serves: that is not an older config.
    embed = read_config(repository, EMBED)
    embed.version_policy.CopyFrom(pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=[1])))
    write_config(repository, embed)
    assert outdated_models(repository, None) == []
    _drop_spread_batches(repository)
    assert outdated_models(repository, None) == [EMBEDDER]
    # The encoder's source gone: nothing to compare with, no claim either way.
    info = json.loads((repository / BUILD_INFO).read_text())
    info["spec"]["encoders"][0]["source"] = str(tmp_path / "moved")
    (repository / BUILD_INFO).write_text(json.dumps(info))
    assert outdated_models(repository, None) == []


def test_serve_checks_a_relative_source_against_the_folder_the_build_spec_came_from(tiny, tmp_path):
    """Built with `--spec` from the source's folder, served with another (or no) spec folder: still compared."""
    from ecomserve.contract import EMBEDDER
    from ecomserve.repository.builder import outdated_models

    repository = tmp_path / "repo"
    spec = spec_from({"encoders": [{"name": "tiny", "source": tiny.name, "max_seq_len": 32}]})
    build_repository(spec, repository, spec_dir=tiny.parent)
    elsewhere = tmp_path / "elsewhere"
    assert outdated_models(repository, elsewhere) == []
    _drop_spread_batches(repository)
    assert outdated_models(repository, elsewhere) == [EMBEDDER]


VARIANTS = {
    "onnxruntime fp32 optimized": {"optimize": True},
    "onnxruntime int8 static": {"precision": "int8"},
    # 7-bit weights: what `auto` picks on a CPU without VNNI (AVX2's U8S8 kernels could saturate otherwise)
    "onnxruntime int8 static, reduced range": {"precision": "int8", "int8_recipe": "reduced_range"},
    "openvino fp32": {"runtime": "openvino"},
    "openvino int8": {"runtime": "openvino", "precision": "int8"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_builds_and_passes_its_parity_check(tiny, tmp_path, variant):
    from ecomserve.export.pipeline import export_encoder
    from ecomserve.spec import EncoderSpec

    encoder = EncoderSpec(name="tiny", source=str(tiny), max_seq_len=32, **VARIANTS[variant])
    report = export_encoder(encoder, tiny, tmp_path)
    stages = [stage["stage"] for stage in report["stages"]]
    assert stages == ["onnx fp32", variant.split(",")[0]]
    if encoder.precision == "int8" and encoder.runtime == "onnxruntime":
        expected = "full_range" if has_int8_dot_product() else "reduced_range"
        assert report["int8_recipe"] == (expected if encoder.int8_recipe == "auto" else encoder.int8_recipe)
    bar = 0.97 if "int8" in variant else 0.9999
    assert report["stages"][-1]["min_cosine"] >= bar
    model_file = MODEL_FILES[encoder.runtime]
    assert (tmp_path / model_file).is_file()
    batch = TextTokenizer(tiny / TOKENIZER_FILE, 32).encode(["red shoes", "a longer product title with words"])
    vectors = load_runner(encoder.runtime, tmp_path / model_file)(batch.input_ids, batch.attention_mask)
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_distillation_trains_the_exported_student(tiny, tmp_path):
    """Loss falls and the exported file is the trained student, not the plain pruned copy.
    (Whether distillation recovers ranking quality is measured on MiniLM by `ecomserve bench`.)"""
    from ecomserve.export.pipeline import export_encoder
    from ecomserve.export.pooled_encoder import reference_embeddings
    from ecomserve.spec import DistillSpec, EncoderSpec

    distill = DistillSpec(epochs=2, batch_size=64, learning_rate=1e-4)
    encoder = EncoderSpec(name="tiny", source=str(tiny), max_seq_len=32, keep_layers=1, distill=distill)
    report = export_encoder(encoder, tiny, tmp_path)
    assert len(report["distill_losses"]) == 2 and report["distill_losses"][-1] < report["distill_losses"][0]
    batch = TextTokenizer(tiny / TOKENIZER_FILE, 32).encode(["red running shoes", "ceramic coffee mug 350ml"])
    plain = reference_embeddings(PooledEncoder(load_encoder(tiny, 1), "mean"), batch.input_ids, batch.attention_mask)
    exported = load_runner("onnxruntime", tmp_path / "model.onnx")(batch.input_ids, batch.attention_mask)
    assert np.abs(exported - plain.numpy()).max() > 1e-4


def test_running_by_length_gives_the_same_answers(tiny, tmp_path):
    from ecomserve.runtime import LENGTH_CHUNK, run_by_length

    path = tmp_path / "model.onnx"
    export_onnx(PooledEncoder(load_encoder(tiny, None), "mean"), path)
    run = load_runner("onnxruntime", path)
    texts = [("word " * n).strip() for n in (30, 1, 12, 5, 25, 2, 9, 17, 3, 28, 7)]
    assert len(texts) > LENGTH_CHUNK
    batch = TextTokenizer(tiny / TOKENIZER_FILE, 64).encode(texts)
    together = run(batch.input_ids, batch.attention_mask)
    widths: list[int] = []

    def recording(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        widths.append(input_ids.shape[1])
        return run(input_ids, attention_mask)

    by_length = run_by_length(recording, batch.input_ids, batch.attention_mask)
    assert np.abs(together - by_length).max() <= 1e-5
    # Longest first, each chunk cut to its longest text: the thread that takes the first chunk has the most work.
    assert widths == sorted(widths, reverse=True) and widths[0] == batch.attention_mask.sum(axis=1).max()
    assert widths[-1] < widths[0]


def test_int8_recipe_follows_the_cpus_dot_product_instructions(tmp_path):
    from ecomserve.cpu import cpu_flags
    from ecomserve.export.pipeline import int8_recipe
    from ecomserve.spec import EncoderSpec

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert has_int8_dot_product(cpu_flags(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert not has_int8_dot_product(cpu_flags(info)) and not has_int8_dot_product(cpu_flags(tmp_path / "none"))
    encoder = EncoderSpec(name="e", source="x", precision="int8")
    assert int8_recipe(encoder) == ("full_range" if has_int8_dot_product() else "reduced_range")
    for fixed in ("full_range", "reduced_range"):
        assert int8_recipe(encoder.model_copy(update={"int8_recipe": fixed})) == fixed


@pytest.mark.parametrize("reduce_range", [False, True])
def test_static_int8_runs_the_feed_forward_outputs_per_token(tiny, tmp_path, reduce_range):
    """Static INT8 leaves the feed-forward output projections to per-token INT8 (one scale per token, computed from
    that token alone): integer kernels, answers close to fp32 and independent of the batch."""
    fp32, int8 = static_int8(tiny, tmp_path, reduce_range)
    tokenizer = TextTokenizer(tiny / TOKENIZER_FILE, 64)
    graph = onnx.load(str(int8)).graph
    layers = onnx.load(str(fp32)).graph
    feed_forward_out = [n.name for n in layers.node if n.op_type == "MatMul" and "/output/dense/" in n.name]
    feed_forward_out = [name for name in feed_forward_out if "/attention/" not in name]
    assert feed_forward_out and not {n.name for n in graph.node} & set(feed_forward_out)
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == len(feed_forward_out)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    limit = 63 if reduce_range else 127
    assert all(np.abs(weights[n.input[1]].astype(int)).max() <= limit for n in integer)

    texts = [("word " * n).strip() + f" item {n}" for n in (3, 11, 1, 24, 7, 16)]
    batch = tokenizer.encode(texts)
    reference = load_runner("onnxruntime", fp32)(batch.input_ids, batch.attention_mask)
    run = load_runner("onnxruntime", int8)
    together = run(batch.input_ids, batch.attention_mask)
    assert (together * reference).sum(axis=1).min() >= 0.99
    for i, text in enumerate(texts):
        alone = tokenizer.encode([text])
        assert np.abs(run(alone.input_ids, alone.attention_mask)[0] - together[i]).max() <= 1e-5


def test_sessions_run_without_the_slow_fused_kernels(tiny, tmp_path):
    """ecomserve's ONNX Runtime sessions leave out the SkipLayerNormalization and BiasGelu fusions (slower on CPU
    than the ops they replace, runtime.UNFUSED), which ORT's own defaults apply to the same static INT8 encoder."""
    from ecomserve.runtime import onnxruntime_options

    _, path = static_int8(tiny, tmp_path, reduce_range=False)

    def ops_run(options: ort.SessionOptions) -> set[str]:
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}

    fused = {"SkipLayerNormalization", "BiasGelu"}
    assert fused <= ops_run(ort.SessionOptions())
    assert not fused & ops_run(onnxruntime_options(threads=1))


def static_int8(tiny, tmp_path, reduce_range: bool):
    """The tiny encoder exported (fp32) and quantized the way a static INT8 variant is: both paths."""
    from ecomserve.export import compress
    from ecomserve.paths import corpus_texts

    fp32 = tmp_path / "model.onnx"
    export_onnx(PooledEncoder(load_encoder(tiny, None), "mean"), fp32)
    tokenizer = TextTokenizer(tiny / TOKENIZER_FILE, 64)
    calibration = list(compress.calibration_batches(tokenizer, corpus_texts()[:64]))
    return fp32, compress.quantize_static_onnx(fp32, tmp_path / "int8.onnx", calibration, reduce_range=reduce_range)
