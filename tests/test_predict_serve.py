"""danet predict (files, folders, bad files) and `mlflow models serve` on a registered model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.artifacts.refs import load_model
from pipeline.cli import app
from tests.conftest import write_model_file

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


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request(tiny_shards: Path, tmp_path: Path) -> None:
    """Log and register a DANet as training does, serve the champion, post an image tensor."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts.modelfile import load_model_file
    from pipeline.artifacts.tracking import log_segmenter, tracking_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    segmenter, model_info = load_model_file(write_model_file(tmp_path / "model.pt", tiny_shards))
    with tracking_uri(uri):
        mlflow.set_experiment("synthetic")
        with mlflow.start_run():
            info = log_segmenter(
                segmenter,
                list(model_info.classes),
                [list(c) for c in model_info.palette],
                "synthetic",
                0.1,
            )
        version = mlflow.register_model(info.model_uri, "danet-serve")
    MlflowClient(uri).set_registered_model_alias("danet-serve", "champion", version.version)

    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH, as in an active venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    mlflow_cli = str(bin_dir / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/danet-serve@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        import requests

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the model server did not come up in 120 s"
            time.sleep(1)
        image = torch.rand(1, 3, 40, 56)
        response = requests.post(
            f"{base}/invocations", json={"inputs": image.numpy().tolist()}, timeout=60
        )
        assert response.status_code == 200, response.text[-3000:]
        logits = np.array(json.loads(response.text)["predictions"], dtype=np.float32)
        assert logits.shape == (1, 11, 40, 56)
        with torch.no_grad():
            expected = segmenter(image).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
