"""The pipeline itself on one GPU, each stage as a user types it (``bash bench/gpu.sh pipeline``).

    python bench/gpu_pipeline.py --shards .device/camvid --out /tmp/gpu-pipeline    # a GPU
    python bench/gpu_pipeline.py --tiny --out /tmp/gpu-pipeline-tiny                # any CPU

Every stage is ``python -m pipeline <command>`` (the ``danet`` command) in a process of its own,
with one MLflow SQLite store and one Ray storage folder under ``--out``:

1. ``danet train`` of the camvid preset with ``train.use_gpu`` (one Ray Train worker on the GPU,
   JPEG decode there), its driver SIGKILLed once a checkpoint is written, then the same command
   again: it resumes from that checkpoint and trains to the end;
2. bench/time_to_accuracy.py, the bare loop (no Ray, MLflow or checkpoints), on the same params
   for as many iterations as the resumed run trained;
3. ``danet evaluate`` of the model on the device; 4. ``danet tune``: two trials at once, half a
   GPU each (``tune.gpus_per_trial``); 5. ``danet register``.

One JSON line per stage, printed as it ends: the resume iteration, val mIoU, the images/s of
``danet train`` against the bare loop's (target >= 0.95), the MLflow run's GPU system metrics.
``--tiny``: synthetic shards made here and CPU-sized params (``--device cpu`` is then the
default): the same stages in a few minutes, so the first GPU minute is not the script's first run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN = "gpu-pipeline"  # train.run_name: the killed run and its resumption
# the camvid preset, 20 epochs of 46 iterations (920), checkpoints every 300, evaluation at the end
GPU = {
    "preset": "camvid",
    "recipe": ["data.loader_workers=8", "train.epochs=20", "train.eval_every_epochs=20"],
    "run": ["train.checkpoint_every=300", "mlflow.system_metrics_every=2"],
    "tune": ["tune.epochs=4", "tune.eval_every_epochs=2", "tune.cpus_per_trial=4"],
    "tune_recipe": ["data.loader_workers=4"],
}
TINY = {
    "preset": "",
    "recipe": [
        "data.crop_size=32",
        "data.shuffle_buffer=4",
        "train.batch_size=2",
        "train.epochs=4",
        "train.iters_per_epoch=3",
        "train.eval_every_epochs=4",
        "train.log_every=1",
        "train.cpus_per_worker=1",
    ],
    "run": ["train.checkpoint_every=3", "mlflow.system_metrics_every=1"],
    "tune": [
        "tune.epochs=1",
        "tune.eval_every_epochs=1",
        "tune.cpus_per_trial=1",
        "tune.space={train.lr: {loguniform: [0.005, 0.02]}, data.crop_size: {choice: [32, 40]}}",
    ],
    "tune_recipe": [],
}


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def danet(args: argparse.Namespace, command: str, sets: list[str]) -> list[str]:
    """The command line of ``danet [--preset P] COMMAND --set ...`` as ``python -m pipeline``."""
    preset = ["--preset", args.plan["preset"]] if args.plan["preset"] else []
    return [sys.executable, "-m", "pipeline", *preset, command, *(f"--set={s}" for s in sets)]


def run(
    args: argparse.Namespace,
    stage: str,
    command: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``command`` to its end (its output into ``--out/<stage>.log``); its output."""
    log = args.out / f"{stage}.log"
    with open(log, "w") as out:
        done = subprocess.run(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**args.env, **(env or {})},
            cwd=ROOT,
            timeout=timeout,
        )
    text = log.read_text()
    if done.returncode != 0:
        emit({"stage": stage, "error": f"exit {done.returncode}", "log": text[-3000:]})
        sys.exit(1)
    return text


def newest_checkpoint(run_dir: Path) -> int:
    done = [
        json.loads(p.read_text())["iteration"] for p in run_dir.glob("checkpoint_*/progress.json")
    ]
    return max(done, default=0)


def kill_after_checkpoint(args: argparse.Namespace, command: list[str], timeout: float) -> int:
    """Start ``command``, SIGKILL its driver once a checkpoint exists; that checkpoint's
    iteration."""
    run_dir = args.out / "ray" / RUN
    with open(args.out / "train-killed.log", "w") as out:
        driver = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=args.env, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        while not (reached := newest_checkpoint(run_dir)):
            if driver.poll() is not None or time.monotonic() > deadline:
                driver.kill()
                emit({"stage": "train-killed", "error": "no checkpoint before the driver ended"})
                sys.exit(1)
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    return reached


def common_sets(args: argparse.Namespace) -> list[str]:
    """Where every stage reads and writes under ``--out``; the device."""
    out, gpu = args.out, args.device == "cuda"
    return [
        f"data.shards={args.shards}",
        f"train.storage_path={out / 'ray'}",
        f"train.out={out / 'train'}",
        f"train.run_name={RUN}",
        f"train.use_gpu={'true' if gpu else 'false'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        f"evaluate.model={out / 'train' / 'model.pt'}",
        f"evaluate.shards={args.shards}",
        f"evaluate.out={out / 'eval'}",
        f"evaluate.device={args.device}",
        f"tune.out={out / 'tune'}",
        "tune.num_samples=2",
        "tune.max_concurrent=2",
        "tune.gpus_per_trial=0.5",
        f"register.eval_metrics={out / 'eval' / 'metrics.json'}",
        f"register.out={out / 'register' / 'registered.json'}",
    ]


def train(args: argparse.Namespace, sets: list[str]) -> dict[str, Any]:
    """Stage 1: train, SIGKILL the driver at its first checkpoint, train again: it resumes."""
    command = danet(args, "train", sets + args.plan["run"])
    start = time.monotonic()
    killed = kill_after_checkpoint(args, command, timeout=args.budget["train"])
    text = run(args, "train", command, timeout=args.budget["train"])
    resumed = re.search(r"resumed at iteration (\d+)", text)
    metrics = json.loads((args.out / "train" / "metrics.json").read_text())
    line = {
        "stage": "train",
        "device": args.device,
        "killed_after_checkpoint": killed,
        "resumed_at": int(resumed.group(1)) if resumed else None,
        "iterations": metrics["final"]["iteration"],
        "val_miou": metrics["final"]["val_miou"],
        "best_val_miou": metrics["best"]["val_miou"],
        "mlflow_run_id": metrics["mlflow_run_id"],
        "seconds": round(time.monotonic() - start, 1),
    }
    emit(line)
    return line


def mlflow_rates(args: argparse.Namespace, run_id: str, after: int) -> dict[str, Any]:
    """danet train's images/s after iteration ``after`` (the resumed process), past its first log
    window (warm-up): over the windows alone (the progress line's figure) and over the wall
    clock between their ends (the MLflow timestamps: checkpoints and logging included)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}").get_metric_history(
        run_id, "images_per_s"
    )
    windows = sorted((m.step, m.timestamp, m.value) for m in history if m.step > after)[1:]
    batch = int(args.batch)
    steps = [(b[0] - a[0], b[1] - a[1], b[2]) for a, b in itertools.pairwise(windows)]
    images = sum(d * batch for d, _, _ in steps)
    return {
        "train_images_per_s": images / sum(d * batch / v for d, _, v in steps),
        "train_images_per_s_wall": images / (sum(ms for _, ms, _ in steps) / 1000),
        "windows": len(steps),
    }


def gpu_metrics(args: argparse.Namespace, run_id: str) -> dict[str, Any]:
    """The MLflow run's GPU system metrics (nvidia-ml-py's samples): mean and max of each."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}")
    names = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/gpu")]
    summary = {}
    for name in sorted(names):
        values = [m.value for m in client.get_metric_history(run_id, name)]
        summary[name] = {
            "mean": round(sum(values) / len(values), 2),
            "max": max(values),
            "n": len(values),
        }
    all_system = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    return {"stage": "gpu_system_metrics", "gpu": summary, "system_metrics": len(all_system)}


def speed(args: argparse.Namespace, trained: dict[str, Any]) -> None:
    """Stage 2: the bare loop on the same params, as many iterations as the resumed run, with
    the torch threads Ray gives a Train worker (OMP_NUM_THREADS = train.cpus_per_worker)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}")
    threads = client.get_run(trained["mlflow_run_id"]).data.params["train.cpus_per_worker"]
    iterations = trained["iterations"] - (trained["resumed_at"] or 0)
    preset = ["--preset", args.plan["preset"]] if args.plan["preset"] else []
    sets = [x for s in [f"data.shards={args.shards}", *args.plan["recipe"]] for x in ("--set", s)]
    command = [
        sys.executable,
        str(ROOT / "bench" / "time_to_accuracy.py"),
        "--shards",
        str(args.shards),
    ]
    command += [*preset, *sets, "--iters", str(iterations), "--out", str(args.out / "bare.json")]
    run(args, "bare-loop", command, args.budget["bare"], {"OMP_NUM_THREADS": threads})
    bare = json.loads((args.out / "bare.json").read_text())
    args.batch = bare["batch"]
    rates = mlflow_rates(args, trained["mlflow_run_id"], trained["resumed_at"] or 0)
    line = {"stage": "speed", **rates, "bare_images_per_s": bare["images_per_s_wall"]}
    line.update(bare_iterations=bare["iterations"], threads=int(threads))
    line["ratio"] = rates["train_images_per_s"] / bare["images_per_s_wall"]
    line["ratio_wall"] = rates["train_images_per_s_wall"] / bare["images_per_s_wall"]
    emit({**line, "target": 0.95})
    emit(gpu_metrics(args, trained["mlflow_run_id"]))


def evaluate(args: argparse.Namespace, sets: list[str]) -> None:
    start = time.monotonic()
    run(args, "evaluate", danet(args, "evaluate", sets), timeout=args.budget["evaluate"])
    scores = json.loads((args.out / "eval" / "metrics.json").read_text())
    emit(
        {
            "stage": "evaluate",
            "device": args.device,
            "protocol": scores["protocol"],
            "miou": scores["miou"],
            "pixel_acc": scores["pixel_acc"],
            "images": scores["images"],
            "seconds": round(time.monotonic() - start, 1),
        }
    )


def side_by_side(args: argparse.Namespace, search_run_id: str) -> float:
    """Seconds during which every trial of the search was training at once (their MLflow runs,
    nested under the search's, overlap): the trials shared the GPU rather than took turns."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}")
    parent = client.get_run(search_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{search_run_id}'"
    )
    if len(runs) < 2:
        return 0.0
    start = max(r.info.start_time for r in runs)
    end = min(r.info.end_time or start for r in runs)
    return max(0.0, (end - start) / 1000)


def tune(args: argparse.Namespace, sets: list[str]) -> None:
    """Stage 4: two trials at once, half a GPU each."""
    start = time.monotonic()
    command = danet(args, "tune", sets + args.plan["tune"] + args.plan["tune_recipe"])
    text = run(args, "tune", command, timeout=args.budget["tune"])
    search = json.loads((args.out / "tune" / "search.json").read_text())
    running = [int(n) for n in re.findall(r"Trial status: (?:.*?)(\d+) RUNNING", text)]
    emit(
        {
            "stage": "tune",
            "gpus_per_trial": 0.5 if args.device == "cuda" else None,
            "most_trials_running": max(running, default=0),
            "trials_side_by_side_s": round(side_by_side(args, search["search_run_id"]), 1),
            "best_val_miou": search["best_val_miou"],
            "best_values": search["values"],
            "seconds": round(time.monotonic() - start, 1),
        }
    )


def register(args: argparse.Namespace, sets: list[str]) -> None:
    start = time.monotonic()
    run(args, "register", danet(args, "register", sets), timeout=args.budget["register"])
    registered = json.loads((args.out / "register" / "registered.json").read_text())
    emit({"stage": "register", **registered, "seconds": round(time.monotonic() - start, 1)})


def tiny_shards(args: argparse.Namespace) -> Path:
    """Synthetic scenes, 64x48, 12 train and 4 val, sharded by ``danet shard``."""
    out = args.out / "shards"
    sets = ["synthetic.num_samples={train: 12, val: 4}", "synthetic.width=64"]
    sets += ["synthetic.height=48", f"shard.out={out}", "shard.max_count=4", "shard.workers=1"]
    run(
        args,
        "shard",
        [sys.executable, "-m", "pipeline", "shard", *(f"--set={s}" for s in sets)],
        300,
    )
    return out


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shards", type=Path, default=ROOT / ".device" / "camvid")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-pipeline"))
    parser.add_argument("--tiny", action="store_true", help="synthetic shards, CPU-sized params")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.plan = TINY if args.tiny else GPU
    # seconds per stage: the GPU call has 540 (bench/gpu.sh), the tiny run a busy 2-core CPU
    scale = 4 if args.tiny else 1
    stages = {"train": 150, "bare": 90, "evaluate": 60, "tune": 150, "register": 60}
    args.budget = {k: v * scale for k, v in stages.items()}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args.env = {**env, "PYTHONUNBUFFERED": "1"}
    return args


# the machine's packages the bundle leans on hardest (bench/gpu_machine.txt knows few versions)
VERSIONS = ("torch", "numpy", "protobuf", "grpcio", "aiohttp", "typing_extensions", "packaging")


def versions() -> None:
    """Stage 0: the Python and the versions the stages run with, Ray's and MLflow's included."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    names = (*VERSIONS, "nvidia-ml-py", "ray", "mlflow-skinny", "webdataset")
    emit({"stage": "python", "python": sys.version.split()[0], **{n: version(n) for n in names}})


def main() -> None:
    args = parse()
    versions()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    args.out = args.out.resolve()
    if args.tiny:
        args.shards = tiny_shards(args)
    args.shards = args.shards.resolve()
    sets = common_sets(args) + args.plan["recipe"]
    trained = train(args, sets)
    speed(args, trained)
    evaluate(args, sets)
    tune(args, sets)
    register(args, sets)


if __name__ == "__main__":
    main()
