"""``danet export``: any model reference -> one ONNX file, checked, run, and moved into place.

The graph (pipeline/artifacts/onnxgraph.py): input ``image`` float32 RGB in [0, 1] (N, 3, H, W),
N, H, W dynamic, normalisation inside; output ``logits`` (N, K, H, W) at input size. Opset 18:
the newest that ONNX Runtime, TensorRT 10 and OpenVINO 2024+ all read (its Resize, ReduceMean
with axes as an input); nothing DANet uses needs a later one.

The file's metadata carries ``classes`` (a JSON list), ``palette``, ``dataset``, ``source_ref``,
``source_uri`` and ``source_sha256`` (the digest of the model file it was exported from), the
attention form, opset and quantization. Before the file appears it passes ``onnx.checker`` and
one ONNX Runtime run on a probe image whose logits must match the torch module's (the float
export) or its labels (INT8); any failure leaves the old file, if any, as it was.

INT8 (``export.quantize: int8``): ONNX Runtime static quantization in QDQ form, per-channel
int8 weights and uint8 activations of every convolution, calibrated on images of the train
shards; the attention (its energies and softmax) and the resize stay float.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts.modelfile import file_sha256
from pipeline.artifacts.onnxgraph import INPUT, OUTPUT, export_onnx, probe_image
from pipeline.artifacts.refs import LoadedModel, load_model
from pipeline.config import ConfigError
from pipeline.errors import DataError
from pipeline.outputs import atomic_file, check_file_output, check_outside
from pipeline.sections import ExportParams

FLOAT_TOLERANCE = 1e-3  # max |logits| difference of the float export on the probe


@dataclass(frozen=True)
class Exported:
    out: Path
    source: str
    attention: str
    quantize: str
    megabytes: float
    seconds: float
    probe_max_abs: float  # max |logits(ONNX Runtime) - logits(torch)| on the probe image
    probe_agreement: float  # share of the probe's pixels whose labels agree

    def describe(self) -> str:
        kind = "int8" if self.quantize == "int8" else "float32"
        return (
            f"{self.source} -> {self.out} ({kind}, {self.attention} attention, "
            f"{self.megabytes:.1f} MB, {self.seconds:.0f} s; probe: max |dlogits| "
            f"{self.probe_max_abs:.2g}, labels agree on {self.probe_agreement:.2%})"
        )


def metadata(model: LoadedModel, params: ExportParams, digest: str) -> dict[str, str]:
    return {
        "classes": json.dumps(list(model.classes)),
        "palette": json.dumps([list(c) for c in model.palette]),
        "dataset": model.dataset,
        "source_ref": model.ref,
        "source_uri": model.uri,
        "source_sha256": digest,
        "attention": params.attention,
        "opset": str(params.opset),
        "quantize": params.quantize,
        "input": f"{INPUT}: float32 RGB in [0, 1], (N, 3, H, W); normalised inside",
        "output": f"{OUTPUT}: float32 (N, K, H, W) at input size; argmax over K = class ids",
        "producer": "danet export",
    }


def write_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.doc_string = "DANet (Fu et al., CVPR 2019) exported by danet export"
    onnx.save(graph, str(path))


def calibration_images(params: ExportParams) -> list[np.ndarray]:
    """``calibration_images`` images spread evenly over the split (each (1, 3, H, W) in [0, 1])."""
    from danet.inference import to_input
    from pipeline.data.loader import read_images
    from pipeline.data.manifest import load_manifest, shard_refs

    manifest = load_manifest(params.calibration_shards)
    total = manifest.split(params.calibration_split).samples
    if total == 0:
        raise DataError(
            f"{params.calibration_shards}/manifest.json",
            f"split {params.calibration_split!r} has no images to calibrate on",
        )
    every = max(total // params.calibration_images, 1)
    images: list[np.ndarray] = []
    index = 0
    for ref in shard_refs(manifest, params.calibration_split):
        for _, image in read_images(ref):  # images only will do: labels are not needed
            if index % every == 0 and len(images) < params.calibration_images:
                images.append(to_input(image).numpy())
            index += 1
    return images


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader``, read one image per range (``CalibStridedMinMax``
    = 1): the calibrator keeps one image's activations at a time, not every image's."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self._images = images
        self._next: Iterator[np.ndarray] = iter(images)

    def __len__(self) -> int:
        return len(self._images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._images[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._next, None)
        return None if image is None else {INPUT: image}


def quantize_int8(source: Path, target: Path, images: list[np.ndarray], method: str) -> None:
    """QDQ static quantization: int8 per-channel weights, uint8 activations, convolutions only
    (the attention's energies and softmax stay float; see the module docstring)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.name + ".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            _Calibration(images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method],
            extra_options={"CalibStridedMinMax": 1},
        )
    finally:
        prepared.unlink(missing_ok=True)
        for extra in target.parent.glob(f"{prepared.name}*"):
            extra.unlink(missing_ok=True)


def check_and_probe(path: Path, model: LoadedModel, quantized: bool) -> tuple[float, float]:
    """``onnx.checker`` and one ONNX Runtime run against the torch module on the probe image:
    (max |dlogits|, label agreement). A float export that disagrees is a bug (traceback)."""
    import onnx

    from pipeline.artifacts.onnxfile import OnnxModule

    onnx.checker.check_model(str(path))
    image = probe_image()
    ours = OnnxModule(path)(torch.from_numpy(image)).numpy()
    with torch.no_grad():
        theirs = model.module(torch.from_numpy(image)).numpy()
    max_abs = float(np.abs(ours - theirs).max())
    agreement = float((ours.argmax(1) == theirs.argmax(1)).mean())
    if not quantized and not max_abs <= FLOAT_TOLERANCE:
        raise RuntimeError(f"the exported graph differs from the torch model by {max_abs:.3g}")
    return max_abs, agreement


def export_model(params: ExportParams, tracking_uri: str = "") -> Exported:
    """Export ``params.model`` to ``params.out`` (atomically); INT8 when ``params.quantize``."""
    if not params.model:
        raise ConfigError("export.model: give the model to export (--model)")
    out = Path(params.out)
    if out.suffix != ".onnx":
        raise ConfigError(f"export.out {params.out}: must end in .onnx")
    check_file_output(out, "export.out")
    check_outside(out, {"export.model": params.model})
    if params.quantize == "int8":
        check_outside(out, {"export.calibration_shards": params.calibration_shards})
    start = time.perf_counter()
    if Path(params.model).suffix == ".onnx":
        raise ConfigError(f"export.model {params.model}: already an ONNX file")
    model = load_model(params.model, tracking_uri)
    images = calibration_images(params) if params.quantize == "int8" else []
    assert model.weights is not None
    meta = metadata(model, params, file_sha256(model.weights))
    with atomic_file(out) as tmp:
        export_onnx(model.module, tmp, params.attention, params.opset)  # type: ignore[arg-type]
        if images:
            floating = tmp.with_name(tmp.name + ".float.onnx")
            try:
                tmp.replace(floating)
                quantize_int8(floating, tmp, images, params.calibration_method)
            finally:
                floating.unlink(missing_ok=True)
        write_metadata(tmp, meta)
        max_abs, agreement = check_and_probe(tmp, model, quantized=bool(images))
        size = tmp.stat().st_size / 1e6
    return Exported(
        out,
        params.model,
        params.attention,
        params.quantize,
        size,
        time.perf_counter() - start,
        max_abs,
        agreement,
    )
