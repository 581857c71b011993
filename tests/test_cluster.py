"""Beyond one machine: a real multi-node Ray cluster (a head and three worker nodes, separate
raylets), shards and checkpoints in an S3 bucket, a tracking server; a node lost mid-training."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.cluster import check_tracking_for
from pipeline.config import ConfigError
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.shard import shard_dataset
from tests.conftest import tiny_params


def test_a_cluster_needs_a_tracking_server() -> None:
    with pytest.raises(
        ConfigError,
        match=r"mlflow.tracking_uri sqlite:///.*mlflow.db: a local store cannot serve a Ray cluster",
    ):
        check_tracking_for("10.1.2.3:6379", "sqlite:////tmp/mlflow.db")
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri file:///tmp/mlruns"):
        check_tracking_for("ray://10.1.2.3:10001", "file:///tmp/mlruns")
    check_tracking_for("127.0.0.1:6379", "http://127.0.0.1:5000")  # a server: fine
    check_tracking_for("", "sqlite:////tmp/mlflow.db")  # a local Ray: a local store is fine
    check_tracking_for("127.0.0.1:6379", "sqlite:////tmp/mlflow.db")  # this machine's cluster
    check_tracking_for("auto", "sqlite:////tmp/mlflow.db")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head that runs no training (0 CPUs) and three one-CPU worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the other tests' local Ray
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def remove_a_training_node(cluster: Any, run_dir: str, done: threading.Event) -> None:
    """After the first checkpoint, remove a node that runs a training worker."""
    from ray.util.state import list_actors

    from pipeline.training.checkpoint import checkpoint_dirs

    while not checkpoint_dirs(run_dir):
        time.sleep(0.5)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    busy = {a.node_id for a in workers}
    node = next(n for n in cluster.worker_nodes if n.node_id in busy)
    cluster.remove_node(node)
    done.set()


@pytest.mark.slow
def test_multi_node_training_survives_a_lost_node(
    cluster: Any, s3_bucket: str, mlflow_server: str, tmp_path: Path
) -> None:
    """Two workers forced onto different nodes read their shards from S3 and checkpoint to S3;
    one node is removed after the first checkpoint; the run recovers from it on the nodes that
    remain and finishes, and the tracking server holds the finished run."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.driver import run_training

    shards = f"{s3_bucket}/cluster-shards"
    reader = SyntheticReader(num_samples={"train": 8, "val": 2}, width=64, height=48)
    shard_dataset(reader, ("train", "val"), shards, max_count=4)
    model, data, train, mlflow = tiny_params(
        tmp_path,
        shards,
        train={
            "batch_size": 4,
            "epochs": 4,
            "eval_every_epochs": 2,
            "num_workers": 2,
            "placement_strategy": "STRICT_SPREAD",
            "max_failures": 2,
            "checkpoint_every": 1,
            "checkpoints_to_keep": 2,
            "storage_path": f"{s3_bucket}/cluster-ray",
            "ray_address": cluster.address,
            "run_name": "multi-node",
        },
        mlflow={"tracking_uri": mlflow_server, "system_metrics_every": 0},
    )
    removed = threading.Event()
    killer = threading.Thread(
        target=remove_a_training_node,
        args=(cluster, f"{train.storage_path}/multi-node", removed),
        daemon=True,
    )
    killer.start()
    summary = run_training(model, data, train, mlflow)
    assert removed.is_set(), "the run ended before a node could be removed"
    assert summary.final["iteration"] == 8
    run = MlflowClient(mlflow_server).get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and len(run.data.metrics) > 0
    assert (tmp_path / "out" / "model.pt").is_file()
