"""Helpers the tests share: tiny random encoders, servers on free ports, PyTorch references."""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ecomserve.client import EcomClient
from ecomserve.export.pipeline import reference_model
from ecomserve.export.pooled_encoder import reference_embeddings
from ecomserve.repository.builder import build_repository
from ecomserve.server.process import Ports, ServerOptions, TritonServer, free_port
from ecomserve.spec import EncoderSpec, PipelineSpec, parse_spec, resolve_source
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

BUNDLED = "bundled:all-MiniLM-L6-v2"


def make_tiny_bert(directory: Path, seed: int) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer: fast to export, quality irrelevant."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(directory)
    bundled = resolve_source(BUNDLED)
    for name in (TOKENIZER_FILE, "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(bundled / name, directory / name)
    return directory


def spec_from(raw: dict) -> PipelineSpec:
    return parse_spec(raw, origin="test")


def start_server(spec: PipelineSpec, root: Path, spec_dir: Path | None = None, **options) -> TritonServer:
    """A built repository served on free ports; `options` go to ServerOptions (api_key, admin_key)."""
    repository = root / "model_repository"
    build_repository(spec, repository, spec_dir=spec_dir)
    ports = Ports(http=free_port(), grpc=free_port(), metrics=free_port(), api=free_port())
    server = TritonServer(ServerOptions(repository=repository, ports=ports, work_dir=root / "work", **options))
    server.start(timeout_s=240)
    return server


class TorchReference:
    """Per-encoder PyTorch embeddings computed the way the export verifies them."""

    def __init__(self, source: str | EncoderSpec, **fields):
        """A source with the spec fields that shape its reference (keep_layers, pooling, max_seq_len), or an encoder
        spec as the build reads it: pruned and, with `distill`, distilled (resumed from its checkpoint folder, so
        after a build of the same spec this takes seconds)."""
        encoder = source if isinstance(source, EncoderSpec) else EncoderSpec(name="reference", source=source, **fields)
        directory = resolve_source(encoder.source)
        self.tokenizer = TextTokenizer(directory / TOKENIZER_FILE, encoder.max_seq_len)
        self.model = reference_model(encoder, directory, self.tokenizer, None).model

    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer.encode(texts)
        return reference_embeddings(self.model, batch.input_ids, batch.attention_mask).numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def client_for(server: TritonServer, protocol: str) -> EcomClient:
    return EcomClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


def wait_for(condition, timeout_s: float = 5.0, interval_s: float = 0.1) -> bool:
    """Poll `condition` every `interval_s` until it holds or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return False


def metric_total(server: TritonServer, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`, parsed from the server's Prometheus text
    (the parser names counter samples `<name>_total`, as OpenMetrics does, whatever Triton wrote)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.removesuffix("_total") == name.removesuffix("_total") and labels.items() <= sample.labels.items()
    )


def embed_cache_counts(server: TritonServer) -> tuple[float, float]:
    """(hits, misses) of `embed`'s response cache so far."""
    return tuple(metric_total(server, f"nv_cache_num_{kind}_per_model", model="embed") for kind in ("hits", "misses"))
