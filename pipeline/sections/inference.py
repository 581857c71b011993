"""The inference sections: the protocol shared by evaluate and predict, and each stage's own."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.schema import MAX_CROP, MAX_SCALE, MAX_SIDE, Section, param, require


@dataclass(frozen=True)
class ProtocolParams(Section):
    """An inference protocol (danet/inference.py) of evaluate and predict (each has its mode, flip)."""

    reference: str = param("official", choices=("official", "mmseg"))
    crop: int = param(512, ge=16, le=MAX_CROP)  # sliding-window crop
    stride: int = param(0, ge=0, le=MAX_CROP)  # 0 = the reference's default; <= crop
    scales: tuple[float, ...] = param((1.0,), gt=0, le=MAX_SCALE)  # several: multi-scale
    base_size: int = param(
        0, ge=0, le=MAX_SIDE
    )  # official: long side at scale 1 (0 = the image's own)
    test_scale: tuple[int, ...] = param(
        (), ge=1, le=MAX_SIDE
    )  # mmseg: [W, H] keep-ratio test resize
    window_batch: int = param(8, ge=1, le=1024)  # sliding windows per forward pass

    def check(self) -> None:
        require(bool(self.scales), f"{self.NAME}.scales must list at least one scale")
        require(
            len(self.test_scale) in (0, 2),
            f"{self.NAME}.test_scale must be [] or [W, H], got {list(self.test_scale)}",
        )
        require(  # a larger stride would leave pixels between windows unpredicted
            self.stride <= self.crop,
            f"{self.NAME}.stride {self.stride} is larger than {self.NAME}.crop {self.crop}: "
            "the sliding windows would leave pixels between them unpredicted",
        )
        largest = self.base_size * max(self.scales)
        require(
            largest <= MAX_SIDE,
            f"{self.NAME}.base_size {self.base_size} x scale {max(self.scales)} is a {largest:g}-pixel "
            f"side: above {MAX_SIDE}, one image would not fit in memory",
        )


@dataclass(frozen=True)
class EvaluateParams(ProtocolParams):
    """``danet evaluate``: which model, which split, which protocol."""

    NAME = "evaluate"
    model: str = "auto"  # auto = the better of train.out and tune.out; or a file, run id, URI
    shards: str = "data/shards"
    split: str = param("val", name=True)
    mode: str = param("whole", choices=("whole", "slide"))
    flip: bool = True
    out: str = "outputs/eval"
    num_overlays: int = param(4, ge=0, le=10_000)
    device: str = param("auto", choices=("auto", "cpu", "cuda"))
    bf16: bool = False  # autocast on CUDA and CPUs with native bf16 (energies fp32)
    workers: int = param(1, ge=1, le=10_000)  # > 1: Ray tasks (a GPU each when there are GPUs)


@dataclass(frozen=True)
class PredictParams(ProtocolParams):
    """``danet predict`` (files or a split of shards; ``format``: pipeline/use/formats.py)
    and the served model's defaults; ``mode: auto`` slides over images above ``slide_above``."""

    NAME = "predict"
    model: str = ""  # model.pt, run id, runs:/ or models:/ URI
    out: str = "outputs/predict"
    shards: str = ""  # predict a split of these shards (folder or URL) instead of files
    split: str = param("test", name=True)  # ... this split, labelled or images only
    format: str = param("masks", choices=("masks", "cityscapes", "voc"))
    mode: str = param("auto", choices=("auto", "whole", "slide"))
    slide_above: int = param(1024, ge=0, le=MAX_SIDE)
    flip: bool = False  # add horizontally flipped predictions
    device: str = param("auto", choices=("auto", "cpu", "cuda"))
