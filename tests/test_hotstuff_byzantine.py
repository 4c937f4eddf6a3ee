"""f Byzantine validators in 200 seeded randomized schedules: safety always, liveness after GST.

Each schedule draws f faulty validators (silent, equivocating leader, double voter, fork voter,
all of these at once, or twins: two replicas sharing one key), a chaotic network until a random
GST (random delays that reorder, drops, duplicates, partitions), then a calm one. The run stops
once every honest replica has finalized a block mined after GST; the bound is 20 s of virtual
time after GST (the worst seen is far below). Safety is checked over the whole run.
"""

from __future__ import annotations

import pytest

from prismesh.chain.finality.committee import SimConfig, check_safety, random_schedule, simulate

LIVENESS_BOUND = 20.0
SCHEDULES = [(seed, 4) for seed in range(170)] + [(1000 + seed, 7) for seed in range(30)]


@pytest.mark.parametrize(("seed", "n"), SCHEDULES)
def test_random_byzantine_schedule(seed: int, n: int) -> None:
    cfg = random_schedule(seed, n=n, after_gst=LIVENESS_BOUND)
    assert len(cfg.faults) == (n - 1) // 3
    result = simulate(cfg)
    check_safety(result)
    for ep in result.honest:
        post_gst = [
            b
            for b in result.replicas[ep].committed_log
            if result.ledger.created_at[b.payload.block_hash] > cfg.gst
        ]
        assert post_gst, f"honest endpoint {ep} finalized nothing mined after GST ({cfg.faults})"
    assert result.end_time - cfg.gst <= LIVENESS_BOUND


def test_all_fault_kinds_are_drawn() -> None:
    kinds = {k for seed, n in SCHEDULES for k in random_schedule(seed, n=n).faults.values()}
    assert kinds == {"silent", "equivocate", "double_vote", "fork_vote", "byzantine", "twins"}


@pytest.mark.parametrize("seed", range(5))
def test_twins_split_by_a_partition_cannot_break_safety(seed: int) -> None:
    # Endpoints 0 and 1 are the twins of validator 0; endpoints 2, 3, 4 are validators 1, 2, 3.
    # Each twin talks to its own side, so the sides may see conflicting proposals and votes
    # signed with key 0.
    from prismesh.chain.finality.transport import Partition

    part = Partition(0.0, 6.0, (frozenset({0, 2, 3}), frozenset({1, 4})))
    cfg = SimConfig(
        n=4,
        seed=seed,
        faults={0: "twins"},
        duration=30.0,
        gst=6.0,
        partitions=(part,),
        stop_when_final_after=6.0,
    )
    result = simulate(cfg)
    check_safety(result)
    assert [ep.validator for ep in result.endpoints] == [0, 0, 1, 2, 3]
    assert all(result.final_height(ep) > 0 for ep in result.honest)
