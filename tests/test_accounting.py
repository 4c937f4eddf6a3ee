"""The demo report's timing rows: parts never overlap, rows add up to the federated wall time."""

from __future__ import annotations

import pytest

from prismesh.runs.accounting import (
    OVERHEAD_PARTS,
    Ledger,
    evaluation_with_its_round,
    make_row,
    rounded,
    with_training,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_nested_parts_count_once_and_rows_add_up() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    with ledger.part("chain"):
        clock.tick(2.0)  # deploying
    clock.tick(1.0)  # unaccounted start-up work
    startup = ledger.cut("start-up", training=0.0)
    with ledger.part("training"):
        clock.tick(5.0)
        with ledger.part("storage"):
            clock.tick(0.5)  # pinning the update, inside the node's round work
    with ledger.part("finality"):
        clock.tick(0.7)
        with ledger.part("chain"):
            clock.tick(0.3)  # the committee's own transactions count as finality
    with ledger.part("aggregation"):
        clock.tick(1.0)
        with ledger.part("chain"):
            clock.tick(0.2)
    with ledger.part("evaluation"):
        clock.tick(2.0)
    round1 = with_training(ledger.cut("round 1"), 4.0)  # the trainer measured 4 of the 5 s
    clock.tick(0.25)
    tail = ledger.cut("tail", training=0.0)

    assert startup["wall_seconds"] == 3.0 and startup["overhead"]["chain"] == 2.0
    assert startup["overhead"]["other"] == pytest.approx(1.0)
    assert round1["wall_seconds"] == pytest.approx(9.7)
    assert round1["training_seconds"] == 4.0
    split = round1["overhead"]
    assert split["storage"] == pytest.approx(0.5)
    assert split["finality"] == pytest.approx(1.0) and split["chain"] == pytest.approx(0.2)
    assert split["aggregation"] == pytest.approx(1.0) and split["evaluation"] == pytest.approx(2.0)
    assert split["other"] == pytest.approx(1.0)  # the second of training the trainer did not count
    assert tail["wall_seconds"] == pytest.approx(0.25)
    rows = [startup, round1, tail]
    for row in rows:
        assert set(row["overhead"]) == {*OVERHEAD_PARTS, "other"}
        assert row["training_seconds"] + sum(row["overhead"].values()) == pytest.approx(row["wall_seconds"])
        assert row["overhead_seconds"] == pytest.approx(row["wall_seconds"] - row["training_seconds"])
    assert sum(r["wall_seconds"] for r in rows) == pytest.approx(clock.now - 100.0)
    assert "parts" not in rounded(round1) and rounded(round1)["wall_seconds"] == 9.7


def test_unknown_part_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown part 'network'"):
        with Ledger().part("network"):
            pass


def test_each_evaluation_moves_to_the_round_whose_aggregate_it_scored() -> None:
    """Round 1's row closes at its aggregate; its evaluation happens in round 2's row, the last
    round's in the tail. Moved back, rows still add up and only evaluation seconds move."""
    def row(label: str, wall: float, evaluation: float, chain: float) -> dict:
        return make_row(label, wall, {"training": 4.0, "evaluation": evaluation, "chain": chain}, 4.0)

    rows = [row("round 1", 5.0, 0.0, 0.5), row("round 2", 7.5, 2.0, 0.5), row("round 3", 7.0, 1.5, 0.4),
            make_row("tail", 1.75, {"evaluation": 1.25, "chain": 0.1}, 0.0)]
    moved = evaluation_with_its_round(rows)

    assert [r["overhead"]["evaluation"] for r in moved] == [2.0, 1.5, 1.25, 0.0]
    assert [r["wall_seconds"] for r in moved] == pytest.approx([7.0, 7.0, 6.75, 0.5])
    assert sum(r["wall_seconds"] for r in moved) == pytest.approx(sum(r["wall_seconds"] for r in rows))
    for before, after in zip(rows, moved, strict=True):
        assert after["training_seconds"] == before["training_seconds"]
        assert after["overhead"]["chain"] == before["overhead"]["chain"]
        assert after["overhead"]["other"] == before["overhead"]["other"]
        assert after["training_seconds"] + sum(after["overhead"].values()) == pytest.approx(after["wall_seconds"])
        assert after["overhead_seconds"] == pytest.approx(after["wall_seconds"] - after["training_seconds"])


def test_the_steady_ratio_swaps_only_the_shared_evaluation() -> None:
    """The benchmark's steady figure keeps each side's own parts and other work and puts the
    plain loop's evaluation time on both sides, so a slow evaluation on one side moves only the
    raw ratio."""
    from tests.benchmarks.bench_round_overhead import _figures, overheads, steady_ratio

    def rows(evaluation: float, own: float, other: float) -> list[dict]:
        def one(label: str) -> dict:
            parts = {"training": 4.0, "evaluation": evaluation, "chain": own / 2, "finality": own / 2}
            return make_row(label, 4.0 + evaluation + own + other, parts, 4.0)
        return [one("round 1"), one("round 2"), one("round 3")]

    def side(evaluation: float, own: float, other: float) -> dict:
        return {"rows": rows(evaluation, own, other), "startup_seconds": 1.0, "peak_pss_mib": 1.0}

    plain = _figures(side(5.0, 0.0, 0.5), 3)
    fed = _figures(side(6.0, 0.4, 0.6), 3)  # its evaluation happened to run 1 s slower
    assert fed["own"] == pytest.approx(0.4) and fed["other"] == pytest.approx(0.6)
    assert fed["evaluation"] == pytest.approx(6.0) and plain["own"] == 0.0
    assert overheads(side(6.0, 0.4, 0.6)["rows"], 3)[1] / plain["later"] == pytest.approx(7.0 / 5.5)
    assert steady_ratio(fed, plain) == pytest.approx(6.0 / 5.5)  # 5 + 0.4 + 0.6 against 5 + 0.5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_report_rows_add_up_to_the_federated_wall_time(tmp_path) -> None:
    """A real (small) demo: start-up, every round and the tail add up to the run's wall time,
    each row's training and overhead parts to the row; progress and report read each event
    once."""
    from prismesh.runs.demo import run_demo

    report = run_demo(tmp_path / "demo", scale=0.15, rounds=2, baselines=False, plots=False, chain="embedded")
    timing = report["timing"]
    rows = timing["rows"]
    assert [r["row"] for r in rows] == ["start-up", "round 1", "round 2", "tail"]
    total = timing["startup_seconds"] + timing["federated_seconds"]
    assert sum(r["wall_seconds"] for r in rows) == pytest.approx(total, abs=0.05)
    for row in rows:
        parts = row["training_seconds"] + sum(row["overhead"].values())
        assert parts == pytest.approx(row["wall_seconds"], abs=0.01), row
        assert all(v >= 0 for k, v in row["overhead"].items() if k != "other"), row
    for rnd, row in zip(report["rounds"], rows[1:3], strict=True):
        assert row["training_seconds"] == pytest.approx(rnd["training_seconds_total"], abs=0.01)
        assert row["training_seconds"] > 0 and row["overhead"]["aggregation"] > 0
    assert rows[2]["overhead"]["evaluation"] > 0 and rows[3]["overhead"]["evaluation"] > 0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(len(r["accuracy"]) == 3 for r in report["rounds"])
    assert report["audit"]["ok"]
