"""Samples/s of decode + augment: from WebDataset shards vs from the raw files of the same data;
and the training loop fed in turn vs by the prefetch thread.

    python bench/loader.py                       # CamVid from ../shared/data/camvid when present
    python bench/loader.py --dataset synthetic
    python bench/loader.py --loop SHARDS [--preset P] [--set k=v]   # loop: in turn vs prefetched

Both paths decode and augment as training does (the loader's ``TrainStream.build``: random
scale, crop, flip, normalise) in a DataLoader, in the main process (0 workers) and with 2
worker processes. ``--loop`` trains a session of the params (params.yaml, a preset, ``--set``)
on SHARDS in alternating chunks of ``--batches`` iterations, its batches made in turn between
steps (prefetch 0) or ahead by the thread (pipeline/training/prefetch.py, prefetch 2), and
prints each mode's images/s: alternating chunks share whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.augment import draw
from pipeline.data.loader import RawSample, TrainStream, image_size, train_loader
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.data.readers import Reader, make_reader
from pipeline.data.readers.base import load_label_array
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.shard import shard_dataset
from pipeline.sections import DataParams

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


class RawFiles(Dataset):
    """The same samples read from the dataset's own files, one file pair per item, then drawn,
    decoded and augmented by the training loader's own code (``TrainStream.build``)."""

    def __init__(self, reader: Reader, split: str, stream: TrainStream):
        self.reader, self.items, self.stream = reader, reader.items(split), stream

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[index]
        if isinstance(self.reader, SyntheticReader):  # generated data: the reader draws it
            sample = self.reader.read(item)
            data, label = sample.image_bytes, sample.label
            assert label is not None  # train scenes are labelled
        else:  # one read of each file, as a plain file-based loader would
            data = Path(item.image).read_bytes()
            assert item.label is not None
            label = self.reader.convert_label(load_label_array(item.label), item.label)
        raw = RawSample(str(index), data, "png" if data.startswith(b"\x89PNG") else "jpg", b"")
        mask = torch.from_numpy(np.ascontiguousarray(label))
        h, w = image_size(data, raw.where)  # as TrainStream.next_sample: the draw from the header
        augment, rng = self.stream.augment, np.random.default_rng(index)
        d = draw(h, w, augment, rng, mask if augment.cat_max_ratio < 1 else None)
        image, target = self.stream.build(raw, d, mask)
        assert isinstance(image, torch.Tensor)
        return image, target


def rate(loader: DataLoader, batch: int, batches: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: worker start, first shard open
    start = time.perf_counter()
    for _ in range(batches - 1):
        next(it)
    return (batches - 1) * batch / (time.perf_counter() - start)


def epochs_rate(stream: TrainStream, workers: int, epochs: int, persistent: bool) -> float:
    """Samples/s over ``epochs`` short epochs, worker start-up included: one loader whose
    processes persist (the epoch reaches them through ``set_epoch``), or a loader built anew
    for every epoch (the processes start again and refill their shuffle buffers)."""
    start = time.perf_counter()
    loader = train_loader(stream, workers)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        if not persistent:
            loader = DataLoader(stream, batch_size=None, num_workers=workers)
        for _ in loader:
            pass
    return epochs * stream.batches_per_epoch * stream.batch_size / (time.perf_counter() - start)


def loop_rates(args: argparse.Namespace, rounds: int = 6) -> dict[int, list[float]]:
    """Images/s of chunks of the training loop, batches in turn (0) or prefetched (2)."""
    import dataclasses
    import itertools

    from pipeline.config import load_params
    from pipeline.training.builder import step_options
    from pipeline.training.job import prepare_job
    from pipeline.training.loop import train_steps
    from pipeline.training.prefetch import Prefetcher, on_device
    from pipeline.training.session import open_session

    params = load_params(args.params, [*args.sets, f"data.shards={args.loop}"], args.preset)
    train = dataclasses.replace(params.train, num_workers=1, epochs=10_000)
    run = open_session(prepare_job(params.model, params.data, train), device=torch.device("cpu"))
    t = run.job.train
    run.stream.batches_per_epoch = 10**6
    batches = iter(run.loader)
    rates: dict[int, list[float]] = {0: [], 2: []}
    for chunk in range(2 * rounds + 1):  # the first: warm-up
        depth = 2 * (chunk % 2)
        made = Prefetcher(batches, run.batch_fn, run.device, depth, t.channels_last)
        start = time.perf_counter()
        train_steps(
            run.model,
            itertools.islice(made, args.batches),
            run.optimizer,
            run.scheduler,
            run.loss_fn,
            run.device,
            batch_fn=on_device,
            log_every=args.batches,
            **step_options(t),
        )
        seconds = time.perf_counter() - start
        made.close()  # the batches it made ahead are dropped: speed, not data, is measured here
        if chunk:
            rates[depth].append(args.batches * t.batch_size / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--loop", default="", help="a shards folder: the loop's A/B instead")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    parser.add_argument("--dataset", default="camvid" if CAMVID.is_dir() else "synthetic")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the persistence test")
    args = parser.parse_args()
    if args.loop:
        rates = loop_rates(args)
        print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; {args.loop}")
        for depth, label in ((0, "in turn"), (2, "prefetched")):
            r = rates[depth]
            chunks = ", ".join(f"{x:.1f}" for x in r)
            print(
                f"{label:>10}: median {statistics.median(r):6.2f}, best {max(r):6.2f} images/s ({chunks})"
            )
        median = statistics.median(rates[2]) / statistics.median(rates[0])
        print(
            f"prefetched / in turn: {median:.2f} (medians), {max(rates[2]) / max(rates[0]):.2f} (bests)"
        )
        return
    torch.set_num_threads(1)
    if args.dataset == "camvid":
        reader, split = make_reader("camvid", CAMVID), "train"
    else:
        reader, split = (
            make_reader("synthetic", num_samples={"train": 400}, width=480, height=360),
            "train",
        )
    augment = DataParams(crop_size=args.crop, base_size=0, scale_min=0.5, scale_max=2.0)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dataset(reader, (split,), Path(tmp) / "s", max_count=64, workers=2)
        manifest = load_manifest(Path(tmp) / "s")
        urls = shard_refs(manifest, split)
        mean, std = manifest.mean, manifest.std
        n = args.batch * args.batches
        samples = manifest.split(split).samples
        print(
            f"{args.dataset} {split}: {samples} images, crop {args.crop}, "
            f"batch {args.batch}, {n} samples per measurement"
        )
        print(f"{'source':>8} {'workers':>7} {'samples/s':>10}")
        results = {}
        for workers in (0, 2):
            stream = TrainStream(
                urls, args.batch, args.batches, augment, mean, std, shuffle_buffer=32
            )
            raw = DataLoader(
                RawFiles(reader, split, stream),
                batch_size=args.batch,
                shuffle=True,
                num_workers=workers,
            )
            for name, loader in (("shards", train_loader(stream, workers)), ("raw", raw)):
                results[name, workers] = rate(loader, args.batch, args.batches)
                print(f"{name:>8} {workers:>7} {results[name, workers]:10.1f}", flush=True)
        for workers in (0, 2):
            print(
                f"shards / raw with {workers} workers: {results['shards', workers] / results['raw', workers]:.2f}"
            )
        short = max(2, args.batches // 5)  # short epochs: where a rebuild costs the most
        stream = TrainStream(urls, args.batch, short, augment, mean, std, shuffle_buffer=32)
        rebuilt = epochs_rate(stream, 2, args.epochs, persistent=False)
        persistent = epochs_rate(stream, 2, args.epochs, persistent=True)
        print(
            f"{args.epochs} epochs of {short} batches, 2 workers: rebuilt every epoch "
            f"{rebuilt:.1f}, persistent {persistent:.1f} samples/s ({persistent / rebuilt:.2f}x)"
        )


if __name__ == "__main__":
    main()
