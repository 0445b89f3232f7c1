"""When an epoch's losses say the run diverged (pipeline.metrics.divergence)."""

from __future__ import annotations

import json
import math

from pipeline.metrics import GROWTH_LIMIT, diverged, divergence


def _record(epoch: int, **loss: float) -> dict:
    return {"epoch": epoch, "loss": loss}


FIRST = _record(1, ce=2.82, tckd=7.26, nckd=4.81, total=25.70)


def test_a_non_finite_term_is_divergence_whatever_the_scale() -> None:
    assert divergence(_record(1, ce=math.nan, kd=0.5, total=math.nan), FIRST) == (
        "became non-finite",
        "ce nan, total nan",
    )
    assert divergence(_record(2, ce=math.inf, total=math.inf), FIRST)[0] == "became non-finite"


def test_a_finite_loss_grown_over_the_limit_is_divergence() -> None:
    """DKD on an MLP at LR 0.05 (10,000 Fashion-MNIST images): total 25.7 in epoch 1,
    7,746,260 in epoch 2, 1e20 later, every value finite, the student at chance."""
    grown = _record(2, ce=305514.5, tckd=605862.2, nckd=854360.4, total=7746260.2)
    assert divergence(grown, FIRST) == (
        "grew over 1,000-fold",
        "total 25.7 in epoch 1, 7.746e+06 now",
    )
    assert divergence(_record(5, total=25.70 * GROWTH_LIMIT * 1.01), FIRST) is not None


def test_healthy_changes_of_scale_are_not() -> None:
    """A warm-up or curriculum raising a loss weight, a learning-rate step, noise."""
    for total in (0.0, 0.3, 25.70, 25.70 * 20, 25.70 * GROWTH_LIMIT):
        assert divergence(_record(7, total=total), FIRST) is None
    assert divergence(FIRST, FIRST) is None
    zero = _record(1, total=0.0)  # nothing to measure growth against
    assert divergence(_record(2, total=1e9), zero) is None


def test_a_record_read_back_from_metrics_jsonl() -> None:
    """distill marks the epoch; older files are read by their values."""
    marked = {**_record(2, total=7746260.2), "diverged": ["grew over 1,000-fold", "..."]}
    assert diverged(json.loads(json.dumps(marked)))
    assert diverged(json.loads(json.dumps(_record(3, total=math.nan))))  # NaN round-trips
    assert not diverged(json.loads(json.dumps(_record(3, total=1e9))))  # unmarked and finite


def test_the_report_finds_the_first_diverged_epoch_of_a_history() -> None:
    """Also in a history whose run trained on through it (before the growth check)."""
    from pipeline.metrics import first_diverged_epoch

    healthy = [FIRST, _record(2, total=12.0), _record(3, total=9.5)]
    assert first_diverged_epoch(healthy) is None
    trained_on = [
        FIRST,
        _record(2, total=7746260.2),
        _record(3, total=6.9e7),
        _record(4, total=1e20),
    ]
    assert first_diverged_epoch(trained_on) == 2
    assert first_diverged_epoch([FIRST, _record(2, total=math.nan)]) == 2
    assert first_diverged_epoch([]) is None


def test_a_blow_up_within_the_first_epoch_is_divergence() -> None:
    """No earlier epoch to measure growth against: a term past TERM_LIMIT is enough."""
    from pipeline.metrics import TERM_LIMIT

    blown = _record(1, ce=305514.5, tckd=2.0, total=3.1e6)
    assert divergence(blown, blown) == ("exceeded 1e+05", "ce 3.055e+05")
    assert divergence(_record(1, ce=TERM_LIMIT * 0.99, total=40.0), FIRST) is None


def test_the_report_leaves_a_finished_but_diverged_run_out_of_the_table() -> None:
    """A run from before the growth check trained on to the end at chance: it is listed as
    diverged, not averaged in with the others."""
    from pipeline.report import RunResult, aggregate

    def run(seed: int, final: float, diverged_epoch: int | None) -> RunResult:
        return RunResult(
            name=f"mlp-dkd-s{seed}", label="mlp-dkd", student="mlp", method="dkd",
            method_options={}, seed=seed, teacher=None, teacher_test_acc=None, finished=True,
            epochs=8, target_epochs=8, curve=[final], best_acc=final, final_acc=final,
            wall_s=1.0, rows_per_s=1.0, diverged_epoch=diverged_epoch, group="g",
        )  # fmt: skip

    (group,) = aggregate([run(0, 83.0, None), run(1, 10.0, 2)])
    assert group.seeds == [0] and group.final_acc.mean == 83.0
    assert aggregate([run(1, 10.0, 2)]) == []
