"""The whole DVC pipeline on a tiny synthetic configuration, then every runnable README command.

The project is copied (tracked and untracked-not-ignored files) into a fresh git repository with a
tiny params.yaml, `dvc repro` runs shard -> train -> tune -> evaluate -> register, a second
`dvc repro` must do nothing, and the README's bash blocks run as written (blocks preceded by
``<!-- readme-check: skip (...) -->`` say why they cannot run here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import mean_of

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "synthetic": {"num_samples": {"train": 12, "val": 4}, "width": 64, "height": 48},
    "shard": {"max_count": 6, "workers": 1},
    "data": {"crop_size": 32, "shuffle_buffer": 4},
    # an evaluation at the end only (the README's refit of 20 epochs: not 20 evaluations)
    "train": {"batch_size": 2, "epochs": 2, "iters_per_epoch": 3, "eval_every_epochs": 5,
              "log_every": 3, "cpus_per_worker": 2},
    "tune": {"space": {"train.lr": {"loguniform": [0.005, 0.02]},
                       "data.crop_size": {"choice": [32, 48]}},
             "num_samples": 2, "epochs": 1},
    "mlflow": {"num_prediction_images": 1},
    "evaluate": {"num_overlays": 1},
}  # fmt: skip


def readme_blocks(text: str) -> list[tuple[str, str | None]]:
    """Every ```bash block of the README with its skip reason (None = run it)."""
    blocks = []
    for match in re.finditer(
        r"(<!-- readme-check: skip \((.*?)\) -->\n)?```bash\n(.*?)```", text, re.S
    ):
        blocks.append((match.group(3), match.group(2)))
    return blocks


def copy_project(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
        check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the README says .venv/bin/...; its `danet` runs the checkout's code (the editable install),
    # so an edit to the copy's code changes what DVC sees, not what runs
    (dst / ".venv").symlink_to(Path(sys.prefix))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t",
                 "commit", "-qm", "tiny"]):  # fmt: skip
        subprocess.run(["git", *args], cwd=dst, check=True, capture_output=True)
    return dst


def run(command: str, cwd: Path, timeout: int = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PATH"] = f"{cwd / '.venv' / 'bin'}:{env['PATH']}"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"{command}\n--- exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout + done.stderr


def test_readme_marks_what_it_cannot_run() -> None:
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert blocks[0][1] is not None and "make demo" in blocks[0][0] and "make test" in blocks[0][0]
    assert sum(reason is None for _, reason in blocks) >= 3


def served_labels(repo: Path, runtimes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The champion's pyfunc on one example PNG, per ``params.runtime``: the label maps."""
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from pipeline.mlflowstore import tracking_uri

    image = next((repo / "data/examples/images/val").glob("*.png")).read_bytes()
    with tracking_uri(f"sqlite:///{repo / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model("models:/danet-synthetic@champion")
        answers = {
            r: model.predict(pd.DataFrame({"image": [image]}), params={"runtime": r})
            for r in runtimes
        }
    return {
        r: np.asarray(Image.open(io.BytesIO(base64.b64decode(a["labels"][0]))))
        for r, a in answers.items()
    }


@pytest.mark.slow
def test_dvc_pipeline_end_to_end_then_readme_commands(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "project")

    out = run("dvc repro", repo)
    for stage in ("shard", "train", "tune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    registered = json.loads((repo / "outputs/register/registered.json").read_text())
    assert (
        registered["alias"] == "champion"
        and registered["champion_uri"] == "models:/danet-synthetic@champion"
    )
    evaluation = json.loads((repo / "outputs/eval/metrics.json").read_text())
    assert evaluation["protocol"] == "official-whole-flip" and evaluation["images"] == 4
    assert evaluation["miou"] == pytest.approx(mean_of(evaluation["iou_per_class"]))
    # the champion is the refit of the search's best trial: its values, the full schedule, and
    # its run names the search (MLflow's Source shows the command)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    best = yaml.safe_load((repo / "outputs/tune/best_params.yaml").read_text())
    origin = json.loads((repo / "outputs/tune/search.json").read_text())
    version = client.get_model_version_by_alias("danet-synthetic", "champion")
    refit = client.get_run(version.tags["source_run_id"])
    assert refit.data.tags["danet.search_run_id"] == origin["search_run_id"]
    assert refit.data.tags["danet.refit_of_trial"] == origin["best_trial"]
    assert refit.data.tags["mlflow.source.name"] == "danet train"
    assert refit.data.tags["mlflow.source.type"] == "LOCAL"
    assert float(refit.data.params["train.lr"]) == best["train"]["lr"]
    assert int(refit.data.params["data.crop_size"]) == best["data"]["crop_size"]
    assert refit.data.params["train.epochs"] == str(TINY["train"]["epochs"])  # not tune.epochs

    again = run("dvc repro", repo)
    assert "Running stage" not in again, again[-2000:]  # nothing changed: nothing runs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["log_every"] = 7  # how often it logs does not change what it trains
    params["mlflow"]["num_prediction_images"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "up to date" in run("dvc status", repo)

    summary = run("danet summary", repo)
    assert "champion: models:/danet-synthetic@champion" in summary and "mlflow ui" in summary

    for block, reason in readme_blocks((ROOT / "README.md").read_text()):
        if reason is None:
            run(block, repo)
    assert (repo / "dvc_plots" / "index.html").is_file()
    # The champion's INT8 ONNX file (the README's `danet export`) in a Python that has only
    # onnxruntime, numpy and pillow: the README's block, as written
    from tests.conftest import readme_python, run_bare_python

    printed = run_bare_python(readme_python(), repo, tmp_path)
    assert (repo / "street_mask.png").is_file() and "{" in printed
    evaluated = json.loads((repo / "outputs/eval-int8/metrics.json").read_text())
    assert evaluated["model"] == "outputs/export/model-int8.onnx"
    # the README's `danet register --onnx`: the champion now serves both files on request
    registered = json.loads((repo / "outputs/register/registered.json").read_text())
    assert registered["runtimes"] == "torch,onnx,onnx-int8", registered
    assert registered["alias"] == "champion", registered
    served = served_labels(repo, ("torch", "onnx", "onnx-int8"))
    assert served["torch"].shape == served["onnx-int8"].shape
    assert np.array_equal(served["torch"], served["onnx"])
    assert np.mean(served["torch"] == served["onnx-int8"]) > 0.95
    assert len(list((repo / "outputs" / "predict").glob("*_mask.png"))) == 4
    experiments = run("dvc exp show --json", repo)
    assert '"epochs": 20' in experiments.replace(
        "'", '"'
    )  # the README's `dvc exp run --temp -S train.epochs=20`
    # That experiment ran in a temporary copy of the project (.dvc/tmp/exps) and still trained
    # and checkpointed into the project's own stores (DVC_ROOT), not into the copy's.
    experiment = client.get_experiment_by_name("synthetic")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id], "params.`train.epochs` = '20'")
    assert [r.info.status for r in found] == ["FINISHED"]
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert len(list((repo / "outputs" / "ray_results").glob("danet-*"))) == 2  # both trainings
