"""``prismesh demo``: three hospitals, one aggregator, the chain and its finality committee,
three federated rounds on the synthetic benchmark — then a report read back from the chain.

Everything reported per round comes from the chain and the store (the accuracy each node
reported on chain, the rewards paid, the gas used, the CIDs and their sizes), so the report
shows what any auditor could re-derive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("prismesh.demo")

HOSPITAL_ORDER = ("hospital-a", "hospital-b", "hospital-c")


def build_spec(base_model: Path, seed: int, strategy: str = "fedavg", privacy: dict | None = None) -> Any:
    """The demo task's hyper-parameter file: the benchmark's tuned LoRA and training settings
    (and its privacy settings, see docs/privacy.md)."""
    from prismesh.aggregator.strategies import client_settings
    from prismesh.chain.taskspec import LoraSpec, TaskSpec, model_fingerprint
    from prismesh.node.synthetic import BENCHMARK_SCORING, BENCHMARK_TRAIN_CONFIG
    from prismesh.runs.experiment import STRATEGY_CONFIGS
    from prismesh.runs.federation import model_config_of

    # A configuration name of the experiment (``fedavgm-fair``, ``fedavgm`` ...) brings its options.
    chosen = STRATEGY_CONFIGS.get(strategy, {"strategy": strategy})
    options = {k: v for k, v in chosen.items() if k != "strategy"}
    strategy = chosen["strategy"]
    train = {**BENCHMARK_TRAIN_CONFIG, **client_settings(strategy, options)}
    rank, alpha = train.pop("rank", 8), train.pop("alpha", 16)
    dropout = train.pop("dropout", 0.1)
    return TaskSpec(
        base_model_id="prismesh/tiny-qwen3-medical-standin",
        base_model_sha256=model_fingerprint(base_model),
        lora=LoraSpec(r=rank, lora_alpha=alpha, lora_dropout=dropout),
        model_config=model_config_of(base_model),
        train={**train, "seed": seed},
        strategy=strategy,
        strategy_options=options,
        report_metrics=True,
        privacy=privacy or {},
        metric_scoring=BENCHMARK_SCORING,
    )


def run_demo(out: Path, *, seed: int = 0, scale: float = 1.0, rounds: int = 3, strategy: str = "fedavg",
             finality: bool = True, baselines: bool = True, plots: bool = True,
             chain: str = "anvil", observer: Callable[[Any], Any] | None = None, sealed: bool = False,
             dp_noise: float | None = None, dp_clip: float = 1.0) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return the report (also written as JSON/Markdown).

    ``sealed`` seals every update to the aggregator and an appointed auditor and every aggregate
    to the members; ``dp_noise`` adds client-level DP at the aggregator with that noise
    multiplier and ``dp_clip`` (sealed, ``fedavg-exact``; docs/privacy.md). The report then
    shows ε per round, and the audit runs with the auditor's key.

    With ``chain="anvil"`` (the default) the chain's state is kept under ``out/run/chain``, so
    the finished run can be re-opened and audited (:func:`reopen_chain`). ``observer(fed)`` is
    called once the federation is set up (the command line opens the dashboard there); what it
    returns has ``finished()`` called after the report and ``close()`` before the chain stops."""
    from prismesh.aggregator.parallel import start_ray_in_background, stop_ray
    from prismesh.node.basemodel import ensure_base_model
    from prismesh.node.synthetic import make_benchmark
    from prismesh.node.trainer import TrainConfig, create_initial_adapter
    from prismesh.runs.federation import Federation, TaskSettings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(["base model (built once, then cached)", "synthetic non-IID benchmark",
                    f"{chain} chain + HotStuff committee + contracts + store", "federated task",
                    *(["baselines: base model and single-client LoRA (same number of local epochs)"] if baselines else []),
                    "report"])
    from prismesh.runs.accounting import Ledger, instrument, rounded, with_training

    ledger = Ledger()
    t_start = time.perf_counter()
    # The aggregator's Ray starts first, on a thread: it is ready long before round 1's reveals.
    ray_started = start_ray_in_background(num_cpus=1)
    steps.next()
    base = ensure_base_model(progress=True)
    _say(f"      {base}")
    steps.next()
    clients = make_benchmark(out / "data", seed=seed, scale=scale)
    for c in clients:
        _say(f"      {c.name}: {c.language}/{c.fmt}, {c.n_train} train, {c.n_test} test")
    steps.next()
    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    with ledger.part("chain"):
        fed = Federation(run_dir, finality=finality, chain=chain)
    watching = None
    try:
        for c in clients:
            fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
        fed.add_aggregator()
        # Only the hashes of the hospitals' descriptors go on chain; kept here, they let
        # `prismesh dashboard --out` name each hospital (after checking them against the hashes).
        (run_dir / "descriptors.json").write_text(json.dumps(fed.descriptors(), indent=1) + "\n")
        instrument(fed, ledger)
        if observer is not None:
            watching = observer(fed)
        privacy: dict[str, Any] = {}
        auditor_key = None
        if sealed or dp_noise is not None:
            auditor, auditor_key = fed.add_auditor()
            privacy = {"recipients": [fed.aggregator.account.address, auditor.address], "aggregate": "members"}
            if dp_noise is not None:
                privacy["client_dp"] = {"clip": dp_clip, "noise_multiplier": dp_noise, "where": "aggregator"}
                strategy = "fedavg-exact"
        fed.approve_all()
        spec = build_spec(base, seed, strategy, privacy)
        initial = create_initial_adapter(
            base, run_dir / "initial-adapter", TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}),
            base_model_name=spec.base_model_id,
        )
        task_id = fed.create_task(spec, TaskSettings(num_rounds=rounds, min_participants=2), initial_adapter=initial)
        steps.next(f"task {task_id}: {rounds} rounds, strategy {strategy}; nodes train on final RoundOpened events")
        printer = _RoundPrinter(fed, task_id, ledger)
        startup = ledger.cut("start-up", training=0.0)
        t_fed = time.perf_counter()
        state = fed.run_task(task_id, on_step=printer.poll)
        printer.poll()
        tail = ledger.cut("tail", training=0.0)
        fed_seconds = time.perf_counter() - t_fed
        _say(f"      task finished: {state.status.name} in {fed_seconds:.1f} s")
        report = collect_report(fed, task_id, clients, spec, history=printer)
        rows = [startup, *_with_round_training(report, printer.rows, with_training), tail]
        report["timing"] = {
            "startup_seconds": round(t_fed - t_start, 2),
            "federated_seconds": round(fed_seconds, 2),
            "rows": [rounded(r) for r in rows],
        }
        report["run"] = _run_info(seed=seed, scale=scale, rounds=rounds, strategy=strategy, chain=chain,
                                  **({"sealed": True} if privacy else {}),
                                  **({"dp_noise": dp_noise, "dp_clip": dp_clip} if dp_noise is not None else {}))
        from prismesh.aggregator.audit import audit_task

        audit = audit_task(fed.w3, fed.manifest, fed.store, task_id, check_finality=finality, key=auditor_key)
        report["audit"] = {"ok": audit.ok, "checks": len(audit.findings), "failures": [f.__dict__ for f in audit.failures()]}
        _say(f"      audit from chain + store: {'PASS' if audit.ok else 'FAIL'} ({len(audit.findings)} checks)")
        if baselines:
            steps.next()
            report["baselines"] = compute_baselines(base, clients, initial, spec, rounds)
        report["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
        steps.next()
        write_report(out, report, plots=plots, fed=fed, task_id=task_id)
        _say(render_round_table(report))
        _say(f"wrote {out / 'report.json'}, {out / 'report.md'}" + (" and plots" if plots else ""))
        if watching is not None:
            watching.finished()
        return report
    finally:
        if watching is not None:
            watching.close()
        fed.close()
        if ray_started:
            stop_ray()
        if chain == "anvil":
            _say(f"the chain is kept in {fed.state_file}; re-check it any time with\n"
                 f"      prismesh audit --out {out} --task 1\n"
                 f"      prismesh govern status --out {out} 1")


class _Steps:
    """``[k/n] what``: the counter follows the steps actually taken."""

    def __init__(self, titles: list[str]) -> None:
        self.titles, self.k = titles, 0

    def next(self, title: str | None = None) -> None:
        self.k += 1
        _say(f"[{self.k}/{len(self.titles)}] {title or self.titles[self.k - 1]}")


@contextlib.contextmanager
def reopen_chain(out: Path) -> Iterator[tuple[Any, Any, str]]:
    """Re-open a finished demo's chain: anvil from the saved state on a free port. Yields the
    manifest (pointing at that port), a Web3 and the demo's store spec; stops anvil afterwards."""
    from dataclasses import replace

    from prismesh.chain.evm.devnet import start_anvil
    from prismesh.chain.evm.manifest import ManifestError, load_manifest

    run_dir = Path(out) / "run"
    state = run_dir / "chain" / "anvil-state.json"
    if not state.is_file():
        raise ManifestError(
            f"{out} holds no saved demo chain ({state} is missing); run `prismesh demo --out {out}` first"
        )
    manifest = load_manifest(run_dir / "manifest.json")
    dev = start_anvil(state_file=state, chain_id=manifest.chain_id)
    try:
        yield replace(manifest, rpc_url=dev.rpc_url), dev.w3, f"embedded:{run_dir / 'ipfs'}"
    finally:
        dev.stop()


def _run_info(**options: Any) -> dict[str, Any]:
    """How and where a report was produced, for the reader of a copy of it."""
    import datetime
    import os
    import platform

    from prismesh import __version__

    return {
        "command": "prismesh demo " + " ".join(f"--{k} {v}" for k, v in options.items()),
        "prismesh": __version__,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _say(text: str) -> None:
    print(text, flush=True)


HISTORY_EVENTS = ("RoundOpened", "UpdateRevealed", "AggregateAccepted", "MetricReported", "RewardEarned")


class _RoundPrinter:
    """Follows the task's history forward from the last block it read (an event stream with its
    cursor in memory: each event once, nothing rescanned), keeps it for the report, prints a
    line as each round's aggregate is accepted and closes that round's timing row."""

    def __init__(self, fed: Any, task_id: int, ledger: Any) -> None:
        from prismesh.chain.evm.contracts import Coordinator
        from prismesh.chain.finality.coordinator_stream import CoordinatorStream
        from prismesh.chain.finality.events import FinalEventStream

        self.task_id, self.ledger = task_id, ledger
        contract = Coordinator.read_only(fed.manifest, fed.w3).contract
        # Progress follows the head; what the report keeps is re-checked by the audit anyway.
        self.stream = CoordinatorStream(FinalEventStream(
            fed.w3, contract, HISTORY_EVENTS, finality=False, from_block=fed.manifest.deploy_block, auto_ack=True,
        ))
        self.events: dict[str, list] = {name: [] for name in HISTORY_EVENTS}
        self.rows: list[dict[str, Any]] = []

    def poll(self) -> None:
        for ev in self.stream.poll():
            if getattr(ev, "task_id", None) != self.task_id:
                continue
            self.events[ev.event].append(ev)
            if ev.event == "AggregateAccepted":
                self.rows.append(self.ledger.cut(f"round {ev.round}"))
                _say(f"      round {ev.round}: aggregate {ev.aggregate_cid} accepted in block {ev.block_number} "
                     f"({len(ev.included)} clients included)")


# ---------------------------------------------------------------------- report


def collect_report(fed: Any, task_id: int, clients: list, spec: Any, history: Any = None) -> dict[str, Any]:
    """The task's whole history from the chain and the store: the events ``history`` (a
    :class:`_RoundPrinter`) already read, else read back from the deployment block."""
    from prismesh.node.evaluate import fairness

    start = fed.manifest.deploy_block
    by_addr = {h.daemon.address: h.name for h in fed.hospitals}
    if history is not None:
        events = history.events
    else:
        coord = fed.coordinator()
        events = {name: coord.get_events(name, start, taskId=task_id) for name in HISTORY_EVENTS}
    accepted = events["AggregateAccepted"]
    opened = {ev.round: ev for ev in events["RoundOpened"]}
    reveals = events["UpdateRevealed"]
    metrics = events["MetricReported"]
    rewards = events["RewardEarned"]
    finals = _final_heights(fed)
    rounds = []
    for ev in accepted:
        r = ev.round
        acc = {
            by_addr[m.client]: m.value / 1e6
            for m in metrics
            if m.round == r and m.metric == "accuracy" and m.client in by_addr
        }
        fair = fairness(acc) if len(acc) == len(fed.hospitals) else {}
        round_reveals = [x for x in reveals if x.round == r]
        uploaded = {by_addr.get(x.client, x.client): int(fed.store.stat(x.cid).cumulative_size) for x in round_reveals}
        begin = opened[r].block_number if r in opened else start
        rounds.append({
            "round": r,
            "aggregate_cid": ev.aggregate_cid,
            "global_cid": opened[r].global_adapter_cid if r in opened else "",
            "included": list(ev.included),
            "accuracy": {k: acc[k] for k in sorted(acc)},
            "macro_acc": fair.get("macro_acc"),
            "min_acc": fair.get("min_acc"),
            "h_mean": fair.get("h_mean"),
            "rewards": {x.recipient: int(x.amount) for x in rewards if x.round == r},
            "scores": {x.recipient: int(x.score) for x in rewards if x.round == r and not x.is_aggregator},
            "bytes_uploaded": uploaded,
            "gas_used": _gas_between(fed.w3, begin, ev.block_number),
            "accepted_block": ev.block_number,
            "final_block": next((h for h in finals if h >= ev.block_number), None),
        })
    agg_state = fed.aggregator.state.section("rounds") if fed.aggregator else {}
    for row in rounds:
        rec = agg_state.get(f"{task_id}:{row['round']}", {})
        row["rejected"] = rec.get("rejected", {})
        row["strategy_metrics"] = rec.get("metrics", {})
        row["train_seconds"] = {
            h.name: h.daemon.state.section("rounds").get(f"{task_id}:{row['round']}", {}).get("train_seconds")
            for h in fed.hospitals
        }
    return {
        "chain": {
            "kind": fed.devnet.kind,
            "chain_id": fed.manifest.chain_id,
            "contracts": dict(fed.manifest.addresses),
            "finality": "hotstuff" if fed.committee is not None else "none",
            "validators": [k.address for k in fed.validator_keys],
        },
        "task": {"id": task_id, "spec": spec.to_dict()},
        "privacy": _privacy_section(spec, rounds),
        "clients": [
            {
                "name": c.name,
                "address": h.daemon.address,
                "language": c.language,
                "format": c.fmt,
                "train_samples": c.n_train,
                "test_samples": c.n_test,
            }
            for c, h in zip(clients, fed.hospitals, strict=True)
        ],
        "rounds": rounds,
        "adapter_bytes": _adapter_tensor_bytes(fed, rounds),
        "base_model_bytes": _dir_bytes(Path(fed.hospitals[0].daemon.config.base_model)),
    }


def _privacy_section(spec: Any, rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """ε as the accountant gives it after each accepted round, and who can read the updates."""
    from prismesh.chain.privacy import describe, privacy_report

    privacy = spec.privacy_spec
    text = describe(privacy, spec.train, len(rounds))
    if text is None:
        return None
    return {"summary": text, **privacy_report(privacy, spec.train, len(rounds))}



def _with_round_training(report: dict[str, Any], rows: list[dict[str, Any]], with_training: Any) -> list[dict[str, Any]]:
    """Each round's timing row with the clients' measured training seconds (all of them: in
    this one-process demo the nodes share two cores and train one after another), copied
    into the report's round rows too."""
    by_round = {row["round"]: row for row in report["rounds"]}
    out = []
    for timing in rows:
        rnd = int(timing["row"].split()[-1])
        row = by_round.get(rnd)
        train = [t for t in (row or {}).get("train_seconds", {}).values() if t]
        timed = with_training(timing, float(sum(train)))
        out.append(timed)
        if row is not None:
            wall = timed["wall_seconds"]
            row["wall_seconds"] = round(wall, 2)
            row["slowest_training_seconds"] = round(max(train, default=0.0), 2)
            row["training_seconds_total"] = round(sum(train), 2)
            row["overhead_fraction"] = round(max(0.0, wall - sum(train)) / wall, 3) if wall > 0 else None
    return out


def _final_heights(fed: Any) -> list[int]:
    if fed.committee is None:
        return []
    return sorted(cert.height for cert, _ in fed.committee.certificates)


def _gas_between(w3: Any, first: int, last: int) -> int:
    total = 0
    for n in range(first, last + 1):
        total += int(w3.eth.get_block(n)["gasUsed"])
    return total


def _adapter_tensor_bytes(fed: Any, rounds: list) -> int | None:
    if not rounds:
        return None
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.chain.sealing import fetch_any_adapter

    key = fed.auditor[1] if fed.auditor else None
    d = fetch_any_adapter(fed.store, rounds[0]["aggregate_cid"], fed.root / "report-tmp" / "agg", key)
    adapter = load_adapter(d)
    import numpy as np

    return int(sum(np.asarray(t).nbytes for t in adapter.tensors.values()))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compute_baselines(base: Path, clients: list, initial: Path, spec: Any, rounds: int) -> dict[str, Any]:
    """Base model and each client's own LoRA (as many one-epoch rounds as the federation, on its
    own data only, so its learning-rate schedule is the federation's)."""
    import tempfile

    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator, fairness
    from prismesh.node.trainer import TrainConfig
    from prismesh.runs.experiment import single_client

    ev = Evaluator(base, device="cpu")
    tests = {c.name: load_jsonl(c.test_path) for c in clients}
    base_acc = {name: ev.accuracy(None, t, scoring=spec.metric_scoring) for name, t in tests.items()}
    single: dict[str, float] = {}
    cfg = TrainConfig.from_dict({**spec.train_config(), "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        for c in clients:
            adapter = single_client(base, load_jsonl(c.train_path), cfg, rounds, Path(tmp), c.name, initial)
            single[c.name] = ev.accuracy(adapter, tests[c.name], scoring=spec.metric_scoring)
            _say(f"      single-client LoRA {c.name}: {single[c.name]:.3f} on its own test set")
    return {
        "base": base_acc,
        "single": single,
        "base_fairness": fairness(base_acc),
        "single_fairness": fairness(single),
    }


def render_round_table(report: dict[str, Any]) -> str:
    names = [c["name"] for c in report["clients"]]
    head = "| round | " + " | ".join(names) + " | Macro-Acc | Min-Acc | H-mean | gas | uploaded (B) |"
    sep = "|" + "---|" * (len(names) + 6)
    lines = [head, sep]

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    base = report.get("baselines", {})
    for label, key in (("base", "base"), ("single", "single")):
        if key in base:
            acc = base[key]
            fair = base.get(f"{key}_fairness", {})
            lines.append(f"| {label} | " + " | ".join(f(acc.get(n)) for n in names)
                         + f" | {f(fair.get('macro_acc'))} | {f(fair.get('min_acc'))} | {f(fair.get('h_mean'))} | | |")
    for row in report["rounds"]:
        up = sum(row["bytes_uploaded"].values())
        lines.append(
            f"| {row['round']} | " + " | ".join(f(row["accuracy"].get(n)) for n in names)
            + f" | {f(row['macro_acc'])} | {f(row['min_acc'])} | {f(row['h_mean'])} | {row['gas_used']} | {up} |"
        )
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], *, plots: bool, fed: Any, task_id: int) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    md = [
        "# PrisMesh demo report",
        "",
        *([f"Produced by `{report['run']['command']}` (prismesh {report['run']['prismesh']}) on "
           f"{report['run']['machine']}, {report['run']['date']}.", ""] if "run" in report else []),
        f"Chain: {report['chain']['kind']} (chain id {report['chain']['chain_id']}), finality: "
        f"{report['chain']['finality']} with {len(report['chain']['validators'])} validators.",
        "",
        "## Accuracy per round (reported on chain by each node for the round's aggregate)",
        "",
        render_round_table(report),
        "",
        "## Clients",
        "",
        "| name | address | language | format | train | test |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["clients"]:
        md.append(f"| {c['name']} | `{c['address']}` | {c['language']} | {c['format']} | {c['train_samples']} | {c['test_samples']} |")
    if report.get("privacy"):
        p = report["privacy"]
        md += ["", "## Privacy", "", p["summary"] + ".", ""]
        if p.get("client_epsilon_per_round"):
            md += ["| after round | client-level ε (δ = " + f"{p['delta']:g}" + ") |", "|---:|---:|"]
            md += [f"| {k} | {e:.3f} |" for k, e in enumerate(p["client_epsilon_per_round"], start=1)]
    md += ["", "## Rounds", ""]
    for row in report["rounds"]:
        md.append(f"- round {row['round']}: aggregate `{row['aggregate_cid']}`, accepted in block "
                  f"{row['accepted_block']}, final at {row['final_block']}, included {len(row['included'])}, "
                  f"rejected {row.get('rejected') or 'none'}")
    md += ["", "## Cost per round", "",
           "| round | wall (s) | slowest local training (s) | all local training (s) | overhead | gas | bytes uploaded per client |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for row in report["rounds"]:
        up = ", ".join(f"{k}: {v}" for k, v in sorted(row["bytes_uploaded"].items()))
        oh = row.get("overhead_fraction")
        md.append(f"| {row['round']} | {row.get('wall_seconds', '–')} | {row.get('slowest_training_seconds', '–')} | "
                  f"{row.get('training_seconds_total', '–')} | {'–' if oh is None else f'{100 * oh:.0f}%'} | {row['gas_used']} | {up} |")
    rows = report.get("timing", {}).get("rows", [])
    if rows:
        from prismesh.runs.accounting import OVERHEAD_PARTS

        parts = [*OVERHEAD_PARTS, "other"]
        md += ["", "## Where the federated wall time went (s)", "",
               f"Start-up (launch to round 1), each round (up to its aggregate's acceptance) and the tail "
               f"(last metrics, claims); the rows add up to {report['timing']['startup_seconds']} s of start-up "
               f"plus {report['timing']['federated_seconds']} s of federated rounds. Overhead is wall time minus "
               "the clients' own training time.", "",
               "| row | wall | training | overhead | " + " | ".join(parts) + " |",
               "|---|" + "---:|" * (3 + len(parts))]
        for row in rows:
            md.append(f"| {row['row']} | {row['wall_seconds']:.2f} | {row['training_seconds']:.2f} | "
                      f"{row['overhead_seconds']:.2f} | " + " | ".join(f"{row['overhead'][k]:.2f}" for k in parts) + " |")
    md += ["", f"Adapter tensors: {report['adapter_bytes']} B per update; full base model files: "
           f"{report['base_model_bytes']} B (what FedAvg of the whole model would move per client per round).", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    if plots:
        from prismesh.runs.plots import plot_accuracy, plot_update_pca

        plot_accuracy(report, out / "accuracy.png")
        plot_update_pca(fed, task_id, out / "updates_pca.png")
