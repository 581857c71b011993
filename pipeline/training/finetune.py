"""Fine-tuning from a segmentation model (``model.init_from``), as the paper's COCO -> VOC step and
the official code's ``--ft``: every weight whose name and shape match is copied; the classifiers of
another class count keep their fresh initialisation. Any other mismatch (another backbone or head)
is an error naming the model, not a silent partial load.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.artifacts.refs import load_model
from pipeline.errors import ModelError

log = logging.getLogger(__name__)
CLASSIFIERS = ("head.pam_cls.", "head.cam_cls.", "head.fused_cls.", "head.cls.", "aux_head.cls.")


def source_state(ref: str, tracking_uri: str = "") -> dict[str, torch.Tensor]:
    """The segmentation model's weights (a SegmentationModel's state dict) from any reference."""
    module = load_model(ref, tracking_uri).module
    inner = getattr(module, "model", None)
    if not isinstance(inner, nn.Module):
        raise ModelError(ref, "not a DANet segmentation model")
    return inner.state_dict()


def init_from(model: nn.Module, ref: str, tracking_uri: str = "") -> list[str]:
    """Copy ``ref``'s weights into ``model``; returns the re-initialised classifier tensors."""
    source, target = source_state(ref, tracking_uri), model.state_dict()
    fresh = []
    for name, value in target.items():
        if name in source and source[name].shape == value.shape:
            target[name] = source[name]
        elif name.startswith(CLASSIFIERS):
            fresh.append(name)
        else:
            found = tuple(source[name].shape) if name in source else "nothing"
            raise ModelError(
                ref,
                f"cannot fine-tune from it: {name} is {found}, the model needs {tuple(value.shape)}",
            )
    model.load_state_dict(target)
    if fresh:
        log.info(
            "[train] fine-tuning from %s; re-initialised: %s",
            ref,
            ", ".join(sorted({n.rsplit(".", 2)[0] for n in fresh})),
        )
    return fresh
