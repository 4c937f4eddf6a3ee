"""Free riders' rewards beside honest clients', measured on the in-process federation.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_free_riders [--rounds 3] [--scale 0.05]

Honest hospitals train on the synthetic non-IID benchmark from the offline stand-in base model
(built once, about 80 s, then cached under $PRISMESH_HOME); one free rider of each kind
(``prismesh.runs.federation.FREE_RIDER_KINDS``) joins the same task and claims the task's
sample cap. Every round is committed, revealed, verified, aggregated and paid on the embedded
chain by the real daemons; the rewards are read back from the chain's RewardEarned events and
the audit recomputes every score and reward. Prints, per round and per participant, the score
and the reward as a share of the median honest reward.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run(root: Path, *, rounds: int, scale: float, seed: int = 0) -> dict[str, Any]:
    from prismesh.aggregator.audit import audit_task
    from prismesh.chain.taskspec import LoraSpec, TaskSpec, model_fingerprint
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG, make_benchmark
    from prismesh.node.trainer import TrainConfig, create_initial_adapter
    from prismesh.runs.federation import (
        FREE_RIDER_KINDS,
        Federation,
        TaskSettings,
        model_config_of,
        reward_shares,
    )

    base = ensure_base_model()
    clients = make_benchmark(root / "data", seed=seed, scale=scale)
    fed = Federation(root / "fed", finality=False, parallel=False)
    try:
        for c in clients:
            fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
        for kind in FREE_RIDER_KINDS:
            fed.add_hospital(f"free-rider-{kind}", clients[0].train_path, clients[0].test_path, base,
                             device="cpu", free_rider=kind)
        fed.add_aggregator()
        fed.approve_all()
        train = {k: v for k, v in BENCHMARK_TRAIN_CONFIG.items() if k not in ("rank", "alpha")}
        spec = TaskSpec(
            base_model_id="prismesh/tiny-qwen3",
            base_model_sha256=model_fingerprint(base),
            lora=LoraSpec(r=BENCHMARK_TRAIN_CONFIG["rank"], lora_alpha=BENCHMARK_TRAIN_CONFIG["alpha"]),
            model_config=model_config_of(base),
            train={**train, "seed": seed},
            strategy="fedavg",
            norm_bound=1e4,
            report_metrics=False,
        )
        initial = create_initial_adapter(base, root / "initial", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
        # Governance caps claims at the largest honest dataset; every free rider claims the cap.
        cap = max(len(load_jsonl(c.train_path)) for c in clients)
        task = fed.create_task(spec, TaskSettings(num_rounds=rounds, min_participants=2, sample_cap=cap),
                               initial_adapter=initial)
        t0 = time.perf_counter()
        state = fed.run_task(task)
        seconds = time.perf_counter() - t0
        rows = reward_shares(fed, task)
        report = audit_task(fed.w3, fed.manifest, fed.store, task, check_finality=False)
        return {"status": state.status.name, "rows": rows, "audit_ok": report.ok, "audit": report,
                "seconds": seconds, "honest": len(clients)}
    finally:
        fed.close()


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The largest reward share each kind reached in any round (honest: the smallest)."""
    out: dict[str, float] = {}
    for row in rows:
        kind, share = row["kind"], row["share_of_honest_median"]
        if kind == "honest":
            out[kind] = min(out.get(kind, share), share)
        else:
            out[kind] = max(out.get(kind, 0.0), share)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prismesh-free-riders-") as tmp:
        out = run(Path(tmp), rounds=args.rounds, scale=args.scale, seed=args.seed)
    print(f"task {out['status']} in {out['seconds']:.0f} s with {out['honest']} honest hospitals and "
          f"one free rider of each kind; audit {'PASS' if out['audit_ok'] else 'FAIL'}")
    print("| Round | Participant | Kind | Score | Reward / median honest reward |")
    print("| ---: | --- | --- | ---: | ---: |")
    for r in out["rows"]:
        print(f"| {r['round']} | {r['name']} | {r['kind']} | {r['score'] / 1e6:.4f} | {r['share_of_honest_median']:.1%} |")
    worst = summary(out["rows"])
    print()
    print("worst case per kind (free riders: highest share in any round; honest: lowest):")
    for kind, share in sorted(worst.items()):
        print(f"  {kind:12s} {share:.1%}")
    honest = [r["reward"] for r in out["rows"] if r["kind"] == "honest"]
    print(f"  median honest reward {statistics.median(honest) / 1e18:.3f} tokens per round")
    if not out["audit_ok"]:
        print(out["audit"].render())


if __name__ == "__main__":
    main()
