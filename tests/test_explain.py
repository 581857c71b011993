"""``danet explain``: the position attention of chosen query pixels equals the dense module's
rows, without the N x N map; the channel view; the command's pictures and its bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from danet import DANetConfig, build_danet
from danet.attention import PositionAttention
from danet.explain import class_channel_affinity, default_points, explain, position_rows
from danet.model import Segmenter
from pipeline.cli import app
from tests.conftest import write_model_file

runner = CliRunner()


def test_query_rows_equal_the_dense_modules_rows() -> None:
    torch.manual_seed(0)
    pam = PositionAttention(64, 8, impl="dense")
    x = torch.relu(torch.randn(1, 64, 12, 16))
    queries = torch.tensor([0, 5, 100, 191])
    rows = position_rows(pam, x, queries)
    q, k = pam.query(x).flatten(2), pam.key(x).flatten(2)
    dense = torch.bmm(q.transpose(1, 2), k).softmax(dim=-1)[0]  # (N, N), as the module's
    assert rows.shape == (4, 12, 16)
    assert torch.allclose(rows.flatten(1), dense[queries], atol=1e-6)
    assert torch.allclose(rows.sum(dim=(1, 2)), torch.ones(4))


def test_query_rows_of_a_map_too_large_to_hold() -> None:
    """N = 65536: the N x N map would be 16 GiB in fp32; three rows are 768 KiB."""
    pam = PositionAttention(16, 2)
    x = torch.randn(1, 16, 256, 256)
    rows = position_rows(pam, x, torch.tensor([0, 40000, 65535]))
    assert rows.shape == (3, 256, 256) and torch.isfinite(rows).all()


def test_class_channel_affinity_finds_the_channel_a_class_lights_up() -> None:
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:, 4:] = 1
    features = torch.randn(6, 8, 8) * 0.1
    features[3][labels == 1] += 5.0  # channel 3 fires on class 1
    affinity = class_channel_affinity(features, labels, classes=3)
    assert int(affinity[1].argmax()) == 3 and int(affinity[0].argmin()) == 3
    assert torch.isnan(affinity[2]).all()  # a class that is not predicted


def test_explain_a_danet_at_default_and_given_points() -> None:
    torch.manual_seed(0)
    model = build_danet(DANetConfig(num_classes=5, backbone="resnet18d", pretrained=False))
    segmenter = Segmenter(model, [0.5] * 3, [0.25] * 3)
    image = torch.rand(1, 3, 48, 64)
    e = explain(segmenter, image)
    assert 1 <= len(e.points) <= 4 and e.labels.shape == (48, 64)
    assert e.rows.shape[0] == len(e.points) and e.rows.shape[1:] == (6, 8)  # stride 8
    assert len(e.channels.classes) == len(e.channels.channels) == e.channels.maps.shape[0]
    given = explain(segmenter, image, [(0, 0), (63, 47)])
    assert given.points == [(0, 0), (63, 47)]
    with pytest.raises(ValueError, match="point 64,10 is outside the 64x48 image"):
        explain(segmenter, image, [(64, 10)])
    labels = torch.tensor([[0, 0, 1], [0, 2, 1], [0, 0, 1]])
    assert default_points(labels, 2) == [(0, 1), (2, 1)]  # the two largest regions' centres


def test_explain_command_writes_two_pictures_per_image(tiny_shards: Path, tmp_path: Path) -> None:
    model = write_model_file(tmp_path / "model.pt", tiny_shards)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("not an image")
    out = tmp_path / "explain"
    args = ["explain", "--model", str(model), "--out", str(out), "--points", "10,10;50,30"]
    result = runner.invoke(app, [*args, str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    assert result.exit_code == 1, result.output  # b.png is listed, a.png explained
    assert f"error: {tmp_path / 'b.png'}: not a readable image" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a_cam.png", "a_pam.png"]
    picture = Image.open(out / "a_pam.png")
    assert picture.width > picture.height > 100  # the image and one panel per query

    bad = runner.invoke(app, [*args[:-2], "--points", "10;x", str(tmp_path / "a.png")])
    assert bad.exit_code == 2 and "--points: '10' is not x,y" in bad.output
