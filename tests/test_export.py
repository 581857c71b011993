"""``danet export``: the ONNX file, its metadata, parity with the torch module under the protocols,
INT8 accuracy, and ONNX models in evaluate and predict."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from danet import DANetConfig, build_danet
from danet.inference import Protocol, infer, to_input
from danet.model import Segmenter
from pipeline.artifacts.modelfile import ModelInfo, load_model_file, save_model_file
from pipeline.artifacts.onnxfile import OnnxModule
from pipeline.artifacts.onnxfile import load_any_model as load_model
from pipeline.artifacts.onnxgraph import export_onnx
from pipeline.data.manifest import load_manifest
from pipeline.data.readers.scene import render_scene
from pipeline.evaluation.evaluate import run_evaluation
from pipeline.sections import EvaluateParams, ExportParams
from pipeline.use.export import export_model, file_sha256
from tests.conftest import readme_python, run_bare_python, synthetic_shards, write_model_file

PROTOCOLS = {
    "whole": Protocol(mode="whole"),
    "slide": Protocol(mode="slide", crop=64, window_batch=3),
    "mmseg-slide-flip": Protocol(reference="mmseg", mode="slide", crop=64, flip=True),
}


def scenes(sizes: list[tuple[int, int]], seed: int = 7) -> list[np.ndarray]:
    """Real-looking street scenes (H, W, 3) uint8 at each (H, W)."""
    return [render_scene(seed + i, w, h)[0] for i, (h, w) in enumerate(sizes)]


def with_attention(module: torch.nn.Module, gamma: float = 0.7) -> torch.nn.Module:
    """Randomly initialised attention has gamma = 0 (its output unused): give it weight."""
    for name, p in module.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(gamma)
    return module


def parity(torch_module: torch.nn.Module, onnx_module: OnnxModule, images, protocol) -> tuple:
    with torch.no_grad():
        pairs = [
            (
                infer(torch_module, to_input(im), protocol),
                infer(onnx_module, to_input(im), protocol),
            )
            for im in images
        ]
    max_abs = max(float((a - b).abs().max()) for a, b in pairs)
    agree = np.mean([float((a.argmax(1) == b.argmax(1)).float().mean()) for a, b in pairs])
    return max_abs, agree


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("export") / "shards", 8, 4, max_count=4)


@pytest.fixture(scope="module")
def model_file(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_model_file(tmp_path_factory.mktemp("model") / "model.pt", shards, seed=3)
    module, info = load_model_file(path)
    state = with_attention(module.model).state_dict()
    save_model_file(path, state, info)
    return path


@pytest.fixture(scope="module")
def exported(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_model(ExportParams(model=str(model_file), out=str(out)))
    return out


def test_the_file_has_one_dynamic_image_input_logits_and_the_metadata(
    exported: Path, model_file: Path
) -> None:
    graph = onnx.load(str(exported))
    onnx.checker.check_model(graph)
    (image,) = graph.graph.input
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = image.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))
    assert graph.graph.output[0].name == "logits"
    meta = {p.key: p.value for p in graph.metadata_props}
    info = load_model_file(model_file)[1]
    assert json.loads(meta["classes"]) == list(info.classes)
    assert json.loads(meta["palette"]) == [list(c) for c in info.palette]
    assert meta["dataset"] == "synthetic" and meta["source_ref"] == str(model_file)
    assert meta["source_sha256"] == file_sha256(model_file)
    assert meta["attention"] == "fused" and meta["quantize"] == "none"
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    assert ("com.microsoft", "MultiHeadAttention") in ops  # the PAM, without the N x N map
    assert [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim][1] == 11


def test_onnx_runtime_matches_torch_whole_and_sliding_at_two_sizes(
    exported: Path, model_file: Path
) -> None:
    module = load_model_file(model_file)[0]
    loaded = load_model(str(exported))
    assert (
        isinstance(loaded.module, OnnxModule)
        and loaded.classes == load_model(str(model_file)).classes
    )
    images = scenes([(72, 96), (100, 150)])
    for name, protocol in PROTOCOLS.items():
        max_abs, agree = parity(module, loaded.module, images, protocol)
        assert max_abs < 1e-4 and agree >= 0.999, (name, max_abs, agree)


@pytest.mark.slow
def test_standard_attention_matches_and_holds_no_contrib_op(
    model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "standard.onnx"
    export_model(ExportParams(model=str(model_file), out=str(out), attention="standard"))
    graph = onnx.load(str(out))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    module = load_model_file(model_file)[0]
    max_abs, agree = parity(module, OnnxModule(out), scenes([(64, 80)]), PROTOCOLS["whole"])
    assert max_abs < 1e-4 and agree >= 0.999


def test_batches_go_through_one_session_and_it_pickles(exported: Path) -> None:
    module = OnnxModule(exported)
    x = torch.rand(3, 3, 40, 56)
    out = module(x)
    assert out.shape == (3, 11, 40, 56)
    again = pickle.loads(pickle.dumps(module))  # what a Ray evaluation task receives
    assert torch.equal(again(x), out)


@pytest.mark.slow
def test_a_random_danet_resnet50d_matches_torch_at_two_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = DANetConfig(num_classes=19, backbone="resnet50d")
    model = build_danet(config)
    with_attention(model)
    segmenter = Segmenter(model, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    path = tmp_path / "r50.onnx"
    export_onnx(segmenter, path, "fused")
    module = OnnxModule(path)
    images = scenes([(96, 128), (144, 200)])
    for name in ("whole", "slide"):
        max_abs, agree = parity(segmenter, module, images, PROTOCOLS[name])
        assert max_abs < 1e-3 and agree >= 0.999, (name, max_abs, agree)


def test_a_failed_export_leaves_the_old_file(
    exported: Path, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(exported.read_bytes())
    before = out.read_bytes()

    def broken(module, path, *args, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr("pipeline.use.export.export_onnx", broken)
    with pytest.raises(RuntimeError):
        export_model(ExportParams(model=str(model_file), out=str(out)))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporaries


def test_evaluate_and_predict_take_the_onnx_file(
    exported: Path, model_file: Path, shards: Path, tmp_path: Path
) -> None:
    from pipeline.sections import PredictParams
    from pipeline.use.predict import predict_from_params

    scores = {}
    for name, ref in (("torch", model_file), ("onnx", exported)):
        params = EvaluateParams(model=str(ref), shards=str(shards), out=str(tmp_path / name))
        scores[name] = run_evaluation(params).miou
    assert scores["onnx"] == pytest.approx(scores["torch"], abs=1e-6)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, im in enumerate(scenes([(60, 80), (50, 70)])):
        Image.fromarray(im).save(images / f"{i}.png")
    masks = {}
    for name, ref in (("torch", model_file), ("onnx", exported)):
        out = tmp_path / f"predict-{name}"
        predict_from_params(PredictParams(model=str(ref), out=str(out)), [images], "")
        masks[name] = [np.asarray(Image.open(out / f"{i}_labels.png")) for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(masks["torch"], masks["onnx"], strict=True))


@pytest.mark.slow
def test_int8_export_is_smaller_quantized_and_keeps_the_attention_float(
    model_file: Path, shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int8.onnx"
    result = export_model(
        ExportParams(
            model=str(model_file),
            out=str(out),
            quantize="int8",
            calibration_shards=str(shards),
            calibration_images=4,
        )
    )
    graph = onnx.load(str(out))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 10 and "MultiHeadAttention" in ops
    assert {p.key: p.value for p in graph.metadata_props}["quantize"] == "int8"
    assert result.megabytes < 0.4 * os.path.getsize(model_file) / 1e6
    assert result.probe_agreement > 0.5  # an untrained model: its margins are tiny
    assert load_manifest(shards).classes == load_model(str(out)).classes


def train_briefly(shards: Path, out: Path, steps: int = 60) -> Path:
    """DANet-R18d trained for ``steps`` SGD steps on the shards' train images (whole images, no
    augmentation): a model with real margins, as INT8 calibration meets in use."""
    from pipeline.data.loader import read_shard
    from pipeline.data.manifest import shard_refs

    manifest = load_manifest(shards)
    pairs = [(im, lab) for ref in shard_refs(manifest, "train") for _, im, lab in read_shard(ref)]
    x = torch.cat([to_input(im) for im, _ in pairs])
    y = torch.from_numpy(np.stack([lab for _, lab in pairs])).long()
    torch.manual_seed(0)
    config = DANetConfig(num_classes=manifest.num_classes, backbone="resnet18d")
    model = build_danet(config)
    segmenter = Segmenter(model, manifest.mean, manifest.std).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (8,))
        loss = torch.nn.functional.cross_entropy(segmenter(x[batch]), y[batch], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    info = ModelInfo(
        config, manifest.classes, manifest.palette, manifest.mean, manifest.std, manifest.dataset
    )
    save_model_file(out, model.state_dict(), info)
    return out


@pytest.mark.slow
def test_int8_val_miou_is_within_one_point_of_float(tmp_path: Path) -> None:
    shards = synthetic_shards(tmp_path / "shards", 48, 16, max_count=16, width=96, height=72)
    model = train_briefly(shards, tmp_path / "model.pt")
    scores = {}
    for kind in ("none", "int8"):
        out = tmp_path / f"{kind}.onnx"
        export_model(
            ExportParams(
                model=str(model),
                out=str(out),
                quantize=kind,
                calibration_shards=str(shards),
                calibration_images=16,
            )
        )
        params = EvaluateParams(model=str(out), shards=str(shards), out=str(tmp_path / kind))
        scores[kind] = run_evaluation(params).miou
    print(json.dumps({"miou": scores}))  # pytest -s shows it (BENCHMARKS.md)
    assert scores["none"] > 0.25, scores  # it learned something
    assert scores["int8"] >= scores["none"] - 0.01, scores


def test_the_readme_runs_an_exported_file_with_onnxruntime_numpy_and_pillow_alone(
    exported: Path, tmp_path: Path
) -> None:
    from PIL import Image

    (tmp_path / "outputs" / "export").mkdir(parents=True)
    (tmp_path / "outputs" / "export" / "model-int8.onnx").write_bytes(exported.read_bytes())
    image = scenes([(72, 96)])[0]
    Image.fromarray(image).save(tmp_path / "street.png")
    printed = run_bare_python(readme_python(), tmp_path, tmp_path)
    mask = np.asarray(Image.open(tmp_path / "street_mask.png"))
    assert mask.shape == (72, 96, 3)
    with torch.no_grad():
        labels = load_model(str(exported)).module(to_input(image)).argmax(1)[0].numpy()
    palette = np.array(load_model(str(exported)).palette, dtype=np.uint8)
    assert np.array_equal(mask, palette[labels])  # the torch module's labels, in the palette
    assert sum(eval(printed).values()) == pytest.approx(1.0, abs=0.01)


def registered_evaluation(tmp: Path, run_id: str, miou: float = 0.4) -> Path:
    from tests.conftest import evaluation_record

    record = evaluation_record(f"runs:/{run_id}/model.pt", miou, protocol="official-whole")
    path = tmp / f"metrics-{run_id[:6]}.json"
    path.write_text(record.to_json())
    return path


def test_register_attaches_the_onnx_file_and_the_pyfunc_serves_it_on_request(
    exported: Path, model_file: Path, shards: Path, tmp_path: Path
) -> None:
    """register.onnx: the file of exactly these weights goes into the served model, a version
    that serves torch and onnx becomes the champion in place of the same model without it, and
    the pyfunc answers the same label maps through ONNX Runtime with params.runtime=onnx."""
    import base64
    import io

    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipeline.artifacts.pyfunc import RequestError
    from pipeline.errors import DataError
    from pipeline.mlflowstore import tracking_uri
    from pipeline.registry.register import register
    from pipeline.sections import RegisterParams
    from tests.conftest import use_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    other = write_model_file(tmp_path / "other" / "model.pt", shards, seed=9)
    with tracking_uri(uri):
        use_experiment(uri, "synthetic")
        runs = {}
        for name, weights in (("exported", model_file), ("other", other)):
            with mlflow.start_run() as run:
                mlflow.log_artifact(str(weights))  # as training logs its weights
            runs[name] = run.info.run_id
    metrics = registered_evaluation(tmp_path, runs["exported"])
    out = str(tmp_path / "registered.json")

    def reg(onnx: tuple[str, ...], metrics: Path = metrics):
        return register(RegisterParams(eval_metrics=str(metrics), out=out, onnx=onnx), uri)

    plain = reg(())
    assert (plain.version, plain.alias, plain.runtimes) == ("1", "champion", "torch")
    attached = reg((str(exported),))
    assert (attached.version, attached.alias, attached.runtimes) == ("2", "champion", "torch,onnx")
    assert "the champion's model and evaluation" in attached.reason
    assert reg((str(exported),)).version == "2"  # the same files again: no third version
    back = reg(())  # the version without ONNX does not take the champion back
    assert (back.version, back.alias, back.champion_version) == ("1", "challenger", "2")
    with pytest.raises(DataError, match="exported from another model"):
        reg((str(exported),), registered_evaluation(tmp_path, runs["other"], 0.9))
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'danet-synthetic'")) == 2  # nothing kept
    version = client.get_model_version("danet-synthetic", "2")
    assert version.tags["runtimes"] == "torch,onnx"
    assert version.tags["onnx_sha256"] == f"onnx={file_sha256(exported)}"

    image = scenes([(60, 80)])[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    request = pd.DataFrame({"image": [buffer.getvalue()]})
    with tracking_uri(uri):
        served = mlflow.pyfunc.load_model("models:/danet-synthetic@champion")
        info = mlflow.models.get_model_info("models:/danet-synthetic@champion")
        labels = {
            runtime: served.predict(request, params={"runtime": runtime})["labels"][0]
            for runtime in ("torch", "onnx")
        }
        with pytest.raises(RequestError, match=r"no such file .*torch, onnx"):
            served.predict(request, params={"runtime": "onnx-int8"})
    assert labels["torch"] == labels["onnx"]  # the same PNG of train ids
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(labels["onnx"]))))
    assert decoded.shape == (60, 80)
    assert info.metadata["runtimes"] == ["torch", "onnx"]
    assert info.metadata["sha256"]["model.pt"] == file_sha256(model_file)
    assert "runtime" in {p.name for p in info.signature.params.params}


def test_register_refuses_a_graph_that_is_not_the_weights_whatever_its_metadata(
    exported: Path, model_file: Path, tmp_path: Path
) -> None:
    """register.onnx runs each graph on a probe image beside the weights: a graph with the
    export's metadata copied (its source_sha256 included) but other weights is refused, and so
    is one whose output channels are not its classes; the registry is left as it was."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from onnx import numpy_helper

    from pipeline.artifacts.onnxfile import check_same_model
    from pipeline.errors import ModelError
    from pipeline.mlflowstore import tracking_uri
    from pipeline.registry.register import register
    from pipeline.sections import RegisterParams
    from tests.conftest import use_experiment

    graph = onnx.load(str(exported))
    rng = np.random.default_rng(0)
    for weight in graph.graph.initializer:  # every convolution's kernel, perturbed
        if len(weight.dims) == 4:
            kernel = numpy_helper.to_array(weight)
            noisy = kernel + rng.normal(0, kernel.std() + 1e-3, kernel.shape)
            weight.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), weight.name))
    forged = tmp_path / "forged.onnx"
    onnx.save(graph, str(forged))  # the same metadata, other weights
    module = load_model(str(model_file)).module  # the weights' torch module
    check_same_model(exported, module, quantized=False)  # the real export passes
    with pytest.raises(ModelError, match=r"forged\.onnx: not an export of the registered"):
        check_same_model(forged, module, quantized=False)
    with pytest.raises(ModelError, match=r"labels agree on .* \(INT8: at least 90%\)"):
        check_same_model(forged, module, quantized=True)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_uri(uri):
        use_experiment(uri, "synthetic")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(model_file))
    metrics = registered_evaluation(tmp_path, run.info.run_id)
    params = RegisterParams(eval_metrics=str(metrics), out=str(tmp_path / "r.json"))
    with pytest.raises(ModelError, match=r"forged\.onnx: not an export of the registered model"):
        register(dataclasses.replace(params, onnx=(str(forged),)), uri)
    assert not MlflowClient(uri).search_model_versions("name = 'danet-synthetic'")
    assert not (tmp_path / "r.json").exists()


def test_an_onnx_that_reads_another_file_is_refused(tmp_path: Path) -> None:
    """A tensor whose data is "external" names a file ONNX Runtime would read from wherever it
    points: refused in one line before a session opens, through the CLI too (issue 35)."""
    from onnx import TensorProto, helper
    from typer.testing import CliRunner

    from pipeline.artifacts.onnxfile import load_onnx
    from pipeline.cli import app
    from pipeline.errors import ModelError

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(4, np.float32).tobytes())
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelError, match=r"tensor 'w' reads its data from another file"):
        load_onnx(path)
    result = CliRunner().invoke(app, ["predict", "--model", str(path), str(secret)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "'../secret.bin'" in errors[0], (
        result.output
    )
