"""The deployed detector: bundle -> pre-processing -> backend -> post-processing, batched.

This is the one object the CLIs (infer, bench, evaluate) and tiling use. Detections come back in each original
image's pixels. Every call records how long pre-processing, inference and post-processing took, so the latency
harness measures exactly what applications run.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.ort import OrtRunner
from runtime.backends.select import BACKENDS, PRECISIONS, BackendChoice, select_backend
from runtime.efficient_nms import PLUGIN_INPUTS
from runtime.errors import UserError
from runtime.manifest import Bundle, load_bundle
from runtime.postprocess import Detections, PostprocessSpec, build_postprocess
from runtime.preprocess import PreprocessSpec, preprocess_batch, read_image


@dataclass
class StageTimes:
    """Seconds spent in each stage of one detect() call."""

    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0
    images: int = 0

    def add(self, other: StageTimes) -> None:
        """Accumulate another call's times into these."""
        self.preprocess += other.preprocess
        self.infer += other.infer
        self.postprocess += other.postprocess
        self.total += other.total
        self.images += other.images


class Detector:
    """A bundle ready to detect: ``with Detector(path) as det: dets = det.detect([image, ...])``."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "auto", precision: str = "auto",
                 threads: int | None = None, score_thresh: float | None = None, batch_size: int = 8,
                 verify: bool = True):
        self.bundle: Bundle | None = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        manifest = self.bundle.manifest
        self.choice: BackendChoice = select_backend(self.bundle, backend, precision, threads)
        self.runner = self.choice.runner
        self._configure(manifest.preprocess, manifest.postprocess, manifest.classes, manifest.input.name,
                        score_thresh, batch_size, manifest.nms)

    @classmethod
    def from_runner(cls, choice: BackendChoice, preprocess: PreprocessSpec, postprocess: PostprocessSpec,
                    classes: Sequence[str], input_name: str = "images", batch_size: int = 1,
                    nms: str = "host") -> Detector:
        """A detector over a runner chosen by the caller, without a bundle on disk (deploy's accuracy gate scores
        the models it is about to ship with the very loop the runtime runs)."""
        self = cls.__new__(cls)
        self.bundle = None
        self.choice, self.runner = choice, choice.runner
        self._configure(preprocess, postprocess, tuple(classes), input_name, None, batch_size, nms)
        return self

    def _configure(self, pre_spec: PreprocessSpec, post_spec: PostprocessSpec, classes: Sequence[str],
                   input_name: str, score_thresh: float | None, batch_size: int, nms: str) -> None:
        self.nms = nms
        self.min_score: float | None = None  # extra filter on the outputs of a graph that ends in NMS
        if score_thresh is not None:
            if not 0 <= score_thresh < 1:
                raise UserError(f"score threshold must be in [0, 1), got {score_thresh}", "--score-thresh")
            if post_spec.kind != "padded":
                post_spec = post_spec.model_copy(update={"score_thresh": float(score_thresh)})
            elif score_thresh < post_spec.score_thresh:
                raise UserError(f"this bundle's graph applies NMS at score {post_spec.score_thresh:g}: "
                                f"{score_thresh:g} is below it", "--score-thresh",
                                "use a threshold at or above it, or build the bundle with --nms host")
            else:
                # Dropping boxes below a higher threshold after NMS is exact: a box only ever suppresses
                # lower-scoring boxes, so the survivors above the threshold are the same either way.
                self.min_score = float(score_thresh)
        self.post_spec = post_spec
        self.pre_spec = pre_spec
        self.classes: tuple[str, ...] = tuple(classes)
        self.input_name = input_name
        self.input_size: tuple[int, int] = tuple(self.pre_spec.input_size)  # type: ignore[assignment]
        self.nms_iou = post_spec.nms_iou
        self.max_detections = post_spec.max_detections
        self.batch_size = max(1, int(batch_size))
        # ONNX Runtime cannot execute TensorRT's EfficientNMS_TRT: it runs the graph up to the plugin's inputs and
        # the plugin's numpy reference (runtime.efficient_nms) finishes on the host.
        plugin_on_host = nms == "efficient-nms-trt" and isinstance(self.runner, OrtRunner)
        if plugin_on_host:
            self.runner.stop_at = PLUGIN_INPUTS
        self.postprocess = build_postprocess(post_spec, plugin_on_host)
        self.last_times = StageTimes()  # of the last detect() call
        self.cumulative_times = StageTimes()  # of every call since construction (tiling makes several per scene)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def open(self) -> Detector:
        """Load the model into the backend (done on first use anyway)."""
        if not self.runner.is_active:
            self.runner.activate()
            try:
                self._check_input()
            except BaseException:
                self.runner.deactivate()
                raise
        return self

    def close(self) -> None:
        """Release the backend."""
        self.runner.deactivate()

    def __enter__(self) -> Detector:
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _check_input(self) -> None:
        meta = self.runner.get_input_metadata()
        if self.input_name not in meta:
            raise UserError(f"the model has inputs {sorted(meta)}, the manifest names '{self.input_name}'",
                            str(self.choice.model_path), "rebuild the bundle")
        self._input_meta = meta[self.input_name]
        # A fixed batch axis (the default export) means chunks of exactly that size. Graphs that end in detections
        # (Faster R-CNN) return a variable number of boxes without a batch axis: one image per call.
        self._no_batch_axis = len(self._input_meta.shape) == 3
        self._per_image = self._no_batch_axis or self.post_spec.kind == "detections"
        self._static_batch = 1 if self._per_image else self._input_meta.static_batch
        limit = self.runner.max_batch(self.input_name)  # a TensorRT profile caps a dynamic batch axis
        if limit:
            self.batch_size = min(self.batch_size, limit)

    # -- detection -------------------------------------------------------------------------------------------------
    def _chunks(self, count: int) -> list[tuple[int, int]]:
        size = self._static_batch or self.batch_size
        return [(start, min(start + size, count)) for start in range(0, count, size)]

    def _run(self, batch: np.ndarray) -> tuple[list[dict[str, np.ndarray]], float]:
        """Named outputs for ``batch`` (one dict per backend call), and the seconds the backend spent on it."""
        n = len(batch)
        if self._per_image:
            outs, seconds = [], 0.0
            for x in batch:
                outs.append(self.runner.infer({self.input_name: x if self._no_batch_axis else x[None]}))
                seconds += self.runner.last_inference_time() or 0.0
            return outs, seconds
        if self._static_batch and n < self._static_batch:
            # Fill a fixed-size batch with copies of the last image and drop their outputs.
            batch = np.concatenate([batch, np.repeat(batch[-1:], self._static_batch - n, axis=0)])
        outputs = self.runner.infer({self.input_name: batch})
        return [{k: v[:n] for k, v in outputs.items()}], self.runner.last_inference_time() or 0.0

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of each uint8 RGB (H, W, 3) image, boxes xyxy in that image's pixels."""
        if len(images) == 0:
            return []
        self.open()
        times = StageTimes(images=len(images))
        start_all = time.perf_counter()
        results: list[Detections] = []
        for lo, hi in self._chunks(len(images)):
            t0 = time.perf_counter()
            batch, transforms = preprocess_batch(images[lo:hi], self.pre_spec)
            t1 = time.perf_counter()
            outputs, infer_s = self._run(batch)
            t2 = time.perf_counter()
            dets = [d for out in outputs for d in self.postprocess.from_outputs(out, self.input_size)]
            if self.min_score is not None:
                dets = [_above(d, self.min_score) for d in dets]
            results.extend(Detections(tf.boxes_to_original(d.boxes), d.scores, d.labels)
                           for d, tf in zip(dets, transforms))
            t3 = time.perf_counter()
            times.preprocess += t1 - t0
            times.infer += infer_s
            times.postprocess += t3 - t2
        times.total = time.perf_counter() - start_all
        self.last_times = times
        self.cumulative_times.add(times)
        return results

    def detect_files(self, paths: Sequence[str | Path]) -> list[Detections]:
        """Read image files (uint8 RGB) and detect on them."""
        return self.detect([read_image(p) for p in paths])

    def describe(self) -> dict[str, Any]:
        """Backend, model file, precision and thresholds, for reports."""
        info = self.runner.describe()
        manifest = self.bundle.manifest if self.bundle is not None else None
        return {"backend": self.choice.backend, "model_file": self.choice.model_path.name,
                "precision": self.choice.precision, "why": self.choice.reason, "runner": info,
                "input_size": list(self.input_size),
                "score_thresh": self.min_score if self.min_score is not None else self.post_spec.score_thresh,
                "nms_iou": self.nms_iou, "max_detections": self.max_detections, "nms": self.nms,
                "postprocess": type(self.postprocess).__name__,
                "pipeline": manifest.pipeline if manifest else None, "target": manifest.target if manifest else None,
                "model_role": manifest.model_role if manifest else None}


def _above(dets: Detections, min_score: float) -> Detections:
    keep = dets.scores > min_score
    return Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])


def default_report_path(detector: Detector, stem: str) -> Path:
    """reports/<pipeline>/<target>/<stem>_<backend>_<precision>.json under the current directory.

    Not inside the bundle: deploy.build replaces a bundle directory as a whole, which would drop the reports.
    """
    manifest = detector.bundle.manifest
    return Path("reports") / manifest.pipeline / manifest.target / \
        f"{stem}_{detector.choice.backend}_{detector.choice.precision}.json"


def add_detector_args(parser: argparse.ArgumentParser) -> None:
    """The bundle argument and the backend options every runtime CLI shares."""
    parser.add_argument("bundle", type=Path,
                        help="bundle directory made by deploy.build (artifacts/<pipeline>/<target>)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: TensorRT engine if usable, else ONNX Runtime on CUDA, else on the CPU")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="which of the bundle's ONNX models (auto: INT8 when the bundle has it)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="minimum score (default: the manifest's, 0.05 as in the reference evaluation)")
    parser.add_argument("--batch", type=int, default=1, help="images per backend call (a fixed-batch model chunks)")


def detector_from_args(args: argparse.Namespace) -> Detector:
    """A Detector from the options of :func:`add_detector_args` (bundle verified against its manifest)."""
    if args.batch < 1:
        raise UserError(f"must be at least 1, got {args.batch}", "--batch")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"must be at least 1, got {args.threads}", "--threads")
    return Detector(args.bundle, backend=args.backend, precision=args.precision, threads=args.threads,
                    score_thresh=args.score_thresh, batch_size=args.batch)
