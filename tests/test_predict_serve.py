"""danet predict (files, folders, bad files) and `mlflow models serve` on a registered model."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.artifacts.refs import load_model
from pipeline.cli import app
from tests.conftest import use_experiment, write_model_file

runner = CliRunner()


def test_predict_folder_writes_masks_and_lists_bad_files(tiny_shards: Path, tmp_path: Path) -> None:
    model = write_model_file(tmp_path / "model.pt", tiny_shards)
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / "small.png")
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(
        images / "sub" / "large.jpg"
    )
    (images / "notes.txt").write_text("not an image")
    good = images / "small.png"
    (images / "truncated.png").write_bytes(good.read_bytes()[:100])
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", "--model", str(model), "--out", str(out), "--slide-above", "100",
              "--crop", "64", str(images)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "error: " + str(images / "notes.txt") + ": not a readable image" in result.output
    assert "error: " + str(images / "truncated.png") + ": not a readable image" in result.output
    assert "2 images" in result.output and "(2 failed)" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "large_labels.png", "large_mask.png", "large_overlay.png",
        "small_labels.png", "small_mask.png", "small_overlay.png",
    ]  # fmt: skip
    labels = np.array(Image.open(out / "large_labels.png"))
    mask = np.array(Image.open(out / "large_mask.png"))
    assert labels.shape == (90, 130) and mask.shape == (90, 130, 3)
    palette = np.array(load_model(str(model)).palette, dtype=np.uint8)
    assert np.array_equal(mask, palette[labels])  # the colours are the dataset's palette
    assert labels.max() < 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_and_register(tmp_path: Path, shards: Path) -> tuple[str, Path]:
    """A DANet logged as danet register logs it (the served pyfunc) and registered as the
    champion; (tracking URI, model.pt)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts.modelfile import read_model_info
    from pipeline.artifacts.pyfunc import log_served_model
    from pipeline.mlflowstore import tracking_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_file = write_model_file(tmp_path / "model.pt", shards)
    with tracking_uri(uri):
        use_experiment(uri, "synthetic")
        with mlflow.start_run():
            info = log_served_model(model_file, read_model_info(model_file))
        version = mlflow.register_model(info.model_uri, "danet-serve")
    MlflowClient(uri).set_registered_model_alias("danet-serve", "champion", version.version)
    return uri, model_file


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_labels(model_file: Path, image: np.ndarray) -> np.ndarray:
    from danet.inference import to_input
    from pipeline.artifacts.modelfile import load_model_file

    segmenter, _ = load_model_file(model_file)
    with torch.no_grad():
        return segmenter(to_input(image)).argmax(1)[0].numpy().astype(np.uint8)


def test_logged_model_takes_images_and_returns_label_maps(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """The pyfunc in Python: PNG bytes in, a single-channel PNG of train ids out; the signature,
    input example, classes and the raw model.pt travel with it."""
    import mlflow
    import pandas as pd

    from pipeline.mlflowstore import tracking_uri

    uri, model_file = log_and_register(tmp_path, tiny_shards)
    image = np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    with tracking_uri(uri):
        model = mlflow.pyfunc.load_model("models:/danet-serve@champion")
        info = mlflow.models.get_model_info("models:/danet-serve@champion")
        out = model.predict(pd.DataFrame({"image": [png(image)]}), params={"flip": False})
    labels = np.array(Image.open(io.BytesIO(base64.b64decode(out["labels"][0]))))
    assert labels.shape == (40, 56) and labels.dtype == np.uint8 and labels.max() < 11
    assert np.array_equal(labels, expected_labels(model_file, image))
    assert (out["height"][0], out["width"][0]) == (40, 56)
    assert info.signature.inputs.input_names() == ["image"]
    params = {p.name for p in info.signature.params.params}
    assert params == {"mode", "crop", "flip", "slide_above", "runtime"}
    assert info.metadata["classes"][0] == "Sky" and len(info.metadata["palette"]) == 11
    assert info.saved_input_example_info is not None
    loaded = load_model("models:/danet-serve@champion", uri)  # the raw torch module for Python
    assert loaded.classes[3] == "Road" and isinstance(loaded.module, torch.nn.Module)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds almost none of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_serving_refuses_in_one_line_before_decoding() -> None:
    """Bad requests are one line (HTTP 400) even after the scoring server prefixes the message
    with the request; an image over the pixel budget is refused from its header."""
    from pipeline.artifacts.pyfunc import RequestError, check_params, decode

    with pytest.raises(ValueError, match="20000x20000 is over the 50,000,000 pixel limit"):
        decode(png_header(20000, 20000))
    with pytest.raises(ValueError, match="over the 100 pixel limit"):
        decode(png(np.zeros((20, 20, 3), dtype=np.uint8)), max_pixels=100)
    err = RequestError("image 0: too large")
    err.message = f"Failed to predict data 'a\nb'. \nError: {err.message}"  # what the server does
    assert err.message == "image 0: too large" and err.get_http_status_code() == 400
    body = json.loads(err.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == "image 0: too large" and "stack_trace" not in body
    with pytest.raises(RequestError, match=r"params\.mode must be auto, whole or slide"):
        check_params({"mode": "tiles"})
    with pytest.raises(RequestError, match=r"params\.crop must be an integer >= 16, got 4"):
        check_params({"crop": 4})


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_a_label_map(tiny_shards: Path, tmp_path: Path) -> None:
    """Serve the registered champion on 127.0.0.1, post a PNG as MLflow's JSON protocol wants it
    (base64 in a column named image), get the label map back."""
    uri, model_file = log_and_register(tmp_path, tiny_shards)
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH, as in an active venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/danet-serve@champion"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 -- closed in finally
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        import requests

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the model server did not come up in 180 s"
            time.sleep(1)
        image = np.random.default_rng(2).integers(0, 255, (40, 56, 3), dtype=np.uint8)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(png(image)).decode()]],
            },
            "params": {"mode": "whole"},
        }
        response = requests.post(f"{base}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text[-3000:]
        answer = json.loads(response.text)["predictions"][0]
        labels = np.array(Image.open(io.BytesIO(base64.b64decode(answer["labels"]))))
        assert (answer["height"], answer["width"]) == labels.shape == (40, 56)
        assert np.array_equal(labels, expected_labels(model_file, image))
        refused = requests.post(
            f"{base}/invocations",
            json={"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}},
            timeout=60,
        )
        assert refused.status_code >= 400 and "not a PNG or JPEG" in refused.text
        huge = requests.post(  # 20000x20000 by its header: refused before it is decoded
            f"{base}/invocations",
            json={
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [[base64.b64encode(png_header(20000, 20000)).decode()]],
                }
            },
            timeout=60,
        )
        error = json.loads(huge.text)
        assert huge.status_code == 400 and "stack_trace" not in error, huge.text[-2000:]
        assert (
            error["message"]
            == "image 0: 20000x20000 is over the 50,000,000 pixel limit: send it smaller"
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_one_protocol_choice_for_predict_and_serving() -> None:
    """``auto``: the whole image up to ``slide_above`` on the long side, a sliding window
    beyond (0: always whole); predict and the served model both ask danet.inference."""
    from danet.inference import protocol_for

    assert protocol_for((1024, 700)).mode == "whole"
    assert protocol_for((1025, 700)).mode == "slide"
    assert protocol_for((700, 4000), slide_above=0).mode == "whole"
    assert protocol_for((10, 10), mode="slide", crop=64).crop == 64
    assert protocol_for((10, 10), flip=True).flip
