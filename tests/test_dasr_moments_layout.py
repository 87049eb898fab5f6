"""The moments graph's functionals stay in ONNX Runtime's blocked (NCHWc) CPU layout (export/graphs.py DasrMoments,
Layout): converting them out of it and back at every layer cost about a fifth of the graph's time.

Read from the graph ONNX Runtime optimises for this machine: every layout conversion on a path from the
`functionals` input. What may remain: the conversions before the channel sums that end each functional (one per
functional and frontier tensor, DasrMoments' Seed side), and those of layers whose channel count is not a
multiple of the block (16 with AVX-512, 8 with AVX2), which the blocked convolutions do not take
(efficientnet_lite0's 24- and 40-channel stages). Skipped where ONNX Runtime
has no blocked layout (no AVX2: ARM, old x86).
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from exports import RESNET_STRIDE
from test_dasr_moments import moments_file

from inserve.server.stages.shapes import MOMENTS

BLOCK = 16  # channels of a multiple of this are blocked on every x86 layout ONNX Runtime has (8 or 16)


def optimised_graph(path: Path, tmp_path: Path) -> onnx.GraphProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3  # its warning that the file is for this machine only
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    if not any(node.domain == "com.microsoft.nchwc" for node in graph.node):
        pytest.skip("ONNX Runtime has no blocked layout on this CPU")
    return graph


def conversions_of_functionals(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, list[str]]]:
    """(conversion node, its consumers' op types) for every ReorderInput/ReorderOutput downstream of `functionals`."""
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    seen, pending, found = set(), ["functionals"], []
    while pending:
        for node in consumers[pending.pop()]:
            if node.name in seen or node.op_type == "Shape":  # a shape is not the functionals' values
                continue
            seen.add(node.name)
            if node.op_type in ("ReorderInput", "ReorderOutput"):
                found.append((node, [c.op_type for c in consumers[node.output[0]]]))
            pending.extend(node.output)
    return found


def channels(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "channels"), None)


def test_resnet50_functionals_leave_the_blocked_layout_only_for_the_channel_sums(request, tmp_path: Path) -> None:
    graph = optimised_graph(moments_file(request, "resnet50", RESNET_STRIDE), tmp_path)
    found = conversions_of_functionals(graph)
    frontier = 2  # layer4.2.conv2 and layer4.1 (test_dasr_moments.py, seed side)
    assert [(n.op_type, c) for n, c in found] == [("ReorderOutput", ["ReduceSum"])] * len(MOMENTS) * frontier


@pytest.mark.parametrize("stride", [4, 8])
def test_lite0_functionals_leave_it_only_where_a_layer_is_not_block_aligned(request, tmp_path, stride: int) -> None:
    graph = optimised_graph(moments_file(request, "efficientnet_lite0", stride), tmp_path)
    found = conversions_of_functionals(graph)
    producers = {o: n for n in graph.node for o in n.output}
    unaligned = {
        n.output[0]
        for n, _ in found
        if n.op_type == "ReorderOutput" and channels(n) is not None and channels(n) % BLOCK
    }
    sums = [n for n, c in found if c == ["ReduceSum"]]
    assert len(sums) == len(MOMENTS)
    for node, consumers in found:
        if node in sums or node.output[0] in unaligned:
            continue
        # a ReorderInput back into the blocked layout, of a concatenation of unaligned tensors only
        source = producers[node.input[0]]
        assert node.op_type == "ReorderInput" and source.op_type == "Concat", (node.op_type, consumers)
        assert set(source.input) <= unaligned, source.input
    assert unaligned, "efficientnet_lite0's first layers above the stop are not block-aligned"
