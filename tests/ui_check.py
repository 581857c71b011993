"""``make ui-check``: the MLflow UI after ``make demo``, opened in a real browser.

Starts ``mlflow ui`` on 127.0.0.1 over the demo's store (the README's command), drives Debian's
Chromium with Playwright, and for each view the README lists takes a screenshot (docs/ui/*.png)
and checks what a user should find there: the champion run's source and commit, its datasets,
the loss and val mIoU charts first, every picture one click away with nothing over it, the
trials named and scored and their table with the searched values, the logged model named after
its run with the evaluation's scores only, and the registered version's tags and usage. Prints one line per check; exit 1 if
any failed, 2 if there is nothing to look at (run ``make demo`` first) or no browser.

Not part of ``make test`` (it needs a browser and a finished demo).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Chromium on a closed network: no background connections, no sandbox as root (the probe's flags)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECTION_HEADERS = """() => Array.from(document.querySelectorAll('*'))
    .filter(e => e.children.length == 0 && /^\\(\\d+\\)$/.test(e.textContent.trim()))
    .map(e => e.parentElement.textContent.trim().replace(/\\(\\d+\\)$/, ''))"""


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, view: str, ok: bool, what: str, seen: Any = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {view}: {what}" + ("" if ok else f" (saw {seen!r})"))
        if not ok:
            self.failed.append(f"{view}: {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_ui(project: Path, store: str) -> Iterator[str]:
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "ui", "--backend-store-uri", store, "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("error: mlflow ui exited at start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def what_the_demo_made(project: Path, store: str) -> dict[str, Any]:
    """The champion version, its run and logged model, the search it refits and its trials."""
    from mlflow.tracking import MlflowClient

    registered = project / "outputs" / "register" / "registered.json"
    if not registered.is_file():
        raise SystemExit(f"error: {registered} does not exist: run make demo first")
    reg = json.loads(registered.read_text())
    client = MlflowClient(store)
    version = client.get_model_version(reg["name"], reg["champion_version"])
    assert version.run_id, f"version {version.version} has no run"
    run = client.get_run(version.run_id)
    search_id = run.data.tags.get("danet.search_run_id", "")
    trials = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{search_id}'"
    )
    model_id = str(version.source).removeprefix("models:/")
    import mlflow

    mlflow.set_tracking_uri(store)
    metadata = mlflow.models.get_model_info(str(version.source)).metadata or {}
    return {
        "model_metadata": metadata,
        "name": reg["name"],
        "version": version,
        "run": run,
        "experiment": run.info.experiment_id,
        "search": client.get_run(search_id) if search_id else None,
        "trials": trials,
        "model": client.get_logged_model(model_id),
    }


def find_card(page: Any, name: str) -> Any:
    """The chart card titled ``name``, scrolled to: the charts render as they come into view."""
    card = page.get_by_text(name, exact=True)
    for _ in range(30):
        if card.count():
            break
        page.mouse.move(640, 600)
        page.mouse.wheel(0, 1200)
        page.wait_for_timeout(400)
    return card


def shoot(page: Any, out: Path, name: str) -> None:
    """A screenshot, shrunk to a small palette PNG for the README."""
    from PIL import Image

    path = out / f"{name}.png"
    page.screenshot(path=str(path))
    image = Image.open(path).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    image.quantize(colors=128).save(path, optimize=True)


def open_view(page: Any, url: str, wait_for: str) -> str:
    page.goto(url)
    with suppress(Exception):  # the check that follows says what is missing
        page.get_by_text(wait_for).first.wait_for(timeout=30_000)
    page.wait_for_timeout(2500)  # charts and images load after the text
    return str(page.inner_text("body"))


UNCOVERED = """img => {
    const r = img.getBoundingClientRect();
    const inside = r.width > 50 && r.height > 50 && r.top >= 0 && r.left >= 0
        && r.bottom <= window.innerHeight + 1 && r.right <= window.innerWidth + 1;
    const points = [[0.5, 0.5], [0.2, 0.2], [0.8, 0.2], [0.2, 0.8], [0.8, 0.8]];
    const clear = points.every(([fx, fy]) => {
        const e = document.elementFromPoint(r.left + fx * r.width, r.top + fy * r.height);
        return e === img;
    });
    return {inside, clear, box: [r.left, r.top, r.width, r.height]};
}"""


def open_artifact(page: Any, base: str, exp: str, run_id: str, name: str) -> Any:
    """The run's Artifacts tab with ``name`` clicked once: its preview image, or None."""
    page.goto(f"{base}/#/experiments/{exp}/runs/{run_id}/artifacts")
    page.wait_for_timeout(2500)
    *folders, file = name.split("/")
    for part in [*folders, file]:  # a folder opens by a click on it, then its file
        entry = page.get_by_text(part, exact=True)
        if not entry.count():
            return None
        entry.first.click()
        page.wait_for_timeout(2500 if part == file else 1000)
    images = page.locator(f"img[src*='{file}'], img[src^='blob:'], img[src^='data:']")
    shown = [images.nth(i) for i in range(images.count()) if images.nth(i).is_visible()]
    return shown[-1] if shown else None  # an earlier preview may stay in the page, hidden


def check_picture(c: Checks, page: Any, view: str, name: str, image: Any) -> None:
    """``name`` shown by one click, whole in the viewport, and no element over it."""
    c.check(view, image is not None, f"{name} opens with one click in Artifacts")
    if image is None:
        return
    image.scroll_into_view_if_needed()
    seen = image.evaluate(UNCOVERED)
    c.check(view, seen["inside"], f"{name} whole in the viewport", seen["box"])
    c.check(view, seen["clear"], f"{name}: nothing drawn over it", seen["box"])


def miou_names(demo: dict[str, Any]) -> dict[str, set[str]]:
    """Every name an mIoU is shown under: the run's metrics and tags, the version's tags, the
    logged model's metadata."""
    run, version, model = demo["run"], demo["version"], demo["model"]
    meta = demo.get("model_metadata") or {}
    pick = lambda keys: {k for k in keys if "miou" in k.lower()}  # noqa: E731
    return {
        "run metrics": pick(run.data.metrics),
        "run tags": pick(run.data.tags),
        "version tags": pick(version.tags),
        "model metadata": pick(meta),
        "model metrics": pick(m.key for m in model.metrics or []),
    }


def weights_copies(run_id: str, experiment_id: str) -> list[str]:
    """Where the run's model.pt is stored: its artifacts, each of its logged models."""
    import mlflow
    from mlflow.tracking import MlflowClient

    copies = (
        ["run artifacts"]
        if "model.pt" in {a.path for a in MlflowClient().list_artifacts(run_id)}
        else []
    )
    models = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    for model in models:
        files = mlflow.artifacts.list_artifacts(artifact_uri=f"{model.artifact_location}/artifacts")
        copies += ["logged model"] * sum(Path(f.path).name == "model.pt" for f in files)
    return copies


def look(base: str, demo: dict[str, Any], out: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    c = Checks()
    run, exp = demo["run"], demo["experiment"]
    run_id, run_name = run.info.run_id, run.info.run_name
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(f"{base}/#/experiments/{exp}/runs")
        page.wait_for_timeout(3000)
        for button in (page.get_by_text("Model training", exact=True), page.get_by_label("Close")):
            if button.count():  # the training sidebar, and the assistant panel out of the way
                button.first.click()
                page.wait_for_timeout(500)

        view = "run overview"
        text = open_view(page, f"{base}/#/experiments/{exp}/runs/{run_id}", "Source")
        more = page.get_by_text(re.compile(r"^\+\d+$"))
        if more.count():  # the datasets after the first hide behind "+1"
            more.first.click()
            page.wait_for_timeout(1000)
            text = str(page.inner_text("body"))
        commit = run.data.tags.get("mlflow.source.git.commit", "")[:7]
        c.check(view, "danet train" in text, "Source says danet train", text[:200])
        c.check(view, bool(commit) and commit in text, f"the git commit {commit} shown")
        for split in ("train", "val"):
            c.check(view, f"synthetic-{split}" in text, f"dataset synthetic-{split} listed")
        c.check(view, "danet.refit_of_search" in text, "tagged as the search's refit")
        uri = f"models:/{demo['name']}@champion"
        for words in ("best val mIoU", "whole", "the refit of search", uri, "mlflow models serve"):
            c.check(view, words in text, f"the description says {words!r}")
        shoot(page, out, "run-overview")

        view = "pictures"
        for name in ("val_predictions.png", "per_class_iou.png", "confusion_matrix.png"):
            check_picture(c, page, view, name, open_artifact(page, base, exp, run_id, name))
            if name == "val_predictions.png":
                shoot(page, out, "run-images")
        shown = miou_names(demo)
        protocol = demo["version"].tags.get("eval_protocol", "")
        allowed = {"val/miou", "best_val_miou", f"val/{protocol}/miou", "eval_miou"}
        for where, found in shown.items():
            c.check("mIoU names", found <= allowed, f"{where}: one name per meaning", found)

        view = "model metrics"
        open_view(page, f"{base}/#/experiments/{exp}/runs/{run_id}/model-metrics", "Step")
        sections = page.evaluate(SECTION_HEADERS)
        c.check(view, sections[:1] == ["loss"], "the loss section first", sections)
        c.check(view, "val" in sections[:3], "val (mIoU) among the first sections", sections)
        shoot(page, out, "run-metrics")
        # pictures are artifacts: MLflow's image cards (every param of the run above the
        # picture, step 0 first) are not where a person should have to look
        c.check(view, not page.get_by_text("No image logged").count(), "no empty image card")
        c.check(view, find_card(page, "val_predictions").count() == 0, "no picture under text")
        first = "evaluations/val_predictions_000000.png"  # the untrained model's predictions
        check_picture(c, page, view, first, open_artifact(page, base, exp, run_id, first))
        for kind in ("pam", "cam"):  # danet explain's pictures, at the last evaluation
            name = f"val_attention_{kind}.png"
            check_picture(c, page, view, name, open_artifact(page, base, exp, run_id, name))

        view = "search trials"
        search = demo["search"]
        c.check(view, search is not None, "the champion's run names its search")
        if search is not None:
            names = [t.info.run_name for t in demo["trials"]]
            c.check(view, all(re.fullmatch(r"trial \d+", n) for n in names), "short names", names)
            c.check(view, all("best_val_miou" in t.data.metrics for t in demo["trials"]), "scored")
            nan = [
                t.info.run_name
                for t in demo["trials"]
                if any(v != v for v in t.data.metrics.values())
            ]
            c.check(view, not nan, "no NaN metric on a trial", nan)
            states = {t.info.status for t in demo["trials"]}
            c.check(view, states <= {"FINISHED"}, "no trial ends KILLED or FAILED", states)
            # MLflow's runs table opens on fixed columns; the search's description links a view
            # of its trials with their searched values and scores as columns
            open_view(page, f"{base}/#/experiments/{exp}/runs/{search.info.run_id}", "Source")
            link = page.locator("a", has_text="The trials side by side")
            c.check(view, link.count() > 0, "the search's description links its trials' table")
            if link.count():
                with page.context.expect_page() as opened:  # its links open a new tab
                    link.first.click()
                page = opened.value
                page.set_viewport_size({"width": 1280, "height": 860})
                page.wait_for_timeout(5000)
                close = page.get_by_label("Close")
                if close.count():  # the assistant panel out of the way
                    close.first.click()
                    page.wait_for_timeout(500)
            text = str(page.inner_text("body")) if link.count() else ""
            c.check(view, all(n in text for n in names), "trial names in the runs table", names)
            for t in demo["trials"]:
                lr = t.data.params.get("train.lr", "?")
                score = f"{t.data.metrics.get('best_val_miou', -1):.4f}"[:5]
                c.check(view, lr[:5] in text, f"{t.info.run_name}: its train.lr {lr} in the table")
                c.check(view, score in text, f"{t.info.run_name}: its best_val_miou {score}")
            shoot(page, out, "search-trials")
            ids = json.dumps([t.info.run_id for t in demo["trials"]])
            compare = f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp])}"
            text = open_view(page, compare, "Parallel Coordinates Plot")
            c.check(view, "train.lr" in text, "the compare view lists train.lr")
            shoot(page, out, "search-compare")

        view = "logged model"
        model = demo["model"]
        text = open_view(page, f"{base}/#/experiments/{exp}/models/{model.model_id}", "Metrics")
        c.check(view, model.name == run_name and run_name in text, "named after its run")
        c.check(view, "system/" not in text, "no system metrics among its scores")
        c.check(view, "val/official-whole-flip/miou" in text, "the evaluation's val mIoU shown")
        c.check(view, "synthetic-val" in text, "its scores name the evaluated dataset")
        copies = weights_copies(run_id, exp)
        c.check(view, copies == ["logged model"], "model.pt stored once, in the model", copies)
        shoot(page, out, "logged-model")

        view = "model version"
        version = demo["version"]
        url = f"{base}/#/models/{demo['name']}/versions/{version.version}"
        text = open_view(page, url, "data_sha256")
        c.check(view, "champion" in text, "the champion alias shown")
        c.check(view, version.tags["data_sha256"] in text, "data_sha256 shown")
        digest = version.tags["data_sha256"][:16]
        c.check(view, f"-val {digest}" in text, f"the description names the val shards {digest}")
        c.check(view, "runtime" in text and "slide_above" in text, "the signature's params")
        c.check(view, f"models:/{demo['name']}@champion" in text, "the description names the URI")
        c.check(view, "mlflow models serve" in text, "the description has the serve command")
        shoot(page, out, "model-version")
        browser.close()
    return c.failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs/ui"))
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} not found: apt-get install chromium", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("error: playwright is not installed: make install", file=sys.stderr)
        return 2
    project = args.project.resolve()
    database = args.store.removeprefix("sqlite:///")
    if args.store.startswith("sqlite:///") and not database.startswith("/"):
        args.store = f"sqlite:///{project / database}"  # the project's store, not the cwd's
    try:
        demo = what_the_demo_made(project, args.store)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(project, args.store) as base:
        failed = look(base, demo, args.out)
    print(
        f"{'all checks passed' if not failed else f'{len(failed)} failed'}; screenshots in "
        f"{args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
