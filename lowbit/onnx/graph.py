"""A small ONNX graph builder: nodes and initializers collected in order, names made unique.

    g = GraphBuilder()
    y = g.op("MatMul", x, g.const("w", weight))
    z = g.op("MatMulNBits", x, b, s, domain=MS_DOMAIN, K=576, N=576, bits=4, block_size=64)

Every name is derived from a prefix and a counter, so the same model always gives the same graph
(byte-identical files). ``onnx.helper`` does the protobuf work; this only keeps the bookkeeping out
of the code that says what the graph computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulNBits)
OPSET = 21  # DequantizeLinear with block_size (blocked 8-bit weights) needs opset 21


class GraphBuilder:
    """Collects the nodes (in topological order, as added) and the initializers of one graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._count = 0

    def name(self, prefix: str) -> str:
        """A fresh value name starting with ``prefix``."""
        if prefix not in self._names:
            self._names.add(prefix)
            return prefix
        self._count += 1
        name = f"{prefix}_{self._count}"
        self._names.add(name)
        return name

    def const(self, prefix: str, value: np.ndarray | int | float | list) -> str:
        """An initializer holding ``value`` (a Python list or scalar becomes int64 or float32)."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        elif array.dtype.kind == "i" and array.dtype != np.int8:
            array = array.astype(np.int64)
        name = self.name(prefix)
        # copy(order="C"), not ascontiguousarray, which turns a scalar into a 1-element vector
        self.initializers.append(numpy_helper.from_array(array.copy(order="C"), name))
        return name

    def shared(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """The initializer ``name``, made by ``make()`` the first time it is asked for: tensors two
        parts of the graph read (a tied LM head's codes and the embedding lookup) are stored once."""
        if name not in self._names:
            self.const(name, make())
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", outputs: int = 1, name: str | None = None,
           **attrs: Any) -> Any:
        """Append one node; returns its output name (a tuple of names when ``outputs`` > 1).
        An empty input name is an omitted optional input."""
        out = [self.name(name or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), out, name=self.name(f"node_{out[0]}"),
                                           domain=domain or None, **attrs))
        return out[0] if outputs == 1 else tuple(out)

    def rename(self, src: str, dst: str) -> None:
        """Make value ``src`` available under the name ``dst`` (a graph output's public name)."""
        self._names.add(dst)
        self.nodes.append(helper.make_node("Identity", [src], [dst], name=f"out_{dst}"))

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              metadata: dict[str, str]) -> onnx.ModelProto:
        """The model: this graph, the ONNX and contrib opsets, and ``metadata`` as metadata_props."""
        graph = helper.make_graph(self.nodes, "lowbit", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="lowbit")
        model.ir_version = 10  # onnxruntime 1.2x reads IR 10 (opset 21); newer onnx would stamp a newer one
        helper.set_model_props(model, dict(sorted(metadata.items())))
        return model


def value_info(name: str, elem_type: int, shape: list[str | int]) -> onnx.ValueInfoProto:
    """A graph input or output: name, element type (``TensorProto.FLOAT``...) and symbolic shape."""
    return helper.make_tensor_value_info(name, elem_type, shape)


FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
