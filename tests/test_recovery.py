"""Training that does not die (pipeline/training/recovery.py): non-finite steps are skipped on
the device, a bad log window goes back to the last good state with a lower lr, a batch without a
labelled pixel is a loss of 0, and a resumed run that recovered equals one that never stopped."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from danet import DANetConfig, build_danet
from danet.losses import segmentation_loss
from pipeline.errors import TrainingDiverged
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training.loop import build_optimizer, poly_schedule, train_steps
from pipeline.training.records import History, StepRecord
from pipeline.training.recovery import Recovery, RecoveryEvent, Verdict
from pipeline.training.tracker import Tracker

CPU = torch.device("cpu")


def _model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build_danet(DANetConfig(num_classes=5, backbone="resnet18d", pretrained=False))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2, 32, 32), generator=g))
        for _ in range(n)
    ]


def _finite(model: torch.nn.Module) -> bool:
    return all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    )


def _scaled_loss(at: Callable[[int], float], counter: list[int]) -> Callable[..., Any]:
    """The DANet loss times ``at(step)`` (1-based step numbers): NaN poisons, a large number
    is a spike that is not a NaN."""

    def loss_fn(logits: Any, labels: torch.Tensor) -> Any:
        counter.append(len(counter) + 1)
        loss, parts = segmentation_loss(logits, labels)
        return loss * at(counter[-1]), parts

    return loss_fn


def test_a_non_finite_step_is_skipped_not_applied() -> None:
    """Step 2's loss is NaN (its inputs are fine): its update is skipped on the device --
    parameters and momentum equal a run that stopped after step 1 -- and it is counted."""
    batches = _batches(2)
    runs = []
    for steps, poison in ((1, {}), (2, {2: math.nan})):
        model = _model()
        optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
        scheduler = poly_schedule(optimizer, 100, 0.9)
        records: list[StepRecord] = []
        loss_fn = _scaled_loss(lambda i, p=poison: p.get(i, 1.0), [])  # type: ignore[misc]
        train_steps(
            model, batches[:steps], optimizer, scheduler, loss_fn, CPU,
            log_every=2, on_log=records.append,
        )  # fmt: skip
        runs.append((model, optimizer, records))
    (one, opt_one, _), (two, opt_two, records) = runs
    assert records[0].skipped_steps == 1 and math.isfinite(records[0].loss)
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_one.state[p]["momentum_buffer"], opt_two.state[q]["momentum_buffer"])


def test_a_batch_with_nan_pixels_recovers_and_the_run_finishes() -> None:
    """NaN pixels in batch 5 of 12: the step is skipped, but its forward pass made BatchNorm's
    running statistics NaN. The window (steps 4-6) is judged bad for it, the run goes back to
    the last verified state (the start) and finishes finite; the recovery names the skipped
    step and the bad input."""
    model = _model()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 100, 0.9)
    batches = _batches(12)
    batches[4] = (torch.full_like(batches[4][0], math.nan), batches[4][1])
    records: list[StepRecord] = []
    events: list[RecoveryEvent] = []
    recovery = Recovery(model, optimizer, spike_factor=5.0, max_recoveries=2)
    recovery.on_recover = events.append
    recovery.trust(0)
    train_steps(
        model, batches, optimizer, scheduler, segmentation_loss, CPU,
        log_every=3, on_log=records.append, recovery=recovery,
    )  # fmt: skip
    assert [(e.verdict.iteration, e.back_to, e.verdict.reason) for e in events] == [
        (6, 0, "non-finite weights")
    ]
    assert (
        "1 of 3 steps non-finite; 1 batches with non-finite pixels" in events[0].verdict.evidence()
    )
    assert [r.iteration for r in records] == [3, 9, 12] and _finite(model)
    assert scheduler.last_epoch == 12


def test_an_all_ignore_batch_is_a_loss_of_zero_not_nan() -> None:
    """The issue's CPU case: batch 1, fp32, every other label all ignore (255). The mean over
    zero labelled pixels is 0 (torch's mean would be NaN and blame the lr): no step is skipped,
    no recovery, the weights stay finite and the empty batches are counted."""
    model = _model()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 100, 0.9)
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(8):
        labels = torch.randint(0, 5, (1, 32, 32), generator=g)
        batches.append(
            (torch.rand(1, 3, 32, 32, generator=g), labels if i % 2 else labels * 0 + 255)
        )
    loss, _ = segmentation_loss(model(batches[0][0]), batches[0][1])
    assert loss.item() == 0.0
    records: list[StepRecord] = []
    train_steps(
        model, batches, optimizer, scheduler, segmentation_loss, CPU,
        log_every=4, on_log=records.append,
    )  # fmt: skip
    assert [r.empty_batches for r in records] == [2, 2]
    assert [r.skipped_steps for r in records] == [0, 0]
    assert all(math.isfinite(r.loss) for r in records) and _finite(model)


def test_exploding_steps_recover_to_the_last_good_state_with_a_lower_lr() -> None:
    """Steps 7-9 (the third window) have their loss, and so their gradients, multiplied by 30:
    the window's loss is far above its running mean (a spike, not a NaN). The run goes back to
    the state before the second window (the last verified one), halves every lr, logs the
    recovery and finishes with finite weights."""
    model = _model()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 100, 0.9)
    counter: list[int] = []
    loss_fn = _scaled_loss(lambda i: 30.0 if 7 <= i <= 9 else 1.0, counter)
    recovery = Recovery(model, optimizer, spike_factor=5.0, lr_factor=0.5, max_recoveries=2)
    recovery.trust(0)
    events: list[RecoveryEvent] = []
    recovery.on_recover = events.append
    records: list[StepRecord] = []
    train_steps(
        model, _batches(15), optimizer, scheduler, loss_fn, CPU,
        log_every=3, on_log=records.append, recovery=recovery,
    )  # fmt: skip
    assert len(events) == 1 and events[0].verdict.iteration == 9
    assert "running mean" in events[0].verdict.reason and events[0].back_to == 3
    assert [r.iteration for r in records] == [3, 6, 12, 15]  # the bad window is not logged
    poly = (1 - 15 / 100) ** 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * poly * 0.5)
    assert _finite(model) and recovery.recoveries == 1


def test_without_recoveries_left_the_run_stops_with_the_one_line_error() -> None:
    """The same spike with ``max_recoveries`` 0: ``TrainingDiverged`` at the bad window, as
    before recovery existed; with 1 recovery and two bad stretches, at the second."""
    for allowed, stops_at in ((0, 9), (1, 15)):
        model = _model()
        optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
        scheduler = poly_schedule(optimizer, 100, 0.9)
        counter: list[int] = []
        loss_fn = _scaled_loss(lambda i: 30.0 if i in (7, 8, 9, 13, 14, 15) else 1.0, counter)
        recovery = Recovery(model, optimizer, spike_factor=5.0, max_recoveries=allowed)
        recovery.trust(0)
        with pytest.raises(TrainingDiverged) as raised:
            train_steps(
                model, _batches(18), optimizer, scheduler, loss_fn, CPU,
                log_every=3, recovery=recovery,
            )  # fmt: skip
        assert raised.value.iteration == stops_at
        assert "training diverged" in str(raised.value) and "\n" not in str(raised.value)


def test_a_restored_state_is_exactly_the_snapshot() -> None:
    """Weights, BatchNorm statistics and momentum come back bit for bit; the candidate state
    (the end of the window before the bad one) is not restored into."""
    model = _model()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4, 10.0)
    scheduler = poly_schedule(optimizer, 100, 0.9)
    recovery = Recovery(model, optimizer, spike_factor=0, max_recoveries=1)
    batches = _batches(4)
    train_steps(model, batches[:1], optimizer, scheduler, segmentation_loss, CPU)
    recovery.trust(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    good = Verdict(2, 1.0, 1, 0, 0, 0)
    train_steps(model, batches[1:2], optimizer, scheduler, segmentation_loss, CPU)
    recovery.good(good, 2)  # the state at 2 is a candidate, not verified
    train_steps(model, batches[2:3], optimizer, scheduler, segmentation_loss, CPU)
    event = recovery.recover(Verdict(3, math.nan, 1, 1, 0, 0, "non-finite loss"))
    assert event.back_to == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    for p, m in zip(model.parameters(), momentum, strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)


class Stop(Exception):
    pass


def _session(
    shards: Path, out: Path, start: Path | None = None, stop_at: int = 0, **recipe: Any
) -> tuple[Any, list[Path], list[RecoveryEvent]]:
    """A tiny job's session (2 epochs of 4 iterations, a log window every 2) whose loss is
    NaN at steps 1-2 and 30 times at steps 7-8; a checkpoint at each epoch's end."""
    from pipeline.training.job import prepare_job
    from pipeline.training.session import open_session, restore, snapshot, train_epochs
    from tests.conftest import tiny_params

    train = {"iters_per_epoch": 4, "log_every": 2, "max_recoveries": 3, **recipe}
    model, data, params, _ = tiny_params(out, shards, train=train)
    run = open_session(prepare_job(model, data, params), device=CPU)
    if start is not None:
        restore(run, *load_checkpoint(start, CPU))
    poison = {1: math.nan, 2: math.nan, 7: 30.0, 8: 30.0}
    loss_fn = run.loss_fn

    def poisoned(logits: Any, labels: torch.Tensor) -> Any:
        loss, parts = loss_fn(logits, labels)
        return loss * poison.get(run.iteration + 1, 1.0), parts

    run.loss_fn = poisoned
    events: list[RecoveryEvent] = []
    tracker: Any = SimpleNamespace(
        step=lambda record: None,
        recovery=events.append,
        evaluation=lambda record: None,
        overlays=lambda *a: None,
        attention=lambda *a: None,
    )
    written: list[Path] = []

    def report(session: Any, metrics: dict[str, float]) -> None:
        folder = out / f"checkpoint_{session.iteration:03d}"
        folder.mkdir(parents=True)
        save_checkpoint(folder, snapshot(session), session.history, 8)
        written.append(folder)
        if len(written) == stop_at:
            raise Stop

    with contextlib.suppress(Stop):
        train_epochs(run, tracker, report)
    return run, written, events


def test_a_run_that_recovered_resumes_exactly(tiny_shards: Path, tmp_path: Path) -> None:
    """A NaN window before the first checkpoint and a spike after it: straight through, the
    session recovers twice and finishes; stopped at the checkpoint and resumed from the file
    (its recoveries, cut lr and running mean inside), it recovers from the spike the same way
    and ends with the same weights, bit for bit."""
    straight, _, events = _session(tiny_shards, tmp_path / "straight")
    assert [(e.verdict.iteration, e.back_to) for e in events] == [(2, 0), (8, 4)]
    assert "non-finite" in events[0].verdict.reason and "running mean" in events[1].verdict.reason
    assert straight.iteration == 8 and _finite(straight.core)
    _, written, _ = _session(tiny_shards, tmp_path / "stopped", stop_at=1)
    state, _ = load_checkpoint(written[0])
    assert state.recoveries == 1 and state.loss_mean is not None
    resumed, _, later = _session(tiny_shards, tmp_path / "resumed", start=written[0])
    assert [(e.verdict.iteration, e.count) for e in later] == [(8, 2)]
    for key, value in straight.core.state_dict().items():
        assert torch.equal(value, resumed.core.state_dict()[key]), key
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


def test_recovery_off_stops_the_session_as_before(tiny_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged) as raised:
        _session(tiny_shards, tmp_path, max_recoveries=0)
    assert raised.value.iteration == 2


def test_a_recovery_is_a_progress_line_and_an_mlflow_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[tuple[str, float, int]] = []
    client = SimpleNamespace(
        log_batch=lambda run_id, metrics: sent.extend((m.key, m.value, m.step) for m in metrics)
    )
    job: Any = SimpleNamespace(
        tracking_uri="",
        mlflow_run_id="run-1",
        train=SimpleNamespace(max_iters=100, max_recoveries=3, recover_lr_factor=0.5),
    )
    tracker = Tracker(job, History())
    tracker.client = client
    verdict = Verdict(40, math.nan, 10, 10, 0, 2, "every step's gradients non-finite")
    with caplog.at_level(logging.WARNING):
        tracker.recovery(RecoveryEvent(1, verdict, 30, 0.004))
    line = caplog.records[-1].getMessage()
    assert "recovery 1/3 at iter 40" in line and "back to iter 30" in line
    assert "2 batches with non-finite pixels" in line and "lr x0.5" in line
    assert ("recoveries", 1.0, 40) in sent and ("recovery/lr", 0.004, 40) in sent


def _rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: DDP over a tiny DANet; only rank 1 sees NaN pixels (step 5: the
    all-reduced gradient is NaN on both, both skip it; DDP's buffer broadcast from rank 0 heals
    rank 1's BatchNorm statistics at the next forward) and a spike (steps 10-12: both recover)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        core = _model()
        model = DistributedDataParallel(core)
        optimizer = build_optimizer(core, 0.01, 0.9, 1e-4, 10.0)
        scheduler = poly_schedule(optimizer, 100, 0.9)
        batches = _batches(15, seed=10 + rank)
        if rank == 1:
            batches[4] = (torch.full_like(batches[4][0], math.nan), batches[4][1])
        factor = {10: 30.0, 11: 30.0, 12: 30.0} if rank == 1 else {}
        loss_fn = _scaled_loss(lambda i: factor.get(i, 1.0), [])
        recovery = Recovery(core, optimizer, spike_factor=5.0, max_recoveries=3)
        events: list[RecoveryEvent] = []
        recovery.on_recover = events.append
        recovery.trust(0)
        train_steps(
            model, batches, optimizer, scheduler, loss_fn, CPU,
            log_every=3, recovery=recovery, world_size=2,
        )  # fmt: skip
        torch.save(
            {
                "events": [(e.verdict.iteration, e.back_to) for e in events],
                "weights": dict(core.named_parameters()),  # BN statistics are per rank
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_recovers_at_the_same_window(tmp_path: Path) -> None:
    """Two gloo ranks, the bad batches on one of them: both judge each window from the one
    all-reduce, skip the same step, recover at the same window and stay identical."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert zero["events"] == one["events"] == [(12, 6)]
    for key, value in zero["weights"].items():
        assert torch.equal(value, one["weights"][key]), key
