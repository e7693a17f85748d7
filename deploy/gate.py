"""Accuracy gate: does the INT8 Q/DQ model still detect? If not, which layers must stay in float?

Both ONNX models run over the test split (capped by deploy.eval_images) through the runtime's own detector loop
(runtime.detector: pre-processing -> ONNX Runtime CPU runner -> numpy post-processing, as the deployed runtime runs
them) and runtime.metrics scores them; the same scoring runs on the device against the TensorRT engine
(``python -m deploy.verify BUNDLE --dataset DIR``), compared with the FP32 AP50 this gate records. When the AP50
drop exceeds deploy.ap50_drop_limit, a sensitivity pass measures, for each layer group
(backbone stages, FPN, head towers, ...), how much the output drift shrinks when that group alone computes in float
(its Q/DQ bypassed, same calibration), then keeps the most sensitive groups in float one by one, re-quantizing and
re-checking until the drop is within the limit.
"""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy.fidelity import ort_session
from deploy.quantize import QuantizeResult, head_output_nodes, prediction_layers, quantized_nodes
from runtime.backends.ort import OrtRunner
from runtime.backends.select import BackendChoice
from runtime.detector import Detector
from runtime.efficient_nms import PLUGIN_OP
from runtime.postprocess import PostprocessSpec, sigmoid
from runtime.preprocess import PreprocessSpec, read_image
from runtime.records import DetectionSet, ImageRecord

# Layer groups by the module path the exporter writes into node names, in network order.
GROUP_PATTERNS = (
    ("stem", r"^/backbone/body/(conv1|bn1|relu|maxpool)\b"),
    ("layer1", r"^/backbone/body/layer1/"), ("layer2", r"^/backbone/body/layer2/"),
    ("layer3", r"^/backbone/body/layer3/"), ("layer4", r"^/backbone/body/layer4/"),
    # MobileNetV3-Large `features` blocks by stage, under the ResNet names (stem, C2..C5 = layer1..layer4)
    ("stem", r"^/backbone/body/body\.[01]/"), ("layer1", r"^/backbone/body/body\.[23]/"),
    ("layer2", r"^/backbone/body/body\.[4-6]/"), ("layer3", r"^/backbone/body/body\.([7-9]|1[0-2])/"),
    ("layer4", r"^/backbone/body/body\.1[3-6]/"),
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
    """The gate's outcome: both scores, the drop in AP50 points, what had to stay in float, and which images were
    scored (so the device gate scores the engine on the same ones). ``int8`` is None when no INT8 model was made."""

    fp32: ModelScore
    int8: ModelScore | None
    drop_ap50: float | None
    limit: float
    passed: bool | None
    kept_float_groups: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    split: str = ""
    images: list[str] = field(default_factory=list)
    shipped: str = "int8"  # the precision the bundle ships: "int8", or the fallback ("fp16" / "fp32")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def evaluate_models(paths: dict[str, Path], records: Sequence[ImageRecord], classes: Sequence[str],
                    pre: PreprocessSpec, post: PostprocessSpec,
                    tail: onnx.ModelProto | None = None) -> dict[str, ModelScore]:
    """Run every model on each image in turn (side by side, same inputs) through runtime.detector's loop with an
    ONNX Runtime CPU runner, and score each with COCO AP50 (runtime.metrics).

    With ``tail`` (deploy.nms_graph) each network is scored with its in-graph NMS appended, as it is shipped; a
    tail that ends in TensorRT's EfficientNMS_TRT runs up to the plugin and the plugin's numpy reference
    (runtime.efficient_nms) finishes, as the runtime does with such a bundle on ONNX Runtime.
    """
    from runtime.data.coco import to_coco_dict
    from runtime.metrics import evaluate_coco

    names = {key: Path(path).name for key, path in paths.items()}
    dets: dict[str, list] = {k: [] for k in paths}
    times: dict[str, list[float]] = {k: [] for k in paths}
    with contextlib.ExitStack() as stack:
        nms = "host"
        if tail is not None:
            from deploy.nms_graph import attach_tail

            nms = "efficient-nms-trt" if any(n.op_type == PLUGIN_OP for n in tail.graph.node) else "onnx-nms"
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gate-")))
            merged = {}
            for key, path in paths.items():
                merged[key] = tmp / f"{key}.onnx"
                onnx.save(attach_tail(onnx.load(str(path)), tail), str(merged[key]))
            paths = merged
        detectors = {key: Detector.from_runner(BackendChoice(OrtRunner(path, "cpu"), "ort-cpu", Path(path), key,
                                                             "accuracy gate"), pre, post, classes, nms=nms)
                     for key, path in paths.items()}
        for det in detectors.values():
            stack.enter_context(det)
        for image_id, rec in enumerate(records, start=1):
            image = read_image(rec.path)
            for key, det in detectors.items():
                if image_id == 1:  # one untimed run each: first runs allocate and pick kernels
                    det.detect([image])
                dets[key] += det.detect([image])[0].to_coco_results(image_id)
                times[key].append(det.last_times.infer)
    gt = to_coco_dict(DetectionSet("gate", tuple(classes), list(records)))
    scores = {}
    for key in paths:
        metrics = evaluate_coco(gt, dets[key])
        scores[key] = ModelScore(names[key], float(metrics.AP50), float(metrics.AP), len(records),
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
    reference = _run_all(ort_session(_with_outputs(fp32, names)), feeds)

    def drift_of(model: onnx.ModelProto) -> float:
        outs = _run_all(ort_session(_with_outputs(model, names)), feeds)
        return float(np.mean([_drift(r, c, names) for r, c in zip(reference, outs)]))

    base = drift_of(int8)
    table = []
    for group, nodes in layer_groups(int8, max_groups):
        drift = drift_of(float_groups(int8, fp32, nodes))
        table.append({"group": group, "nodes": len(nodes), "drift_all_int8": base, "drift_group_float": drift,
                      "gain": base - drift, "node_names": nodes})
    return sorted(table, key=lambda row: row["gain"], reverse=True)


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
