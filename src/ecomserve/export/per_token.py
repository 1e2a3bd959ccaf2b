"""Per-token INT8 for the MatMuls one static activation scale cannot serve.

The feed-forward output projection takes GELU's output, where a few tokens carry values far beyond the rest: one
calibrated scale for the whole tensor either clips them or leaves the others a handful of levels (the student's
min cosine to fp32 falls from 0.989 to 0.950 with it statically quantized). Here each token gets its own scale,
computed from that token alone at run time, so an answer still never depends on its batch, and the product runs
on ONNX Runtime's u8 × s8 integer kernels (`MatMulInteger`): activations as int8 shifted by 128 into u8 (zero
point 128), weights as s8 with one scale per output column.

    y[t, n] = (Σ_k (q[t, k] − 128) · w[k, n]) · amax[t] / 127 · wscale[n]

`reduce_range` keeps the weights within 7 bits, for CPUs whose AVX2 kernels sum pairs of u8 × s8 products in
16 bits (export/compress.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def per_token_matmuls(source: Path, target: Path, names: list[str], reduce_range: bool = False) -> Path:
    """`source` with each MatMul in `names` (activation × constant weight) rewritten to per-token INT8."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for index, name in enumerate(names):
        node = next(n for n in graph.node if n.name == name)
        position = list(graph.node).index(node)
        graph.node.remove(node)
        replacement = _per_token_nodes(graph, node, weights[node.input[1]], f"/per_token/{index}/", reduce_range, opset)
        for offset, new in enumerate(replacement):
            graph.node.insert(position + offset, new)
    used = {name for node in graph.node for name in node.input}
    for unused in [i for i in graph.initializer if i.name not in used]:  # the fp32 weights just replaced
        graph.initializer.remove(unused)
    onnx.save(model, str(target))
    return target


def _per_token_nodes(graph, node, weight, prefix: str, reduce_range: bool, opset: int) -> list:
    from onnx import TensorProto, helper, numpy_helper

    def name(suffix: str) -> str:
        return prefix + suffix

    def constant(suffix: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name(suffix)))
        return name(suffix)

    levels = 63 if reduce_range else 127
    w = numpy_helper.to_array(weight).astype(np.float32)  # [K, N]
    w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / levels
    w_int8 = np.clip(np.round(w / w_scale), -levels, levels).astype(np.int8)
    x, y = node.input[0], node.output[0]
    # Each token's largest magnitude over the last axis. ReduceMax takes its axes as an attribute before opset 18
    # and as an input from it.
    if opset >= 18:
        reduce_max = helper.make_node(
            "ReduceMax", [name("abs"), constant("axes", np.array([-1], np.int64))], [name("amax")], keepdims=1
        )
    else:
        reduce_max = helper.make_node("ReduceMax", [name("abs")], [name("amax")], keepdims=1, axes=[-1])
    # MatMulInteger multiplies like numpy.matmul: [..., T, K] × [K, N] keeps the leading axes, no reshape needed.
    return [
        helper.make_node("Abs", [x], [name("abs")]),
        reduce_max,
        # An all-zero token keeps a positive scale (its row quantizes to zeros).
        helper.make_node("Max", [name("amax"), constant("tiny", np.array(1e-12, np.float32))], [name("amax+")]),
        helper.make_node("Div", [name("amax+"), constant("levels", np.array(127, np.float32))], [name("scale")]),
        helper.make_node("Div", [x, name("scale")], [name("scaled")]),
        helper.make_node("Round", [name("scaled")], [name("rounded")]),
        helper.make_node("Add", [name("rounded"), constant("128", np.array(128, np.float32))], [name("shifted")]),
        helper.make_node("Cast", [name("shifted")], [name("x_u8")], to=TensorProto.UINT8),
        helper.make_node(
            "MatMulInteger",
            [name("x_u8"), constant("w_s8", w_int8), constant("zero_point", np.array(128, np.uint8))],
            [name("y_i32")],
        ),
        helper.make_node("Cast", [name("y_i32")], [name("y_f32")], to=TensorProto.FLOAT),
        helper.make_node("Mul", [name("y_f32"), name("scale")], [name("y_token")]),
        helper.make_node("Mul", [name("y_token"), constant("w_scale", w_scale.astype(np.float32))], [y]),
    ]
