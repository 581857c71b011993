"""The served model: encoded images in, label maps out (an MLflow ``pyfunc``).

A request is a table with a column ``image`` holding PNG or JPEG bytes -- base64 strings in
MLflow's JSON scoring protocol -- and optional ``params``: ``mode`` (whole | slide), ``crop``,
``flip``, ``slide_above`` (whole image up to that long side, sliding window beyond) and
``runtime``: ``torch`` (the weights), or ``onnx`` / ``onnx-int8`` (ONNX Runtime on the float or
INT8 file of ``danet export``, where ``danet register`` attached one: ``register.onnx``), the
same protocols either way. The answer has, per image, ``labels`` (a single-channel PNG of train
ids, base64), ``height`` and ``width``; the class names and palette are the model's metadata (and
``classes.json``). The logged model also carries ``model.pt``, the raw weights, for Python users
(pipeline/artifacts/modelfile.py reads it), and the attached ``.onnx`` files.

A request's work is bounded before any of it starts (``check_request``): every image is decoded
(at most ``MAX_PIXELS``, pipeline/images.py) and its protocol's forward passes counted
(danet/inference.py ``passes``): one pass at most ``MAX_CROP``² pixels, and all of an image's
passes at most ``WORK_PER_PIXEL`` times its pixels (at least ``MIN_WORK``): a sliding window far
larger than its image is refused at once instead of timing out. Every failure is one line of
JSON (``RequestError``), never a stack trace: a bad request is HTTP 400, the model's own failure
500 (its traceback goes to the server's log).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from danet.inference import Protocol, check_work, label_map, protocol_for
from pipeline.artifacts.modelfile import ModelInfo, load_model_file
from pipeline.devices import pick_device
from pipeline.errors import first_line
from pipeline.images import MAX_PIXELS, TooLarge, decode_rgb
from pipeline.mlflowstore import WRITER_TAG
from pipeline.outputs import writer_id
from pipeline.schema import MAX_CROP, MAX_SIDE
from pipeline.sections import PredictParams

_PREDICT = PredictParams()  # the request's defaults are danet predict's
DEFAULT_PARAMS: dict[str, Any] = {
    "mode": _PREDICT.mode,
    "crop": _PREDICT.crop,
    "flip": _PREDICT.flip,
    "slide_above": _PREDICT.slide_above,
    "runtime": "torch",
}
TORCH = "torch"
log = logging.getLogger(__name__)
RUNTIMES = (TORCH, "onnx", "onnx-int8")  # the weights; ONNX Runtime on a float or INT8 export
WORK_PER_PIXEL = 16  # an image's forward passes may cover it this many times (slide + flip: 4.5)
MAX_IMAGES = 64  # images one request may hold ...
MAX_REQUEST_PIXELS = 2 * MAX_PIXELS  # ... and their pixels together (each header read first)
MIN_WORK = 1024 * 1024  # ... or this many pixels, whatever its size (a 512 window, 4 times)


class RequestError(MlflowException):
    """A failed request: one line and no stack trace, HTTP 400 (a bad request) or 500 (``error_code``
    INTERNAL_ERROR: the model failed). MLflow's scoring server prefixes a prediction error's
    message with the request's repr (many lines); this keeps the first."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def decode(value: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image cell (bytes, or base64 text) -> (H, W, 3) uint8; ``ValueError`` for anything
    that is not a PNG or JPEG, or has more than ``max_pixels`` (read from its header): only
    those two parsers ever see the bytes (pipeline/images.py)."""
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        try:
            data = base64.b64decode(str(value), validate=True)
        except binascii.Error:
            raise ValueError("not a PNG or JPEG (not base64)") from None
    try:
        return decode_rgb(data, ("PNG", "JPEG"), max_pixels, kind="a PNG or JPEG")
    except TooLarge as err:
        raise ValueError(f"{err}: send it smaller") from None


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """The request's params over the defaults, each checked (one line naming it)."""
    options = {**DEFAULT_PARAMS, **(params or {})}
    if options["mode"] not in ("auto", "whole", "slide"):
        raise RequestError(f"params.mode must be auto, whole or slide, got {options['mode']!r}")
    if options["runtime"] not in RUNTIMES:
        raise RequestError(
            f"params.runtime must be {', '.join(RUNTIMES)}, got {options['runtime']!r}"
        )
    for key, low, high in (("crop", 16, MAX_CROP), ("slide_above", 0, MAX_SIDE)):
        value = options[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RequestError(f"params.{key} must be an integer >= {low}, got {value!r}")
        if value > high:  # a window or a size past what one image may take
            raise RequestError(f"params.{key} must be <= {high}, got {value}")
    if not isinstance(options["flip"], bool):
        raise RequestError(f"params.flip must be true or false, got {options['flip']!r}")
    return options


def protocol_of(image: np.ndarray, options: dict[str, Any]) -> Protocol:
    """The protocol of one image under the request's (checked) ``options``."""
    keys = ("mode", "crop", "flip", "slide_above")  # a request's other params are not ours
    return protocol_for(image.shape[:2], **{k: options[k] for k in keys})


def check_request(images: list[np.ndarray], options: dict[str, Any]) -> None:
    """Every image's work within the bounds (module docstring), before any of it starts."""
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        budget = max(WORK_PER_PIXEL * h * w, MIN_WORK)
        try:
            check_work(h, w, protocol_of(image, options), MAX_CROP**2, MAX_PIXELS, budget)
        except ValueError as err:
            raise RequestError(f"image {i}: {err}") from None


def encode_labels(labels: np.ndarray) -> str:
    """(H, W) train ids -> a single-channel PNG, base64."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class LabelMapModel(PythonModel):
    """MLflow pyfunc around a ``model.pt`` and the ONNX files attached to it: encoded images ->
    label maps."""

    def load_context(self, context: Any) -> None:
        self.device = pick_device()
        segmenter, self.info = load_model_file(context.artifacts["model"])
        self.segmenters: dict[str, Any] = {TORCH: segmenter.to(self.device)}
        attached = [k for k in RUNTIMES if k in context.artifacts]
        if attached:  # ONNX Runtime only where a file is attached: a torch-only model needs none
            from pipeline.artifacts.onnxfile import load_onnx

            for key in attached:
                self.segmenters[key] = load_onnx(context.artifacts[key], self.device)[0]

    def label(self, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        protocol = protocol_of(image, params)
        return label_map(self.segmenters[params["runtime"]], image, protocol, self.device)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """The label maps of a request; any failure is one line (``RequestError``)."""
        try:
            return self.answer(model_input, params)
        except RequestError:
            raise
        except Exception as err:  # a bug or the machine (out of memory): one line, 500, logged
            log.exception("the model failed on a request")
            raise RequestError(
                f"the model failed on this request ({type(err).__name__}: {first_line(err)})",
                error_code=INTERNAL_ERROR,
            ) from None

    def answer(self, model_input: Any, params: dict[str, Any] | None) -> Any:
        import pandas as pd

        options = check_params(params or {})
        if options["runtime"] not in self.segmenters:
            raise RequestError(
                f"params.runtime {options['runtime']!r}: this model has no such file (it has "
                f"{', '.join(self.segmenters)}; danet register attaches ONNX files: register.onnx)"
            )
        if "image" not in getattr(model_input, "columns", ()):
            raise RequestError("the request has no column 'image' (PNG or JPEG bytes, base64)")
        cells = list(model_input["image"])
        if len(cells) > MAX_IMAGES:  # each may decode to MAX_PIXELS: bounded before any decodes
            raise RequestError(
                f"the request holds {len(cells)} images: at most {MAX_IMAGES} (send them in parts)"
            )
        images, left = [], MAX_REQUEST_PIXELS
        for i, value in enumerate(cells):
            try:
                images.append(decode(value, min(MAX_PIXELS, left)))
                left -= images[-1].shape[0] * images[-1].shape[1]
            except ValueError as err:
                raise RequestError(f"image {i}: {err}") from None
        check_request(images, options)
        rows = []
        for image in images:
            labels = self.label(image, options)
            rows.append(
                {
                    "labels": encode_labels(labels),
                    "height": labels.shape[0],
                    "width": labels.shape[1],
                }
            )
        return pd.DataFrame(rows, columns=["labels", "height", "width"])


def signature_and_example(info: ModelInfo) -> tuple[Any, Any]:
    """The signature (image column, protocol params, label maps) and a real input example."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from PIL import Image

    params = ParamSchema(
        [
            ParamSpec("mode", "string", DEFAULT_PARAMS["mode"]),
            ParamSpec("crop", "long", DEFAULT_PARAMS["crop"]),
            ParamSpec("flip", "boolean", DEFAULT_PARAMS["flip"]),
            ParamSpec("slide_above", "long", DEFAULT_PARAMS["slide_above"]),
            ParamSpec("runtime", "string", DEFAULT_PARAMS["runtime"]),
        ]
    )
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [ColSpec("string", "labels"), ColSpec("long", "height"), ColSpec("long", "width")]
        ),
        params=params,
    )
    from pipeline.data.readers.scene import render_scene

    rgb, _ = render_scene(seed=0, width=64, height=48)  # a street scene, as a user would send
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return signature, pd.DataFrame({"image": [buffer.getvalue()]})


def log_served_model(
    model_file: Path,
    info: ModelInfo,
    onnx: Mapping[str, Path] | None = None,
    digests: Mapping[str, str] | None = None,
    name: str = "model",
    source: str = "",
) -> Any:
    """Log ``model_file`` into the active run as the served model (``danet register`` does):
    this module's pyfunc with a signature, an input example, the weights (``model.pt``) and the
    classes, palette and the weights' own ``best_val_miou`` as metadata. ``onnx``: runtimes
    (``onnx``, ``onnx-int8``) -> exported files served on request; ``digests``: each file's
    sha256; ``name``: the run's; ``source``: where the weights came from (never a temp path)."""
    import contextlib
    import json
    import tempfile

    import mlflow
    import torch

    signature, example = signature_and_example(info)
    root = Path(__file__).resolve().parents[2]
    classes = {"classes": list(info.classes), "palette": [list(c) for c in info.palette]}
    onnx = dict(onnx or {})
    requirements = []
    if onnx:
        import onnxruntime

        requirements = [f"onnxruntime=={onnxruntime.__version__}"]
    runtimes = {"runtimes": [TORCH, *onnx], "sha256": dict(digests or {})}
    sources = {"model": source or str(model_file.resolve())}
    # imported weights have no score of their own: no NaN in the metadata
    score = {"best_val_miou": info.best_val_miou} if math.isfinite(info.best_val_miou) else {}
    sources.update({key: str(Path(path).resolve()) for key, path in onnx.items()})
    name = re.sub(r"[/:.%\"']", "-", name) or "model"  # MLflow refuses these in a model's name
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # classes.json, by name
        Path("classes.json").write_text(json.dumps(classes, indent=2))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=LabelMapModel(),
            artifacts={**sources, "classes": "classes.json"},
            signature=signature,
            input_example=example,
            # log_model links the run's metrics at `step` to the model; at 0 (the default) system
            # metrics and summaries. -1 holds none: the page shows log_scores' scores only
            step=-1,
            code_paths=[str(root / "danet"), str(root / "pipeline")],
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "torchvision",
                "timm",
                "numpy",
                "pillow",
                "pandas",
                "pyyaml",
                *requirements,
            ],
            metadata={**classes, "dataset": info.dataset, **score, **runtimes},
            tags={WRITER_TAG: writer_id()},  # a killed register's PENDING model: cleaned later
        )
