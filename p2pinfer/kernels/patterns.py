"""ONNX graph patterns that both the kernel session (:mod:`p2pinfer.kernels`) and the float64 reference
(:mod:`p2pinfer.runtime.reference_fuse`) rewrite: found once here, each rewriter deciding what the match
becomes. Pure graph logic, no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import onnx
from onnx import helper

ONNX_DOMAINS = ("", "ai.onnx")


class SiluGate(NamedTuple):
    """One MLP activation ``Split(h) -> gate, up;  Mul(Mul(gate, Sigmoid(gate)), up)``: the final ``Mul``, the
    nodes it replaces with it, and what the caller's ``halves`` said of the ``Split``."""

    mul: onnx.NodeProto
    parts: tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]  # split, sigmoid, inner Mul
    halves: Any


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def silu_gates(graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
               halves: Callable[[onnx.NodeProto, dict[str, onnx.NodeProto]], Any],
               *, sole_reader_of_input: bool = False) -> list[SiluGate]:
    """Every MLP activation among ``nodes`` (``list(graph.node)``, held by the caller until it has rewritten the
    graph: the matches are those very node objects, and :func:`replace_nodes` finds them by identity; standard-
    domain nodes; products in either order) whose ``Split`` of ``h`` into two outputs, ``axis`` its only
    attribute, ``halves(split, producer)`` accepts (not None; the caller checks the sizes and ``h``'s producer),
    where every intermediate is read by the pattern alone and is no graph output, and
    (``sole_reader_of_input``) ``h`` is read by the ``Split`` alone."""
    producer = {out: node for node in nodes for out in node.output if out}
    uses = Counter(name for node in nodes for name in node.input if name)
    uses.update(o.name for o in graph.output)

    def made_by(name: str, op_type: str, inputs: int) -> onnx.NodeProto | None:
        node = producer.get(name)
        ok = node is not None and node.op_type == op_type and node.domain in ONNX_DOMAINS \
            and len(node.input) == inputs and len(node.output) == 1
        return node if ok else None

    def is_split(node: onnx.NodeProto | None, gate: str, up: str) -> bool:
        return node is not None and node.op_type == "Split" and node.domain in ONNX_DOMAINS \
            and len(node.input) == 2 and list(node.output) == [gate, up] and not set(attributes(node)) - {"axis"}

    found = []
    for mul in nodes:
        if mul.op_type != "Mul" or mul.domain not in ONNX_DOMAINS or len(mul.input) != 2 or len(mul.output) != 1:
            continue
        match = None
        for act_name, up in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            act = made_by(act_name, "Mul", 2)
            for gate, sig_name in ((act.input[0], act.input[1]), (act.input[1], act.input[0])) if act else ():
                sigmoid = made_by(sig_name, "Sigmoid", 1)
                split = producer.get(gate)
                if sigmoid is None or sigmoid.input[0] != gate or not is_split(split, gate, up):
                    continue
                if uses[gate] != 2 or uses[up] != 1 or uses[sig_name] != 1 or uses[act_name] != 1 \
                        or (sole_reader_of_input and uses[split.input[0]] != 1):
                    continue
                shape = halves(split, producer)
                if shape is not None:
                    match = SiluGate(mul, (split, sigmoid, act), shape)
                    break
            if match is not None:
                break
        if match is not None:
            found.append(match)
    return found


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], replace: dict[int, onnx.NodeProto],
                  drop: set[int]) -> None:
    """Rewrite ``graph.node`` in place from ``nodes`` (``list(graph.node)`` as the caller matched on it): the
    node ``n`` with ``id(n)`` in ``replace`` by its replacement (same position, so the order stays topological),
    the nodes whose ``id`` is in ``drop`` left out. By the snapshot, not by iterating ``graph.node`` again:
    protobuf makes a new wrapper object per access once the old one is gone, and a new object may take a freed
    one's ``id``."""
    if replace or drop:
        kept = [replace.get(id(n), n) for n in nodes if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(kept)
