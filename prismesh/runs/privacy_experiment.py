"""``prismesh experiment --dp-epsilon 1,4,8``: the accuracy cost of differential privacy.

For each seed, the synthetic benchmark is federated for ``rounds`` rounds without DP and then at
each target ε (at δ), and every row is evaluated on every hospital's test set (Min-Acc and H-mean,
paper eq. 4-5). Two units of privacy can be asked for:

* ``sample`` (patient records): DP-SGD in each hospital's local training. Each hospital's noise
  multiplier is calibrated with the accountant so that its own ε after all rounds (its sampling
  rate is batch / N, so smaller hospitals need more noise) equals the target.
* ``client`` (a hospital's whole dataset): each update clipped in ΔW space and Gaussian noise
  added at the aggregator (``prismesh.aggregator.dp``), σ calibrated for the target after all
  rounds; the clip bound is the median norm of the no-DP run's round-1 updates.

It runs in one process through the trainer, the DP mechanisms and the strategies the daemons use
(like ``prismesh experiment``); the sealing and the chain are exercised by the federation tests.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DELTA = 1e-5


def _say(text: str) -> None:
    print(text, flush=True)


def _seed_bytes(*parts: object) -> bytes:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()


def run_rounds(base: Path, train: dict[str, list], configs: dict[str, Any], rounds: int, work: Path, initial: Path,
               tag: str, client_dp: dict | None = None, seed: int = 0) -> tuple[Path, list[float]]:
    """``rounds`` rounds of local training + aggregation (``fedavg-exact``, or the central-DP
    mean with ``client_dp``); returns the final adapter and round 1's update norms."""
    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.aggregator.dp import dp_aggregate
    from prismesh.aggregator.strategies import ClientUpdate, get_strategy
    from prismesh.aggregator.updates import norms, update_gram
    from prismesh.node.trainer import train_lora

    strategy = get_strategy("fedavg-exact")
    global_dir = initial
    first_norms: list[float] = []
    for r in range(1, rounds + 1):
        glob = load_adapter(global_dir)
        updates = []
        for name in sorted(train):
            res = train_lora(base, train[name], work / f"{tag}-r{r}-{name}", configs[name], init_adapter=global_dir,
                             progress=False, noise_seed=int.from_bytes(_seed_bytes(tag, seed, r, name)[:8], "big"))
            updates.append(ClientUpdate(name, res.num_samples, load_adapter(res.adapter_dir).as_numpy()))
        if r == 1:
            first_norms = [float(x) for x in norms(update_gram([u.adapter for u in updates], glob))]
        if client_dp is None:
            adapter = strategy.aggregate(updates, glob).adapter
        else:
            adapter, _ = dp_aggregate([u.adapter for u in updates], glob, dict(glob.config), client_dp["clip"],
                                      client_dp["noise_multiplier"], len(updates), _seed_bytes("dp", tag, seed, r))
        global_dir = save_adapter(adapter, work / f"{tag}-global-r{r}")
        _say(f"      {tag} round {r}: {len(updates)} updates aggregated")
    return global_dir, first_norms


def run_privacy_experiment(out: Path, *, seeds: list[int], epsilons: list[float], level: str = "sample",
                           scale: float = 1.0, rounds: int = 3, dp_clip: float = 1.0, dp_batch: int | None = None,
                           dp_lr: float | None = None) -> dict[str, Any]:
    """The ε / accuracy table over ``seeds``; writes ``results.json`` and ``table.md`` in ``out``.

    ``dp_batch`` / ``dp_lr`` set DP-SGD's logical batch and learning rate (DP-SGD's noise per
    example falls as the batch grows, so it is usually run with larger batches and rates than
    plain training; the no-DP row keeps the benchmark's tuned settings)."""
    from prismesh.chain.privacy import dp_sgd_steps, epsilon, noise_for_epsilon
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator, fairness
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG, make_benchmark
    from prismesh.node.trainer import TrainConfig, create_initial_adapter

    if level not in ("sample", "client"):
        raise ValueError(f"DP level must be 'sample' or 'client', got {level!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = ensure_base_model(progress=True)
    ev = Evaluator(base, device="cpu")
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        _say(f"seed {seed}: benchmark, initial adapter, no-DP federation")
        clients = make_benchmark(out / f"data-{seed}", seed=seed, scale=scale)
        train = {c.name: load_jsonl(c.train_path) for c in clients}
        tests = {c.name: load_jsonl(c.test_path) for c in clients}
        plain = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "seed": seed, "device": "cpu"})
        rows: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="prismesh-dp-experiment-") as tmp:
            work = Path(tmp)
            initial = create_initial_adapter(base, work / "initial", plain)

            def evaluate(adapter: Path, tests: dict[str, list] = tests) -> dict[str, Any]:
                acc = {c: ev.accuracy(adapter, tests[c]) for c in sorted(tests)}
                return {"accuracy": acc, **fairness(acc)}

            rows["Base model"] = {**evaluate(initial), "epsilon": 0.0}
            final, first_norms = run_rounds(base, train, {c: plain for c in train}, rounds, work, initial, "nodp", seed=seed)
            rows["No DP"] = {**evaluate(final), "epsilon": None}
            clip = float(statistics.median(first_norms)) if level == "client" else dp_clip
            for eps in epsilons:
                label = f"ε = {eps:g}"
                if level == "sample":
                    configs, settings = {}, {}
                    dp_cfg = plain.to_dict()
                    if dp_batch is not None:
                        dp_cfg.update(batch_size=1, grad_accum=int(dp_batch))
                    if dp_lr is not None:
                        dp_cfg.update(lr=float(dp_lr))
                    for name, examples in train.items():
                        rate, steps = dp_sgd_steps(len(examples), dp_cfg)
                        sigma = noise_for_epsilon(eps, rate, steps * rounds, DELTA)
                        configs[name] = TrainConfig.from_dict({**dp_cfg, "dp_noise_multiplier": sigma,
                                                               "dp_clip": dp_clip})
                        settings[name] = {"noise_multiplier": round(sigma, 4), "sample_rate": round(rate, 5),
                                          "steps": steps * rounds,
                                          "epsilon": round(epsilon(sigma, rate, steps * rounds, DELTA), 4)}
                    _say(f"  {label}: DP-SGD, σ per hospital {[s['noise_multiplier'] for s in settings.values()]}")
                    final, _ = run_rounds(base, train, configs, rounds, work, initial, f"eps{eps:g}", seed=seed)
                else:
                    sigma = noise_for_epsilon(eps, 1.0, rounds, DELTA)
                    settings = {"noise_multiplier": round(sigma, 4), "clip": clip,
                                "epsilon": round(epsilon(sigma, 1.0, rounds, DELTA), 4)}
                    _say(f"  {label}: client-level DP at the aggregator, σ = {sigma:.3f}, clip = {clip:.4g}")
                    final, _ = run_rounds(base, train, {c: plain for c in train}, rounds, work, initial,
                                          f"eps{eps:g}", client_dp={"clip": clip, "noise_multiplier": sigma}, seed=seed)
                rows[label] = {**evaluate(final), "epsilon": eps, "settings": settings}
        per_seed.append({"seed": seed, "rows": rows, "train_sizes": {c: len(v) for c, v in train.items()}})
        _say(render_table([per_seed[-1]], level, rounds))
    results = {"level": level, "delta": DELTA, "rounds": rounds, "scale": scale, "seeds": seeds, "epsilons": epsilons,
               "dp_clip": dp_clip, "dp_batch": dp_batch, "dp_lr": dp_lr, "train_config": plain.to_dict(),
               "per_seed": per_seed, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    table = render_table(per_seed, level, rounds)
    (out / "table.md").write_text(table + "\n")
    _say(table)
    _say(f"wrote {out / 'results.json'}, {out / 'table.md'}")
    return results


def render_table(per_seed: list[dict[str, Any]], level: str, rounds: int) -> str:
    """Min-Acc and H-mean per row: mean ± standard deviation over seeds, and each seed's value."""
    labels = list(per_seed[0]["rows"])
    unit = "patient records (DP-SGD)" if level == "sample" else "hospitals (client-level, at the aggregator)"
    lines = [f"### Accuracy at ε (δ = {DELTA:g}, {rounds} rounds; privacy unit: {unit}; "
             f"{len(per_seed)} seed(s): {', '.join(str(s['seed']) for s in per_seed)})", "",
             "| row | Min-Acc | H-mean | Macro-Acc | Min-Acc per seed | H-mean per seed |", "|---|---:|---:|---:|---|---|"]

    def agg(values: list[float]) -> str:
        mean = 100 * statistics.fmean(values)
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"

    for label in labels:
        mins = [s["rows"][label]["min_acc"] for s in per_seed]
        hs = [s["rows"][label]["h_mean"] for s in per_seed]
        macro = [s["rows"][label]["macro_acc"] for s in per_seed]
        lines.append(f"| {label} | {agg(mins)} | {agg(hs)} | {agg(macro)} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in mins)} | {', '.join(f'{100 * v:.1f}' for v in hs)} |")
    return "\n".join(lines)
