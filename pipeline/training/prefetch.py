"""Batches ready on the device before the step asks for them: batch N+1 is read, decoded,
augmented and copied while step N runs.

A background thread takes the loader's batches in order and runs the batch path on them
(``batch_fn``: the copy to the device, or pipeline/data/gpu.py's JPEG decode and augmentation),
up to ``depth`` batches ahead. On CUDA it does so on a side stream: its kernels and copies run
beside the step's on the training stream instead of queueing between two steps, and its host
work (reading the loader, nvJPEG's host phase and its synchronisation, launching the
augmentation's small kernels) runs beside the step's kernel launches instead of before them.
Each batch carries an event recorded on the side stream after its last kernel; the training
stream waits on that event (not on the whole side stream, which is already working on the next
batch), and the batch's tensors are marked ``record_stream`` on the training stream, so the
caching allocator does not hand their memory back to the side stream before the step that reads
them has run.

On a CPU the thread works the same way without streams, but training feeds a CPU's steps in
turn: on 2 cores the thread's torch work (its own OpenMP team) and the GIL slowed the loop to
0.76-0.79 of the serial one, loader processes or not (BENCHMARKS.md, issue 33).

The order is the loader's and nothing here draws a random number, so the batches are the ones
the serial path (``depth`` 0: ``batch_fn`` in the training thread, between steps) gives, bit for
bit (tests/test_prefetch.py): the overlap changes when a batch is made, not what it holds.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from pipeline.training.loop import BatchFn

DEPTH = 2  # batches made ahead on CUDA: one being made while one waits for the step
_END = object()  # the loader is exhausted
Prepared = tuple[torch.Tensor, torch.Tensor, Any]  # images, labels, the side stream's event


class _Failed:
    """An exception of the producer thread, raised in the consumer at its place in the order."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def on_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch path of a batch that comes prepared: it is on the device already."""
    images, labels = batch
    return images, labels


def _prepare(
    batch_fn: BatchFn,
    device: torch.device,
    channels_last: bool,
    stream: torch.cuda.Stream | None,
    batch: Any,
) -> Prepared:
    images, labels = batch_fn(batch, device)
    if channels_last:  # the step's layout, made here rather than in the step
        images = images.contiguous(memory_format=torch.channels_last)
    event = None
    if stream is not None:
        event = torch.cuda.Event()
        event.record(stream)
    return images, labels, event


def _produce(
    source: Iterator[Any],
    prepare: Callable[[Any], Prepared],
    stream: torch.cuda.Stream | None,
    ready: queue.Queue[Any],
    stopping: threading.Event,
) -> None:
    """The thread: prepare each batch in order and queue it; stop when ``stopping`` is set.
    (It holds no reference to its ``Prefetcher``: dropping that one stops the thread.)"""

    def put(item: Any) -> bool:
        while not stopping.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for batch in source:
                # checked again after the put: close() drains the queue, so a blocked put
                # succeeds; the source must not then make another batch
                if stopping.is_set() or not put(prepare(batch)) or stopping.is_set():
                    return
        put(_END)
    except BaseException as err:  # the loader's DataError, a decode error: the consumer's
        put(_Failed(err))


class Prefetcher(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """``batch_fn`` of each of ``batches``, on ``device`` and in ``channels_last`` when asked,
    prepared up to ``depth`` batches ahead by a thread (on a side stream on CUDA), or in turn
    when ``depth`` is 0. Iterate it once; ``close()`` stops the thread."""

    def __init__(
        self,
        batches: Iterable[Any],
        batch_fn: BatchFn,
        device: torch.device,
        depth: int = DEPTH,
        channels_last: bool = False,
    ) -> None:
        self.device, self.done = device, False
        self.source = iter(batches)  # made here: a DataLoader's iterator starts in this thread
        stream = torch.cuda.Stream(device) if device.type == "cuda" and depth > 0 else None
        self.prepare = functools.partial(_prepare, batch_fn, device, channels_last, stream)
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        if depth > 0:
            args = (self.source, self.prepare, stream, self.ready, self.stopping)
            self.thread = threading.Thread(
                target=_produce, args=args, name="danet-prefetch", daemon=True
            )
            self.thread.start()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.done:
            raise StopIteration
        if self.thread is None:  # the serial path
            images, labels, _ = self.prepare(next(self.source))
            return images, labels
        item = self.ready.get()
        if item is _END or isinstance(item, _Failed):
            self.done = True
            self.thread.join()
            if isinstance(item, _Failed):
                raise item.error
            raise StopIteration
        images, labels, event = item
        if event is not None:
            training = torch.cuda.current_stream(self.device)
            training.wait_event(event)  # this batch's work, not the side stream's later batches
            images.record_stream(training)
            labels.record_stream(training)
        return images, labels

    def close(self) -> None:
        """Stop the thread (the batches it prepared ahead are dropped) and wait for it: the
        loader's iterator is the caller's again (a persistent loader resets it every epoch)."""
        self.stopping.set()
        while self.thread is not None and self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # a producer blocked on a full queue
                self.ready.get(timeout=0.1)  # takes its turn, sees the flag and returns
        self.done = True

    def __del__(self) -> None:
        self.stopping.set()
