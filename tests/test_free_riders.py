"""Free riders on the in-process federation: real training from the offline stand-in base model
(built once and cached), the real daemons, the embedded chain and the audit. One free rider of
each kind joins three honest hospitals; in every round each earns at most 10% of the median
honest reward, and the audit recomputes every score and reward from the chain and the store.

The same run, with its table of shares, is ``python -m tests.benchmarks.bench_free_riders``.
"""

from __future__ import annotations

import statistics

import pytest

from tests.benchmarks.bench_free_riders import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_free_riders_earn_at_most_a_tenth_of_the_honest_median(tmp_path) -> None:
    out = run(tmp_path, rounds=2, scale=0.05)
    assert out["status"] == "COMPLETED"
    assert out["audit_ok"], out["audit"].render()
    rows = out["rows"]
    assert {r["kind"] for r in rows} == {"honest", "copy-global", "copy-peer", "perturb", "noise"}
    for rnd in (1, 2):
        here = [r for r in rows if r["round"] == rnd]
        honest = [r["reward"] for r in here if r["kind"] == "honest"]
        median = statistics.median(honest)
        assert median > 0, here
        for r in here:
            if r["kind"] != "honest":
                assert r["reward"] <= 0.1 * median, r
    checks = {f.check for f in out["audit"].findings}
    assert {"scores recomputed", "rewards recomputed", "within budget"} <= checks
