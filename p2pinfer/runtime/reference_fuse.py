"""One node for each 4-bit linear layer of the float64 reference's graph (a rewrite of the graph it evaluates).

The GGUF importer writes a block-quantized weight as one or two 4-bit ``MatMulNBits`` terms and, for Q4_1, a
block-minimum term (``Reshape`` -> ``ReduceSum`` -> ``MatMul`` by the float32 minimums), summed by ``Sum``
(``gguf/graph.py``, ``_linear``). Evaluated node by node, each term is a float64 array of the layer's output
(12.6 MB for SmolLM2's MLP at 512 positions) and ``Sum`` reads them all to write another. :func:`fuse_q4_linears`
replaces each such group by one ``Q4Linear`` node over the same inputs and initializers, which the reference
computes with every term summed into one output (``runtime/reference.py``; the C products of
``p2pinfer/kernels/ref64.c``): the same sum in another order, float64 rounding apart. Pure graph logic; a group
of any other form stays as it is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..kernels.patterns import ONNX_DOMAINS as _STANDARD
from ..kernels.patterns import attributes as _attrs
from ..kernels.patterns import replace_nodes, silu_gates

FUSED_DOMAIN = "p2pinfer.reference"
_CONTRIB = "com.microsoft"


def fuse_q4_linears(graph: onnx.GraphProto, inits: dict[str, Any]) -> int:
    """Rewrite ``graph`` in place; ``inits``: its initializers by name (arrays, or descriptors with ``shape`` and
    ``dtype``). Returns the number of ``Q4Linear`` nodes written. Each has inputs ``[x, (qweight, scales,
    zero_points or ""), ... per term, minimums or ""]`` and the terms' ``K``, ``N`` and ``block_size``."""
    nodes = list(graph.node)  # held until the rewrite: the matches are these objects (replace_nodes)
    producer = {out: node for node in nodes for out in node.output if out}
    uses = Counter(name for node in nodes for name in node.input if name)
    uses.update(o.name for o in graph.output)

    def const(name: str) -> list[int] | None:
        value = inits.get(name)
        if not isinstance(value, np.ndarray) or value.dtype != np.int64:
            return None
        return [int(v) for v in value.reshape(-1)]

    def single(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and uses[name] == 1 else None

    def q4_term(node: onnx.NodeProto) -> dict[str, Any] | None:
        if node.op_type != "MatMulNBits" or node.domain != _CONTRIB or not 3 <= len(node.input) <= 4:
            return None
        at = _attrs(node)
        if at.get("bits") != 4 or any(k not in at for k in ("K", "N", "block_size")):
            return None
        if any(name not in inits for name in node.input[1:] if name):
            return None
        return {"x": node.input[0], "K": int(at["K"]), "N": int(at["N"]), "block_size": int(at["block_size"]),
                "inputs": [node.input[1], node.input[2], node.input[3] if len(node.input) == 4 else ""]}

    def mins_term(node: onnx.NodeProto, k: int, n: int, block_size: int) -> tuple[str, str, list] | None:
        """(x, minimums, the chain's nodes) of ``MatMul(ReduceSum(Reshape(x, [0, 0, blocks, block_size]), [-1]),
        minimums)``, else None."""
        if node.op_type != "MatMul" or node.domain not in _STANDARD or len(node.input) != 2:
            return None
        mins = inits.get(node.input[1])
        blocks = k // block_size if block_size and k % block_size == 0 else 0
        if mins is None or tuple(mins.shape) != (blocks, n) or np.dtype(mins.dtype) != np.float32:
            return None
        reduce = single(node.input[0])
        if reduce is None or reduce.op_type != "ReduceSum" or reduce.domain not in _STANDARD \
                or _attrs(reduce).get("keepdims", 1) != 0 or len(reduce.input) != 2 or const(reduce.input[1]) != [-1]:
            return None
        reshape = single(reduce.input[0])
        if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in _STANDARD \
                or len(reshape.input) != 2 or const(reshape.input[1]) != [0, 0, blocks, block_size]:
            return None
        return reshape.input[0], node.input[1], [node, reduce, reshape]

    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for node in nodes:
        if node.op_type != "Sum" or node.domain not in _STANDARD or not node.input or len(node.output) != 1:
            continue
        parts = [single(name) for name in node.input]
        if any(p is None for p in parts):
            continue
        terms = [t for t in (q4_term(p) for p in parts) if t is not None]
        if not terms or len({(t["x"], t["K"], t["N"], t["block_size"]) for t in terms}) != 1:
            continue
        first = terms[0]
        others = [p for p in parts if q4_term(p) is None]
        chain: list[onnx.NodeProto] = []
        minimums = ""
        if len(others) > 1:
            continue
        if others:
            found = mins_term(others[0], first["K"], first["N"], first["block_size"])
            if found is None or found[0] != first["x"]:
                continue
            minimums, chain = found[1], found[2]
        inputs = [first["x"]] + [name for t in terms for name in t["inputs"]] + [minimums]
        replace[id(node)] = helper.make_node("Q4Linear", inputs, list(node.output), name=node.name or node.output[0],
                                             domain=FUSED_DOMAIN, K=first["K"], N=first["N"],
                                             block_size=first["block_size"])
        drop.update(id(p) for p in parts if q4_term(p) is not None)
        drop.update(id(c) for c in chain)
    replace_nodes(graph, nodes, replace, drop)
    return len(replace)


def fuse_silu_mul(graph: onnx.GraphProto, inits: dict[str, Any]) -> int:
    """Rewrite ``graph`` in place: each MLP activation ``Split(h) -> gate, up;  Mul(Mul(gate, Sigmoid(gate)), up)``
    (two equal halves of the last axis; products in either order; every intermediate read by the pattern only)
    becomes one ``SiluMul`` node over ``h`` (attributes ``axis`` as the Split's, ``half``). Returns the number
    written."""

    def halves(split: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> tuple[int, int] | None:
        sizes = inits.get(split.input[1])
        if not isinstance(sizes, np.ndarray) or sizes.dtype != np.int64 or sizes.shape != (2,) \
                or sizes[0] != sizes[1] or sizes[0] <= 0:
            return None
        return int(_attrs(split).get("axis", 0)), int(sizes[0])

    nodes = list(graph.node)
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for gate in silu_gates(graph, nodes, halves):
        split, _, _ = gate.parts
        axis, half = gate.halves
        replace[id(gate.mul)] = helper.make_node("SiluMul", [split.input[0]], list(gate.mul.output),
                                                 name=gate.mul.name or gate.mul.output[0], domain=FUSED_DOMAIN,
                                                 axis=axis, half=half)
        drop.update(id(n) for n in gate.parts)
    replace_nodes(graph, nodes, replace, drop)
    return len(replace)
