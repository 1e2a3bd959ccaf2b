"""fastembed in its own interpreter: `VENV/bin/python fastembed_worker.py REQUEST.json RESULT.json`.

Run by `ecomserve bench --peer fastembed=VENV` with the peer venv's python, never imported by ecomserve's
own code: it needs only fastembed (and its numpy) and loads ecomserve's closed loop, `bench/load.py`,
from the file next to it, so fastembed is measured by the same `measure` as every other contender.

REQUEST: model_dir, model_file, model_name, label, pooling (a fastembed PoolingType name), normalization,
dim, threads (ONNX Runtime intra-op threads, one measurement per value), duration_s, load_module (path of
load.py), workloads ({name: {"items": texts per call, "texts": [...]}}: each call takes the next `items`
texts, so no text is embedded twice), parity_texts.
RESULT: versions, measurements (load.Measurement rows, contender "fastembed LABEL (N thread[s])",
protocol "in-process", concurrency 1), exhausted ({workload: true if its texts ran out: those calls are
counted as errors}), parity_vectors (the parity texts' vectors, threads[0])."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path


def load_measure(path: str):
    spec = importlib.util.spec_from_file_location("ecomserve_bench_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module.measure


class TextStream:
    """The workload's texts, `items` at a time, each handed out once."""

    def __init__(self, texts: list[str], items: int):
        self.texts, self.items, self.position = texts, items, 0
        self.exhausted = False
        self._lock = threading.Lock()

    def next(self) -> list[str]:
        with self._lock:
            start = self.position
            end = self.position = start + self.items
        if end > len(self.texts):
            self.exhausted = True
            raise RuntimeError("texts exhausted")
        return self.texts[start:end]


def serve(request: dict, embedders: dict[int, Callable[[list[str]], list]], versions: dict) -> dict:
    """Measures `embedders[threads](texts) → vectors` on the request's workloads; the result JSON."""
    measure = load_measure(request["load_module"])
    streams = {name: TextStream(w["texts"], w["items"]) for name, w in request["workloads"].items()}
    rows = []
    for threads in request["threads"]:
        embed = embedders[threads]
        contender = f"fastembed {request['label']} ({threads} thread{'s' if threads > 1 else ''})"
        for name, workload in request["workloads"].items():
            stream = streams[name]

            def make_call(_worker: int, embed=embed, stream=stream):
                return lambda _i: embed(stream.next())

            measured = measure(contender, name, "in-process", 1, make_call, workload["items"], request["duration_s"])
            rows.append(measured.row())
    first = embedders[request["threads"][0]]
    vectors = [[float(x) for x in vector] for vector in first(request["parity_texts"])]
    return {
        "versions": versions,
        "measurements": rows,
        "exhausted": {name: stream.exhausted for name, stream in streams.items()},
        "parity_vectors": vectors,
    }


def fastembed_embedders(request: dict) -> tuple[dict, dict]:
    """One fastembed TextEmbedding per thread count, on the request's local model folder."""
    from importlib.metadata import version

    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    TextEmbedding.add_custom_model(
        model=request["model_name"],
        pooling=PoolingType[request["pooling"]],
        normalization=request["normalization"],
        sources=ModelSource(hf=request["model_name"]),  # never fetched: specific_model_path is local
        dim=request["dim"],
        model_file=request["model_file"],
    )
    embedders = {}
    for threads in request["threads"]:
        model = TextEmbedding(
            request["model_name"], threads=threads, specific_model_path=request["model_dir"], local_files_only=True
        )
        embedders[threads] = lambda texts, model=model: list(model.embed(texts, batch_size=max(len(texts), 1)))
    versions = {name: version(name) for name in ("fastembed", "onnxruntime", "tokenizers")}
    return embedders, versions


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    embedders, versions = fastembed_embedders(request)
    Path(result_path).write_text(json.dumps(serve(request, embedders, versions)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
