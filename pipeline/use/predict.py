"""Images -> label maps, written as pictures or as a benchmark server reads them, from any model
reference (file, MLflow run, registry).

The images come from files and folders, or from a split of shards (``predict.shards``: a labelled
split or an images-only test split). The preprocessing is evaluation's (danet/inference.py): RGB
in [0, 1] into a ``Segmenter`` that normalises itself, under evaluation's protocols (whole,
sliding window, multi-scale, flip: the predict section's params); ``mode: auto`` runs an image
whose long side exceeds ``slide_above`` through the sliding window, smaller ones whole. What is
written per image is ``predict.format``'s (pipeline/use/formats.py), each file atomically.
A file that is not a readable image is reported and skipped; the rest are still processed. Two
inputs whose outputs would share a name (a/x.png and b/x.png, x.png and x.jpg) are refused before
any work; over shards, the second is reported and skipped (``Claims``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from danet.inference import check_work, label_map, mode_for
from pipeline.artifacts.refs import LoadedModel
from pipeline.config import ConfigError
from pipeline.errors import DataError, ServiceError
from pipeline.evaluation.evaluate import protocol_of
from pipeline.images import MAX_PIXELS, TooLarge, decode_rgb, read_file
from pipeline.outputs import atomic_file, check_output, check_outside, check_own
from pipeline.schema import MAX_CROP, MAX_PASSES, MIN_WORK, WORK_PER_PIXEL
from pipeline.sections import PredictParams
from pipeline.use.formats import FORMATS


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)  # the format's files, per image
    failed: list[tuple[Path, str]] = field(default_factory=list)
    images: int = 0

    def describe(self, out: str | Path) -> tuple[str, str]:
        """What ``danet predict`` prints: an error line per failed file (stderr), the count."""
        errors = "\n".join(f"error: {path}: {problem}" for path, problem in self.failed)
        return errors, f"{self.images} images -> {out}/ ({len(self.failed)} failed)"


# one image to predict: its output stem, and the (H, W, 3) image or why it cannot be read
Source = tuple[str, Path | str, np.ndarray | str]


def predict_from_params(
    params: PredictParams, inputs: Sequence[str | Path], tracking_uri: str
) -> PredictReport:
    """``danet predict``: the images of ``inputs`` (or of ``predict.shards``' split) through
    ``params.model`` into ``params.out``."""
    from pipeline.artifacts.onnxfile import load_any_model
    from pipeline.devices import pick_device

    if not params.model:
        raise ConfigError("predict.model: give the model to predict with (--model)")
    if bool(inputs) == bool(params.shards):
        raise ConfigError(
            "danet predict: give image files or folders, or predict.shards (--shards)"
            + (", not both" if inputs else "")
        )
    device = pick_device(params.device, "predict.device")
    if params.shards:
        count, sources = shard_sources(params.shards, params.split)
        model = load_any_model(params.model, tracking_uri, device)
        out, shards = Path(params.out), {"predict.shards": params.shards}
        return predict_sources(model, sources, count, out, params, device, keep_off=shards)
    model = load_any_model(params.model, tracking_uri, device)
    return predict_files(model, inputs, Path(params.out), params, device)


def shard_sources(shards: str, split: str) -> tuple[int, Iterator[Source]]:
    """The images of a split of shards (checked before any model is loaded), keyed as sharded."""
    from pipeline.data.loader import read_images
    from pipeline.data.manifest import load_manifest, shard_refs

    manifest = load_manifest(shards)
    refs = shard_refs(manifest, split)

    def sources() -> Iterator[Source]:
        for ref in refs:
            for key, image in read_images(ref):
                yield key, f"{ref.url}:{key}", image

    return manifest.split(split).samples, sources()


def expand_inputs(inputs: Sequence[str | Path]) -> Iterator[Path]:
    """Files as given; folders -> every file inside (sorted), images or not (bad ones are reported)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
        else:
            yield path


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; ``ValueError`` naming the problem for anything that is not an image."""
    try:
        data = read_file(path)
    except DataError:
        raise ValueError("does not exist or is not a regular file") from None
    try:
        return decode_rgb(data)
    except TooLarge as err:
        raise ValueError(f"too large to decode safely ({err})") from None


class Claims:
    """Which input each output file name belongs to: two inputs never share an output (a/x.png
    and b/x.png, x.png and x.jpg, Cityscapes' ``x`` and ``x_leftImg8bit``). Names compare
    without case: a case-insensitive file system would merge X.png's and x.png's outputs too.
    A rename would break the server formats' names (a frame's, an image id's), so a collision
    is refused, never made unique."""

    def __init__(self) -> None:
        self.owner: dict[str, tuple[str, str]] = {}  # lower-cased name -> (name, origin)

    def clash(self, names: Sequence[str], origin: str) -> str:
        """ "" when ``names`` are free (then they are ``origin``'s), else why not."""
        for name in names:
            if (taken := self.owner.get(name.lower())) is not None and taken[1] != origin:
                case = f" ({taken[0]}: one file on a case-insensitive disk)" * (taken[0] != name)
                return (
                    f"would write {name}, as {taken[1]} does{case}: two inputs never share an "
                    "output; rename one or run them separately"
                )
        self.owner.update({name.lower(): (name, origin) for name in names})
        return ""


def check_distinct(stems: Sequence[tuple[str, str]], names: Callable[[str], Sequence[str]]) -> None:
    """Every (stem, origin)'s output ``names`` distinct from every other's, before any work:
    else one ``DataError`` naming the input and the one it collides with."""
    claims = Claims()
    for stem, origin in stems:
        if problem := claims.clash(names(stem), origin):
            raise DataError(origin, problem)


def file_sources(files: Sequence[Path]) -> Iterator[Source]:
    """Each file's stem, and its pixels (or why it has none)."""
    for path in files:
        stem = path.stem
        try:
            yield stem, path, read_image(path)
        except ValueError as err:
            yield stem, path, str(err)


def _save(picture: Image.Image, path: Path) -> None:
    with atomic_file(path) as tmp:
        picture.save(tmp, format="PNG")


def predict_files(
    model: LoadedModel,
    inputs: Sequence[str | Path],
    out: Path,
    params: PredictParams | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> PredictReport:
    """Predict every image of ``inputs`` into ``out`` by ``params``' protocol and format (the
    predict section's defaults if None); bad files are collected, not raised."""
    folders = {f"folder {i + 1}": p for i, p in enumerate(inputs) if Path(p).is_dir()}
    files = list(expand_inputs(inputs))
    output = FORMATS[(params or PredictParams()).format]
    check_out(out, output.names, folders)  # the output's own errors come first
    check_distinct([(f.stem, str(f)) for f in files], output.file_names)
    return predict_sources(
        model, file_sources(files), len(files), out, params, device, progress, folders
    )


def check_out(out: Path, names: Sequence[str], keep_off: Mapping[str, str | Path]) -> None:
    """``out`` a folder predict may write (its own or new), off the folders ``keep_off`` names."""
    check_output(out, "predict.out")
    check_own(out, "predict.out", "predict", names)
    check_outside(out, keep_off)


def predict_sources(
    model: LoadedModel,
    sources: Iterator[Source],
    count: int,
    out: Path,
    params: PredictParams | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    keep_off: Mapping[str, str | Path] | None = None,
) -> PredictReport:
    """The ``count`` images of ``sources`` through ``model`` into ``out``, which must not
    overlap the folders ``keep_off`` names (their params or descriptions -> paths)."""
    params = params or PredictParams()
    output = FORMATS[params.format]
    check_out(out, output.names, keep_off or {})
    output.check(model.classes, model.uri)
    device = device or torch.device("cpu")
    model.module.to(device).eval()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ServiceError(
            f"predict.out {out}: cannot create the folder ({err.strerror or err})"
        ) from None
    report = PredictReport()
    claims = Claims()  # files are checked before: shard keys here, as they come
    bar = tqdm(total=count, desc="predict", unit="img", disable=None if progress else True)
    for stem, origin, image in sources:
        bar.update()
        if isinstance(image, str):
            report.failed.append((Path(origin), image))
            continue
        if problem := claims.clash(output.file_names(stem), str(origin)):
            report.failed.append((Path(origin), problem))
            continue
        mode = mode_for(image.shape[:2], params.mode, params.slide_above)
        protocol = protocol_of(params, mode)
        try:  # what the image at each scale and each forward pass takes, before any of it
            h, w = image.shape[:2]
            budget = max(WORK_PER_PIXEL * h * w, MIN_WORK)
            check_work(h, w, protocol, MAX_CROP**2, MAX_PIXELS, budget, MAX_PASSES)
        except ValueError as err:
            report.failed.append((Path(origin), str(err)))
            continue
        pred = label_map(model.module, image, protocol, device)
        for name, picture in output.files(stem, image, pred, model.palette).items():
            target = out / name
            _save(picture, target)
            report.written.append(target)
        report.images += 1
    bar.close()
    return report
