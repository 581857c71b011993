"""Batches made ahead (pipeline/training/prefetch.py) are the serial path's, bit for bit: the same
batches from the loader, on the GPU path's JPEG decode as on the plain copy, and a training
session fed by the thread ends with the weights of one fed in turn. Errors arrive in order, and
closing stops the thread. On CUDA (marked gpu): the side stream's batches equal the serial ones
while the training stream is busy."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data.loader import TrainStream, train_loader
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.data.shard import shard_dataset
from pipeline.errors import DataError
from pipeline.sections import DataParams
from pipeline.training.loop import to_device
from pipeline.training.prefetch import Prefetcher
from tests.conftest import DEVICES, synthetic, tiny_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("jpeg") / "shards"
    shard_dataset(synthetic(8, 1), ("train",), out, image_format="jpg", max_count=3)
    return out


def stream(shards: Path, gpu_decode: bool, batches: int = 6) -> TrainStream:
    manifest = load_manifest(shards)
    augment = DataParams(crop_size=40, scale_min=0.6, scale_max=1.4, photometric=True)
    return TrainStream(
        shard_refs(manifest, "train"),
        batch_size=3,
        batches_per_epoch=batches,
        augment=augment,
        mean=manifest.mean,
        std=manifest.std,
        seed=3,
        shuffle_buffer=4,
        gpu_decode=gpu_decode,
    )


def batch_path(shards: Path, gpu_decode: bool) -> Any:
    if not gpu_decode:
        return to_device
    from pipeline.data.gpu import decode_batch

    manifest = load_manifest(shards)
    return lambda batch, device: decode_batch(batch, 40, manifest.mean, manifest.std, device)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("gpu_decode", [False, True])
def test_prefetched_batches_are_the_serial_ones(
    jpeg_shards: Path, gpu_decode: bool, workers: int
) -> None:
    """Every batch, JPEG-decoded and augmented by the GPU path's code (on the CPU here) or
    copied, equals the serial path's bit for bit, in the same order, channels_last included."""
    fn = batch_path(jpeg_shards, gpu_decode)
    data = stream(jpeg_shards, gpu_decode)
    serial = list(Prefetcher(train_loader(data, workers), fn, CPU, depth=0, channels_last=True))
    ahead = Prefetcher(train_loader(data, workers), fn, CPU, depth=2, channels_last=True)
    assert ahead.thread is not None  # made by the thread
    made = list(ahead)
    assert len(serial) == len(made) == 6
    for (x0, y0), (x1, y1) in zip(serial, made, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert x1.is_contiguous(memory_format=torch.channels_last)
    assert not ahead.thread.is_alive()


def test_the_serial_path_is_the_step_batch_path(jpeg_shards: Path) -> None:
    """Depth 0 gives what ``train_steps`` made from the loader's batches before (``batch_fn``,
    then the layout), in the caller's thread."""
    fn = batch_path(jpeg_shards, True)
    expected = [fn(b, CPU) for b in stream(jpeg_shards, True)]
    serial = Prefetcher(stream(jpeg_shards, True), fn, CPU, depth=0)
    assert serial.thread is None
    for (x0, y0), (x1, y1) in zip(expected, serial, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_a_loader_error_arrives_after_the_batches_before_it() -> None:
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(2):
            yield torch.full((1, 3, 4, 4), float(i)), torch.zeros(1, 4, 4, dtype=torch.long)
        raise DataError("shard-000001.tar", "not a readable shard")

    ahead = Prefetcher(batches(), to_device, CPU, depth=2)
    assert [float(x[0, 0, 0, 0]) for x, _ in itertools.islice(ahead, 2)] == [0.0, 1.0]
    with pytest.raises(DataError, match="not a readable shard"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)


def test_close_stops_the_thread_and_reads_no_further() -> None:
    """A prefetcher closed mid-stream (a run that stops) stops its thread; it read at most
    ``depth`` + 1 batches past the last one taken."""
    taken = []

    def endless() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in itertools.count():
            taken.append(i)
            yield torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)

    ahead = Prefetcher(endless(), to_device, CPU, depth=2)
    next(ahead)
    ahead.close()
    assert ahead.thread is not None and not ahead.thread.is_alive()
    assert len(taken) <= 1 + 2 + 1
    assert not [t for t in threading.enumerate() if t is ahead.thread]


def train_session(shards: Path, tmp: Path, prefetch: int) -> Any:
    from pipeline.training.job import prepare_job
    from pipeline.training.session import open_session, train_epochs

    model, data, train, _ = tiny_params(tmp, shards, data={"loader_workers": 2})
    run = open_session(prepare_job(model, data, train), device=CPU)
    run.prefetch = prefetch
    train_epochs(run, None, lambda session, metrics: None)
    return run


def test_training_on_prefetched_batches_equals_training_in_turn(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """Two epochs of a session with 2 loader processes (persistent: the thread hands the
    loader's iterator back at each epoch's end), fed by the thread or in turn: equal weights,
    momentum and history, bit for bit."""
    serial = train_session(tiny_shards, tmp_path / "a", prefetch=0)
    ahead = train_session(tiny_shards, tmp_path / "b", prefetch=2)
    assert ahead.iteration == serial.iteration == 4 and ahead.epoch == 2
    for name, value in serial.core.state_dict().items():
        assert torch.equal(value, ahead.core.state_dict()[name]), name
    momentum = [serial.optimizer.state[p]["momentum_buffer"] for p in serial.core.parameters()]
    again = [ahead.optimizer.state[p]["momentum_buffer"] for p in ahead.core.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, again, strict=True))
    assert [e.miou for e in serial.history.evals] == [e.miou for e in ahead.history.evals]


@pytest.mark.parametrize("device", [d for d in DEVICES if not isinstance(d, str)])
def test_side_stream_batches_equal_the_serial_ones_on_cuda(jpeg_shards: Path, device: str) -> None:
    """nvJPEG decode and augmentation on the side stream while the training stream is busy
    (a long matmul chain before each batch is read): every batch equals the serial path's, and
    the memory of a consumed batch is not handed back before the training stream read it."""
    dev = torch.device(device)
    fn = batch_path(jpeg_shards, True)
    serial = [(x.cpu(), y.cpu()) for x, y in Prefetcher(stream(jpeg_shards, True), fn, dev, 0)]
    busy = torch.randn(2048, 2048, device=dev)
    sums = []
    for x, y in Prefetcher(stream(jpeg_shards, True), fn, dev, depth=2, channels_last=True):
        for _ in range(20):  # queued work ahead of the batch's first reader
            busy = (busy @ busy).clamp_(-1, 1)
        sums.append((x.double().sum(), y.sum()))
        del x, y  # freed while the sums above may still be queued
    torch.cuda.synchronize()
    expected = [(x.double().sum(), y.sum()) for x, y in serial]
    assert [(float(a), int(b)) for a, b in sums] == [(float(a), int(b)) for a, b in expected]
