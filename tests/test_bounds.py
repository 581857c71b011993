"""Work bounded before it starts (issue 35): sliding windows that cover every pixel, the forward
passes counted as ``infer`` runs them, the served model's request bounds and its one-line errors,
and outputs that two inputs never share."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from danet.inference import Protocol, check_work, infer, passes
from pipeline.artifacts.pyfunc import LabelMapModel, RequestError, check_params
from pipeline.use.formats import FORMATS
from pipeline.use.predict import Claims


class Recorder(torch.nn.Module):
    """Two-class zeros; remembers the shape of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


GRID = itertools.product(
    ("official", "mmseg"), ("whole", "slide"), (False, True), ((1.0,), (0.5, 1.25)), (0, 16, 32)
)


@pytest.mark.parametrize(("reference", "mode", "flip", "scales", "stride"), list(GRID))
def test_passes_are_the_forward_passes_infer_runs(
    reference: str, mode: str, flip: bool, scales: tuple[float, ...], stride: int
) -> None:
    for h, w in ((40, 60), (100, 30), (20, 20)):
        p = Protocol(reference, mode, 32, stride, scales, flip, window_batch=1)
        model = Recorder()
        infer(model, torch.zeros(1, 3, h, w), p)
        counted = passes(h, w, p)
        assert len(model.calls) == sum(n for n, _, _ in counted)
        assert sum(c[-2] * c[-1] for c in model.calls) == sum(n * a * b for n, a, b in counted)


def test_a_window_stride_past_its_crop_is_refused() -> None:
    with pytest.raises(ValueError, match=r"stride 33 is larger than crop 32: .* unpredicted"):
        Protocol(mode="slide", crop=32, stride=33)
    Protocol(mode="slide", crop=32, stride=32)  # adjacent windows cover every pixel


def test_check_work_names_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match=r"7000x7000 at scale 1 takes a 7000x7000 forward pass"):
        check_work(7000, 7000, Protocol(mode="whole"), 4096**2, 50_000_000, 0)
    with pytest.raises(ValueError, match=r"4000x4000 at scale 4 is 16000x16000: over the"):
        check_work(4000, 4000, Protocol(mode="slide", scales=(1.0, 4.0)), 4096**2, 50_000_000, 0)
    with pytest.raises(ValueError, match=r"8x6 at scale 0.01 is 0x0: empty"):
        check_work(6, 8, Protocol("mmseg", scales=(0.01,)), 4096**2, 50_000_000, 0)


def png(h: int, w: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def served(module: torch.nn.Module) -> LabelMapModel:
    model = LabelMapModel()
    model.device, model.segmenters = torch.device("cpu"), {"torch": module}
    return model


def test_a_window_far_larger_than_its_image_is_refused_at_once() -> None:
    model = Recorder()
    request = pd.DataFrame({"image": [png(48, 64)]})
    with pytest.raises(RequestError, match=r"image 0: 64x48 takes 2 forward passes over "):
        served(model).predict(None, request, {"mode": "slide", "crop": 4096, "flip": True})
    assert not model.calls  # refused before any pass
    with pytest.raises(RequestError, match=r"params\.crop must be <= 4096, got 100000"):
        check_params({"crop": 100000})
    with pytest.raises(RequestError, match=r"params\.flip must be true or false"):
        check_params({"flip": "yes"})
    answer = served(model).predict(None, request, {"mode": "slide", "crop": 512})
    assert list(answer["height"]) == [48] and len(model.calls) == 1  # one padded window


def test_a_request_of_too_many_images_is_refused_before_any_decodes() -> None:
    from pipeline.artifacts.pyfunc import MAX_IMAGES

    model = Recorder()
    request = pd.DataFrame({"image": [png(4, 4)] * (MAX_IMAGES + 1)})
    with pytest.raises(RequestError, match=rf"holds {MAX_IMAGES + 1} images: at most {MAX_IMAGES}"):
        served(model).predict(None, request, {})
    assert not model.calls


class Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 20 GiB\n  File 'x.py'")


def test_the_models_own_failure_is_one_line_500_without_a_stack_trace() -> None:
    with pytest.raises(RequestError) as caught:
        served(Broken()).predict(None, pd.DataFrame({"image": [png(6, 8)]}), {})
    err = caught.value
    err.message = f"Failed to predict data 'a\nb'. \nError: {err.message}"  # what MLflow does
    assert err.get_http_status_code() == 500
    body = json.loads(err.serialize_as_json())
    assert body["message"] == (
        "the model failed on this request (RuntimeError: CUDA out of memory.)"
    )
    assert "stack_trace" not in body and "\n" not in body["message"]


def test_two_inputs_never_claim_one_output() -> None:
    claims, names = Claims(), FORMATS["cityscapes"].file_names
    assert claims.clash(names("berlin_000000_000019"), "a/berlin_000000_000019.png") == ""
    clash = claims.clash(names("berlin_000000_000019_leftImg8bit"), "b/x_leftImg8bit.png")
    assert clash.startswith("would write berlin_000000_000019_leftImg8bit.png, as a/berlin")
    assert FORMATS["masks"].file_names("x") == ("x_mask.png", "x_overlay.png", "x_labels.png")


def test_predict_and_evaluate_bound_an_images_work_relative_to_it() -> None:
    """A window far larger than its image, or a stride of 1, is refused before any pass; the
    paper's Cityscapes protocol (6 scales, flip, sliding 769 windows on 2048x1024) fits."""
    from danet.inference import Protocol, check_work
    from pipeline.images import MAX_PIXELS
    from pipeline.schema import MAX_CROP, MAX_PASSES, MIN_WORK, WORK_PER_PIXEL

    def check(h: int, w: int, p: Protocol) -> None:
        budget = max(WORK_PER_PIXEL * h * w, MIN_WORK)
        check_work(h, w, p, MAX_CROP**2, MAX_PIXELS, budget, MAX_PASSES)

    with pytest.raises(ValueError, match=r"64x48 takes 1 forward passes over 16,777,216 pixels"):
        check(48, 64, Protocol(mode="slide", crop=4096))
    with pytest.raises(ValueError, match=r"64x48 takes 1,617 forward passes: over the 1,024"):
        check(48, 64, Protocol(mode="slide", crop=16, stride=1))
    scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    check(1024, 2048, Protocol(mode="slide", crop=769, scales=scales, flip=True, base_size=2048))
