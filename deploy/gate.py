"""Accuracy gate: does the INT8 Q/DQ model still detect? If not, which layers must stay in float?

Both ONNX models run under ONNX Runtime on the CPU over the test split (capped by deploy.eval_images), their raw
outputs go through runtime.postprocess (the numpy post-processing the deployed runtime uses) and runtime.metrics
scores them. When the AP50 drop exceeds deploy.ap50_drop_limit, a sensitivity pass measures, for each layer group
(backbone stages, FPN, head towers, ...), how much the output drift shrinks when that group alone computes in float
(its Q/DQ bypassed, same calibration), then keeps the most sensitive groups in float one by one, re-quantizing and
re-checking until the drop is within the limit.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy.fidelity import ort_session
from deploy.quantize import QuantizeResult, head_output_nodes, prediction_layers, quantized_nodes
from runtime.efficient_nms import PLUGIN_INPUTS, PLUGIN_OP
from runtime.postprocess import PostprocessSpec, build_postprocess, sigmoid
from runtime.preprocess import PreprocessSpec, preprocess_batch, read_image
from runtime.records import DetectionSet, ImageRecord

# Layer groups by the module path the exporter writes into node names, in network order.
GROUP_PATTERNS = (
    ("stem", r"^/backbone/body/(conv1|bn1|relu|maxpool)\b"),
    ("layer1", r"^/backbone/body/layer1/"), ("layer2", r"^/backbone/body/layer2/"),
    ("layer3", r"^/backbone/body/layer3/"), ("layer4", r"^/backbone/body/layer4/"),
    ("fpn", r"^/backbone/fpn/"),
    ("cls_tower", r"^/head/classification_head/"), ("reg_tower", r"^/head/regression_head/"),
    ("rpn", r"^/rpn/"), ("roi_heads", r"^/roi_heads/"),
)


@dataclass(frozen=True)
class ModelScore:
    """Accuracy and host latency of one ONNX model on the evaluated images."""

    file: str
    AP50: float
    AP: float
    images: int
    latency_ms_median: float


@dataclass
class GateReport:
    """The gate's outcome: both scores, the drop in AP50 points, and what had to stay in float."""

    fp32: ModelScore
    int8: ModelScore
    drop_ap50: float
    limit: float
    passed: bool
    kept_float_groups: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _outputs(session: Any) -> list[str]:
    return [o.name for o in session.get_outputs()]


def _gate_session(path: Path, tail: onnx.ModelProto | None) -> Any:
    """ORT session of a network as shipped: with its in-graph NMS tail, cut before a TensorRT plugin if it has one."""
    if tail is None:
        return ort_session(path)
    from deploy.nms_graph import attach_tail
    from runtime.backends.ort import graph_until

    merged = attach_tail(onnx.load(str(path)), tail)
    if any(n.op_type == PLUGIN_OP for n in merged.graph.node):
        return ort_session_from(graph_until(merged, PLUGIN_INPUTS))
    return ort_session_bytes(merged)


def evaluate_models(paths: dict[str, Path], records: Sequence[ImageRecord], classes: Sequence[str],
                    pre: PreprocessSpec, post: PostprocessSpec,
                    tail: onnx.ModelProto | None = None) -> dict[str, ModelScore]:
    """Run every model on each image in turn (side by side, same inputs) and score each with COCO AP50.

    With ``tail`` (deploy.nms_graph) each network is scored with its in-graph NMS appended, as it is shipped; a
    tail that ends in TensorRT's EfficientNMS_TRT runs up to the plugin and the plugin's numpy reference
    (runtime.efficient_nms) finishes, since ONNX Runtime cannot execute the plugin.
    """
    from runtime.data.coco import to_coco_dict
    from runtime.metrics import evaluate_coco

    sessions = {k: _gate_session(p, tail) for k, p in paths.items()}
    plugin = tail is not None and any(n.op_type == PLUGIN_OP for n in tail.graph.node)
    postprocess = build_postprocess(post, plugin_on_host=plugin)
    dets: dict[str, list] = {k: [] for k in paths}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for image_id, rec in enumerate(records, start=1):
        batch, (transform,) = preprocess_batch([read_image(rec.path)], pre)
        if image_id == 1:  # one untimed run each: first runs allocate and pick kernels
            for sess in sessions.values():
                sess.run(None, {"images": batch})
        for key, sess in sessions.items():
            start = time.perf_counter()
            out = sess.run(None, {"images": batch})
            times[key].append(time.perf_counter() - start)
            found = postprocess.from_outputs(dict(zip(_outputs(sess), out)), pre.input_size)[0]
            found.boxes = transform.boxes_to_original(found.boxes)
            dets[key] += found.to_coco_results(image_id)
    gt = to_coco_dict(DetectionSet("gate", tuple(classes), list(records)))
    scores = {}
    for key in paths:
        metrics = evaluate_coco(gt, dets[key])
        scores[key] = ModelScore(Path(paths[key]).name, float(metrics.AP50), float(metrics.AP), len(records),
                                 1000 * float(np.median(times[key])))
    return scores


def layer_groups(model: onnx.ModelProto, max_groups: int) -> list[tuple[str, list[str]]]:
    """Quantized nodes grouped by module (at most `max_groups`; the tail groups merge into the last one)."""
    head = set(head_output_nodes(model))
    quantized = [n.name for n in model.graph.node if n.name in quantized_nodes(model) and n.name not in head]
    groups: dict[str, list[str]] = {}
    for name in quantized:
        label = next((g for g, pattern in GROUP_PATTERNS if re.search(pattern, name)), "other")
        groups.setdefault(label, []).append(name)
    items = list(groups.items())
    if len(items) > max_groups:
        tail = items[max_groups - 1:]
        items = items[:max_groups - 1] + [("+".join(g for g, _ in tail), [n for _, ns in tail for n in ns])]
    return items


def float_groups(int8: onnx.ModelProto, fp32: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """A copy of the Q/DQ model where `nodes` read float inputs again (their Q/DQ bypassed, same calibration)."""
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    producers = {o: n for n in model.graph.node for o in n.output}
    fp32_producers = {o: n for n in fp32.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in model.graph.initializer}
    wanted, ordered, restored = set(nodes), [], set()
    for node in model.graph.node:
        if node.name in wanted:
            for idx, name in enumerate(node.input):
                dq = producers.get(name)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                q = producers.get(dq.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    src = q.input[0]  # the activation (or modelopt's float weight) before Q/DQ
                    origin, here = fp32_producers.get(src), producers.get(src)
                    if origin is not None and origin.op_type == "Relu" and (here is None or here.op_type != "Relu"):
                        # ORT dropped this ReLU (its u8 range clamps at 0 anyway): a float reader needs it back.
                        if src not in restored:
                            ordered.append(onnx.helper.make_node("Relu", [src], [src + "__relu"],
                                                                 name=src + "__float_relu"))
                            restored.add(src)
                        src += "__relu"
                    node.input[idx] = src
                    continue
                # ORT stores weights/biases as integer initializers: take the float tensor from the FP32 model.
                original = fp32_nodes.get(node.name)
                if original is None or idx >= len(original.input) or original.input[idx] not in fp32_inits:
                    continue
                # A fresh name: ORT names the dequantized bias like the original tensor.
                src, copy_name = original.input[idx], original.input[idx] + "__float"
                if copy_name not in have:
                    init = onnx.TensorProto()
                    init.CopyFrom(fp32_inits[src])
                    init.name = copy_name
                    model.graph.initializer.append(init)
                    have.add(copy_name)
                node.input[idx] = copy_name
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    _prune(model)
    return model


def _referenced(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Tensor names read by `nodes`, including those read from inside their subgraphs (If / Loop bodies)."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _referenced(graph.node)
    return names


def _prune(model: onnx.ModelProto) -> None:
    """Remove nodes (and initializers) whose outputs nothing uses any more."""
    graph = model.graph
    while True:
        used = _referenced(graph.node) | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = _referenced(graph.node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def probe_tensors(fp32: onnx.ModelProto) -> list[str]:
    """Tensors the drift is measured on: the graph outputs when their shapes are fixed (RetinaNet raw outputs),
    else the outputs of the first prediction layers (Faster R-CNN's RPN: detections vary in number)."""
    outputs = fp32.graph.output
    if all(d.dim_value > 0 for o in outputs for d in o.type.tensor_type.shape.dim):
        return [o.name for o in outputs]
    return [out for node in prediction_layers(fp32) for out in node.output]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `names` (intermediate tensors become outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return probe


def _drift(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> float:
    """Mean relative L2 error over tensors; logits compare as probabilities (what the score threshold sees)."""
    errors = []
    for name, ref, cand in zip(names, reference, candidate):
        if "cls_logits" in name:
            ref, cand = sigmoid(ref), sigmoid(cand)
        errors.append(float(np.linalg.norm(cand - ref) / (np.linalg.norm(ref) + 1e-12)))
    return float(np.mean(errors))


def _run_all(session: Any, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    return [session.run(None, dict(f)) for f in feeds]


def sensitivity(fp32_path: Path, int8_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                max_groups: int) -> list[dict[str, Any]]:
    """Per layer group: output drift vs FP32 with that group alone in float, most helpful group first."""
    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    names = probe_tensors(fp32)
    reference = _run_all(ort_session_bytes(_with_outputs(fp32, names)), feeds)

    def drift_of(model: onnx.ModelProto) -> float:
        outs = _run_all(ort_session_bytes(_with_outputs(model, names)), feeds)
        return float(np.mean([_drift(r, c, names) for r, c in zip(reference, outs)]))

    base = drift_of(int8)
    table = []
    for group, nodes in layer_groups(int8, max_groups):
        drift = drift_of(float_groups(int8, fp32, nodes))
        table.append({"group": group, "nodes": len(nodes), "drift_all_int8": base, "drift_group_float": drift,
                      "gain": base - drift, "node_names": nodes})
    return sorted(table, key=lambda row: row["gain"], reverse=True)


def ort_session_bytes(model: onnx.ModelProto) -> Any:
    """An ORT CPU session of an in-memory model."""
    return ort_session_from(model.SerializeToString())


def ort_session_from(data: bytes) -> Any:
    """An ORT CPU session from serialized model bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def accuracy_gate(fp32_path: Path, int8: QuantizeResult, requantize: Callable[[list[str]], QuantizeResult],
                  evaluate: Callable[[dict[str, Path]], dict[str, ModelScore]], limit: float, max_groups: int,
                  feeds: Sequence[dict[str, np.ndarray]], report_path: Path | None = None,
                  progress: Callable[[str], None] = lambda _msg: None) -> tuple[GateReport, QuantizeResult]:
    """Check the AP50 drop; above `limit`, keep the most sensitive groups in float until within it.

    `requantize(node_names)` returns a new INT8 model with those nodes excluded; `evaluate(paths)` scores models.
    Returns the report and the INT8 model to ship (the last one made).
    """
    scores = evaluate({"fp32": fp32_path, "int8": int8.path})
    fp32, current = scores["fp32"], scores["int8"]
    drop = 100 * (fp32.AP50 - current.AP50)
    report = GateReport(fp32, current, drop, limit, drop <= limit)
    progress(f"AP50 fp32 {100 * fp32.AP50:.2f}, int8 {100 * current.AP50:.2f} (drop {drop:.2f}, limit {limit:g})")
    if not report.passed:
        progress("AP50 drop above the limit: measuring per-group sensitivity")
        table = sensitivity(fp32_path, int8.path, feeds, max_groups)
        report.sensitivity = [{k: v for k, v in row.items() if k != "node_names"} for row in table]
        kept: list[str] = []
        for row in table:
            if row["gain"] <= 0:
                break  # groups whose float copy does not reduce drift cannot help
            kept.extend(row["node_names"])
            report.kept_float_groups.append(row["group"])
            int8 = requantize(kept)
            current = evaluate({"int8": int8.path})["int8"]
            drop = 100 * (fp32.AP50 - current.AP50)
            report.steps.append({"kept_float_groups": list(report.kept_float_groups), "AP50": current.AP50,
                                 "drop_ap50": drop})
            progress(f"kept {', '.join(report.kept_float_groups)} in float: AP50 drop {drop:.2f}")
            if drop <= limit:
                break
        report.int8, report.drop_ap50, report.passed = current, drop, drop <= limit
    if report_path is not None:
        report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return report, int8
