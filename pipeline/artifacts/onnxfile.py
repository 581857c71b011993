"""An exported ``.onnx`` model as an inference module: ONNX Runtime behind the torch module
interface (RGB in [0, 1] (B, 3, H, W) -> logits), so evaluation, prediction and serving run it
through the same protocol code (danet/inference.py) as the torch model.

``danet export`` writes the metadata read here (``METADATA``): the class names, palette, dataset
and the source model's reference and digest. A file without it was not written by ``danet
export`` and is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.artifacts.onnxgraph import INPUT, OUTPUT
from pipeline.artifacts.refs import LoadedModel, load_model
from pipeline.errors import ModelError, first_line
from pipeline.modelrefs import parse_model_ref

METADATA = ("classes", "palette", "dataset", "source_ref", "source_sha256")
CUDA = "CUDAExecutionProvider"


def session_options(threads: int = 0) -> Any:
    """ORT's options: by default as many threads as torch's (OMP_NUM_THREADS, or a Ray worker's
    share of the cores), not every core: more threads than cores spin-wait on each other."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers etc.
    return options


def providers_for(device: torch.device) -> list[str]:
    """CUDA when the device is a GPU and this ONNX Runtime build has it, else the CPU."""
    import onnxruntime as ort

    if device.type == "cuda" and CUDA in ort.get_available_providers():
        return [CUDA, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module. It has no parameters: ``.to()`` and ``.eval()``
    change nothing; inputs are copied to the host and outputs come back on the input's device.
    Pickled as the file's bytes (a Ray task gets a working copy)."""

    def __init__(self, model: bytes | str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        self.providers = providers or ["CPUExecutionProvider"]
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(
            source, sess_options=session_options(), providers=self.providers
        )
        self._bytes = model if isinstance(model, bytes) else None
        self._path = None if isinstance(model, bytes) else str(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (logits,) = self.session.run([OUTPUT], {INPUT: image})
        return torch.from_numpy(logits).to(x.device)

    def __reduce__(self) -> tuple[Any, ...]:
        data = self._bytes if self._bytes is not None else Path(str(self._path)).read_bytes()
        return (OnnxModule, (data, self.providers))


@dataclass(frozen=True)
class OnnxInfo:
    """What ``danet export`` wrote into the file's metadata."""

    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    dataset: str
    meta: dict[str, str]  # every metadata entry, as written


def read_onnx_info(session: Any, path: str | Path) -> OnnxInfo:
    meta: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in METADATA if key not in meta]
    if missing:
        raise ModelError(
            path, f"an ONNX file without {missing[0]!r} metadata (not from danet export)"
        )
    try:
        classes = tuple(str(c) for c in json.loads(meta["classes"]))
        palette = tuple((int(c[0]), int(c[1]), int(c[2])) for c in json.loads(meta["palette"]))
    except (ValueError, TypeError, IndexError) as err:
        raise ModelError(path, f"unreadable class metadata ({first_line(err)})") from None
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names[0] != [INPUT] or OUTPUT not in names[1]:
        raise ModelError(path, f"expects input {INPUT!r} and output {OUTPUT!r}, has {names}")
    if len(palette) != len(classes):
        raise ModelError(path, f"{len(classes)} class names and {len(palette)} colours")
    output = next(o for o in session.get_outputs() if o.name == OUTPUT)
    shape = list(output.shape or [])
    channels = shape[1] if len(shape) == 4 else None  # unknown: the probe at register checks
    if (shape and len(shape) != 4) or (isinstance(channels, int) and channels != len(classes)):
        raise ModelError(
            path,
            f"its output {OUTPUT!r} has shape {shape} but its metadata names {len(classes)} "
            "classes: not a danet export of this model (N, K, H, W)",
        )
    return OnnxInfo(classes, palette, meta["dataset"], meta)


# What an ONNX file attached to a model must do on the probe image (danet export's) beside the
# weights: a float graph the same logits, an INT8 graph the same labels on most pixels
# (quantization moves logits: argmax agreement, or for a model whose margins are tiny, an
# untrained one, logits within a small share of their spread).
FLOAT_TOLERANCE = 1e-3  # max |dlogits|, as danet export checks it
INT8_AGREEMENT = 0.9  # share of the probe's pixels whose labels agree
INT8_RELATIVE = 0.1  # RMS of dlogits / the weights' logits' standard deviation


def check_same_model(path: Path, module: nn.Module, quantized: bool) -> None:
    """The ONNX graph at ``path`` run on the probe image beside ``module`` (the weights it is
    attached to) must agree, whatever its metadata says: a foreign graph is one line."""
    from pipeline.artifacts.onnxgraph import probe_image

    image = torch.from_numpy(probe_image())
    try:
        ours = OnnxModule(path)(image).numpy()
    except Exception as err:  # onnxruntime's own error types
        raise ModelError(path, f"does not run on a probe image ({first_line(err)})") from None
    with torch.no_grad():
        theirs = module(image).numpy()
    if ours.shape != theirs.shape:
        shapes = f"{list(ours.shape)} where the weights give {list(theirs.shape)}"
        raise ModelError(
            path, f"gives logits of shape {shapes}: not an export of the registered model"
        )
    max_abs = float(np.abs(ours - theirs).max())
    agree = float((ours.argmax(1) == theirs.argmax(1)).mean())
    relative = float(np.sqrt(((ours - theirs) ** 2).mean()) / max(float(theirs.std()), 1e-12))
    if quantized:
        ok = agree >= INT8_AGREEMENT or relative <= INT8_RELATIVE
        want = f"labels agree on {agree:.1%} of a probe image's pixels (INT8: at least {INT8_AGREEMENT:.0%})"
    else:
        ok = max_abs <= FLOAT_TOLERANCE
        want = f"logits differ by up to {max_abs:.3g} on a probe image (float: at most {FLOAT_TOLERANCE:g})"
    if not ok:
        raise ModelError(
            path,
            f"not an export of the registered model's weights: {want}; export that model again",
        )


def load_onnx(path: str | Path, device: torch.device | None = None) -> tuple[OnnxModule, OnnxInfo]:
    """An ONNX file from ``danet export`` -> its inference module and metadata; a missing,
    corrupt or foreign file is one line."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "model file does not exist")
    check_self_contained(path)
    try:
        module = OnnxModule(path, providers_for(device or torch.device("cpu")))
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise ModelError(path, f"not a valid ONNX model ({first_line(err)})") from None
    return module, read_onnx_info(module.session, path)


def check_self_contained(path: Path) -> None:
    """An ONNX file names other files only as external tensor data, which ONNX Runtime would
    read from wherever the name points (``../../secret``): ``danet export`` writes every weight
    inside the file, so a graph that reads any other file is refused, before a session opens."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelError(path, f"not a valid ONNX model ({first_line(err)})") from None
    for tensor in _get_all_tensors(graph):
        if uses_external_data(tensor):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ModelError(
                path,
                f"tensor {tensor.name!r} reads its data from another file ({where!r}): not a "
                "danet export (which holds every weight inside the file); refused",
            )


def is_onnx(ref: str) -> bool:
    return parse_model_ref(ref).kind == "onnx"


def load_any_model(
    ref: str, tracking_uri: str = "", device: torch.device | None = None
) -> LoadedModel:
    """What evaluation and prediction load: an ``.onnx`` file from ``danet export`` (ONNX
    Runtime, on ``device``'s provider) or any reference ``load_model`` takes. Training and
    fine-tuning load through ``load_model`` alone, so this module is not part of their code."""
    if not is_onnx(ref):
        return load_model(ref, tracking_uri)
    module, info = load_onnx(ref, device)
    return LoadedModel(module, info.classes, info.palette, info.dataset, ref, ref, Path(ref))
