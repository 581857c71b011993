"""The release sections: the registered model and its ONNX export."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.schema import Section, param


@dataclass(frozen=True)
class RegisterParams(Section):
    """``danet register``: the MLflow registered model and what it is registered from."""

    NAME = "register"
    name: str = param("", name=True)  # "" = danet-<dataset>
    eval_metrics: str = "outputs/eval/metrics.json"
    out: str = "outputs/register/registered.json"
    # danet export files of the registered weights, served on request (params.runtime)
    onnx: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportParams(Section):
    """``danet export``: a model as an ONNX file for ONNX Runtime, TensorRT, OpenVINO, ..."""

    NAME = "export"
    model: str = ""  # model.pt, run id, runs:/ or models:/ URI
    out: str = "outputs/export/model.onnx"
    format: str = param("onnx", choices=("onnx",))
    # fused: ONNX Runtime's MultiHeadAttention, no N x N map (1024x2048 fits in memory);
    # standard: MatMul/Softmax, any runtime, holds the map (4 GiB per 1024x2048 image)
    attention: str = param("fused", choices=("fused", "standard"))
    opset: int = param(18, ge=17, le=23)
    quantize: str = param("none", choices=("none", "int8"))
    # int8: static quantization calibrated on images of these shards
    calibration_shards: str = "data/shards"
    calibration_split: str = param("train", name=True)
    calibration_images: int = param(32, ge=1, le=100_000)
    calibration_method: str = param("minmax", choices=("minmax", "percentile", "entropy"))
