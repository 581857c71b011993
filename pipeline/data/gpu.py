"""Decode and augment training batches on the GPU (``data.gpu_decode`` on CUDA).

The loader's workers read bytes, decode only the small label PNGs and draw each sample's
augmentation (pipeline/data/augment.py); here the batch's JPEGs are decoded together with
``torchvision.io.decode_jpeg(device="cuda")`` and the same draws are applied on the device: the
random scale (bilinear, antialiased), padding, crop, flip and photometric changes, then the
normalisation. Images that are not JPEG arrive decoded from the workers and join here. The
function runs on any device, so the CPU tests check it against the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipeline.data.augment import apply_image, normalize
from pipeline.data.loader import RawBatch


def decode_batch(
    batch: RawBatch, crop: int, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``RawBatch`` -> (B, 3, crop, crop) normalised images and (B, crop, crop) labels on ``device``."""
    encoded = [i for i, t in enumerate(batch.images) if t.dim() == 1]
    decoded: dict[int, torch.Tensor] = {}
    if encoded:
        jpegs = [batch.images[i] for i in encoded]
        if device.type == "cuda":
            # torchvision's nvJPEG decode allocates its outputs on this stream but writes them
            # from a private one that does not wait for this stream's queued kernels, so memory
            # they still read can be overwritten (pytorch/vision#9606; torchcodec#1634 added
            # the same wait): the stream's work finishes first. On the prefetch thread's side
            # stream that is the previous batch's augmentation, and only that thread waits.
            torch.cuda.current_stream(device).synchronize()
        decoded = dict(
            zip(encoded, decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device), strict=True)
        )
    images = []
    for i, (source, d) in enumerate(zip(batch.images, batch.draws, strict=True)):
        image = decoded[i] if i in decoded else source.to(device, non_blocking=True)
        images.append(apply_image(F.to_dtype(image, torch.float32, scale=True), d, crop))
    x = normalize(torch.stack(images), mean, std)
    return x, batch.labels.to(device, non_blocking=True)
