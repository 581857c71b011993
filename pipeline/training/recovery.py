"""Training that does not die: a bad log window sends the run back to its last good state.

Each optimizer step whose gradients are not finite is skipped on the device (pipeline/training/
loop.py: the fused SGD's ``found_inf``), as fp16's loss scaler does, without a host sync. What a
skipped step cannot catch -- a window whose every step was non-finite, weights gone non-finite,
or a loss far above its running mean (``train.spike_factor``) -- is judged once per log window,
the same host read (and, under DDP, the same single all-reduce) that logging needs. A bad window
restores the last verified in-memory snapshot of the weights, the BatchNorm statistics and the
optimizer's momentum, multiplies every learning rate by ``train.recover_lr_factor`` and goes on
with the next batches (the schedule and the data stream do not go back: the bad window's batches
are skipped). After ``train.max_recoveries`` recoveries the run stops with ``TrainingDiverged``;
0 recoveries = stop at the first bad window, as before recovery existed.

A snapshot is *verified* once the window that started from it was good: the state at the end of
window k is a candidate until window k+1 passes. So a step that leaves finite but exploding
weights at the end of a window is not restored into. The state at the end of a stretch (a
checkpoint boundary) is trusted outright, so a run resumed from a checkpoint has the same
snapshots as one that never stopped. TensorFlow Model Garden's RecoveryAction (a checkpoint
reload on a loss blow-up) is the precedent; no segmentation toolbox recovers by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

EMA = 0.8  # the running mean's weight on the windows before: about the last 5 windows


@dataclass(frozen=True)
class Verdict:
    """One log window, as every rank sees it (all-reduced): its mean loss over the steps that
    were applied, and what went wrong, if anything (``reason`` empty: a good window)."""

    iteration: int
    loss: float
    steps: int
    skipped: int  # steps whose gradients were not finite: not applied
    empty: int  # micro-batches without one labelled pixel (their loss is 0)
    bad_inputs: int  # micro-batches with non-finite pixels
    reason: str = ""

    @property
    def bad(self) -> bool:
        return bool(self.reason)

    def evidence(self) -> str:
        """The window's counts that point at a cause, for the progress line."""
        found = [
            f"{self.skipped} of {self.steps} steps non-finite" if self.skipped else "",
            f"{self.empty} batches with no labelled pixel" if self.empty else "",
            f"{self.bad_inputs} batches with non-finite pixels" if self.bad_inputs else "",
        ]
        return "; ".join(f for f in found if f) or "no non-finite step or input"


@dataclass(frozen=True)
class RecoveryEvent:
    """A recovery, for the progress line and MLflow."""

    count: int  # recoveries so far, this one included
    verdict: Verdict
    back_to: int  # the iteration of the state restored
    lr: float  # the base lr after the cut


class _State:
    """Copies of the tensors that decide the next step: weights, buffers, momentum."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        self.iteration = iteration
        self.model = [t.detach().clone() for t in _model_tensors(model)]
        self.momentum: dict[int, torch.Tensor] = {
            i: buf.detach().clone() for i, buf in _momentum(optimizer).items()
        }

    def refill(self, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Copy the live state into these buffers (no allocation once the momentum exists)."""
        self.iteration = iteration
        torch._foreach_copy_(self.model, [t.detach() for t in _model_tensors(model)])
        live = _momentum(optimizer)
        if live.keys() == self.momentum.keys():
            keys = list(live)
            torch._foreach_copy_([self.momentum[i] for i in keys], [live[i] for i in keys])
        else:  # the first steps create the momentum buffers
            self.momentum = {i: buf.detach().clone() for i, buf in live.items()}

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            torch._foreach_copy_(list(_model_tensors(model)), self.model)
        params = _params(optimizer)
        for i, p in enumerate(params):
            state = optimizer.state.get(p)
            if i in self.momentum:
                optimizer.state[p]["momentum_buffer"].copy_(self.momentum[i])
            elif state:  # no momentum yet at the snapshot: the step after starts it afresh
                state.pop("momentum_buffer", None)


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers (BatchNorm's running statistics and counts), in a fixed order."""
    return list(model.state_dict(keep_vars=True).values())


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _momentum(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """SGD's momentum buffers by the parameter's position (they appear at the first step)."""
    found = {}
    for i, p in enumerate(_params(optimizer)):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if isinstance(buf, torch.Tensor):
            found[i] = buf
    return found


class Recovery:
    """Judges each log window of one rank's training and recovers from the bad ones.

    Args:
        model: the plain module (not DDP-wrapped or compiled: the same tensors).
        optimizer: its optimizer (SGD: the momentum buffers are restored).
        spike_factor: a window whose loss is above this times the running mean is bad; 0 = off.
        lr_factor: every learning rate is multiplied by this at a recovery.
        max_recoveries: recoveries before the run stops with ``TrainingDiverged``; 0 = none.
        recoveries, loss_mean: where a resumed run stood (from its checkpoint).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        spike_factor: float = 0.0,
        lr_factor: float = 0.5,
        max_recoveries: int = 0,
        recoveries: int = 0,
        loss_mean: float | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.spike_factor, self.lr_factor = spike_factor, lr_factor
        self.max_recoveries = max_recoveries
        self.recoveries, self.loss_mean = recoveries, loss_mean
        self.on_recover: Callable[[RecoveryEvent], None] | None = None
        self._verified: _State | None = None
        self._candidate: _State | None = None

    def judge(self, verdict: Verdict) -> Verdict:
        """The window's verdict with the spike rule applied (the same on every rank: the loss and
        the running mean are all-reduced values)."""
        if verdict.bad or not self.spike_factor or self.loss_mean is None:
            return verdict
        if verdict.loss > self.spike_factor * self.loss_mean:
            ratio = verdict.loss / self.loss_mean
            reason = (
                f"loss {verdict.loss:.4g} is {ratio:.1f}x its running mean {self.loss_mean:.4g}"
            )
            return Verdict(**{**verdict.__dict__, "reason": reason})
        return verdict

    def good(self, verdict: Verdict, iteration: int) -> None:
        """A good window ended at ``iteration``: its loss joins the running mean; the candidate
        it started from is verified; the state now is the next candidate."""
        if verdict.steps > verdict.skipped:
            mean = self.loss_mean
            self.loss_mean = verdict.loss if mean is None else EMA * mean + (1 - EMA) * verdict.loss
        if not self.max_recoveries:
            return  # nothing to go back to: no snapshots kept
        if self._verified is None:  # a run that started outside ``trust``: the state now
            self._verified = _State(self.model, self.optimizer, iteration)
            return
        if self._candidate is None:
            self._candidate = _State(self.model, self.optimizer, iteration)
            return
        spare, self._verified = self._verified, self._candidate
        spare.refill(self.model, self.optimizer, iteration)
        self._candidate = spare

    def trust(self, iteration: int) -> None:
        """The state now is verified (a run's start, a resume, a checkpoint boundary)."""
        if not self.max_recoveries:
            return
        if self._verified is None:
            self._verified = _State(self.model, self.optimizer, iteration)
        else:
            self._verified.refill(self.model, self.optimizer, iteration)
        self._candidate = None

    def recover(self, verdict: Verdict) -> RecoveryEvent:
        """Back to the verified state with every lr cut; ``TrainingDiverged`` when no recovery is
        left (or none is allowed)."""
        from pipeline.errors import TrainingDiverged

        if self.recoveries >= self.max_recoveries or self._verified is None:
            raise TrainingDiverged(verdict.iteration, verdict.loss)
        self.recoveries += 1
        self._verified.restore(self.model, self.optimizer)
        self._candidate = None
        for group in self.optimizer.param_groups:
            group["lr"] *= self.lr_factor  # the chainable schedule goes on from the cut lr
        event = RecoveryEvent(
            count=self.recoveries,
            verdict=verdict,
            back_to=self._verified.iteration,
            lr=float(self.optimizer.param_groups[0]["lr"]),
        )
        if self.on_recover is not None:
            self.on_recover(event)
        return event
