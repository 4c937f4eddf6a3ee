"""``prismesh govern``: the governance side of a deployment — vet clients, create and start
tasks, and read a task's state. Every command signs with the governance key it is given."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("govern", help="governance: approve clients, create and start tasks")
    gs = g.add_subparsers(dest="govern_command", metavar="ACTION")
    gs.required = True

    def common(p: argparse.ArgumentParser, signer: bool = True) -> None:
        p.add_argument("--manifest", type=Path, required=True, help="deployment manifest")
        p.add_argument("--rpc-url", default=None, help="override the manifest's RPC URL")
        if signer:
            p.add_argument("--account", default="dev:0", help="governance key: dev:N, 0x key or keystore path")

    p = gs.add_parser("approve", help="approve registered clients (or reinstate suspended ones)")
    common(p)
    p.add_argument("clients", nargs="+", help="client addresses")
    p.set_defaults(func=_approve)

    p = gs.add_parser("suspend", help="suspend approved clients")
    common(p)
    p.add_argument("clients", nargs="+")
    p.set_defaults(func=_suspend)

    p = gs.add_parser("add-aggregator", help="grant the aggregator role")
    common(p)
    p.add_argument("address")
    p.set_defaults(func=_add_aggregator)

    p = gs.add_parser("make-spec", help="write a task spec (hyper-parameter file) for a base model directory")
    p.add_argument("--base-model", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--base-model-id", default=None, help="name recorded on chain (default: the directory name)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--target-modules", default=None,
                   help="comma-separated LoRA target modules (default: q/k/v/o + gate/up/down)")
    p.add_argument("--no-report-metrics", action="store_true",
                   help="nodes do not evaluate and report each aggregate's accuracy")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--norm-bound", type=float, default=1.0e4)
    p.add_argument("--train", default="{}", help="training settings as JSON (lr, max_length, seed, ...)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_make_spec)

    p = gs.add_parser("create-task", help="pin a task spec and create the task on chain")
    common(p)
    p.add_argument("--spec", type=Path, required=True, help="task spec JSON (see make-spec)")
    p.add_argument("--store", default="embedded", help="storage spec the participants read from")
    p.add_argument("--initial-adapter", type=Path, default=None, help="PEFT adapter directory for round 1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-participants", type=int, default=2)
    p.add_argument("--max-participants", type=int, default=8)
    p.add_argument("--max-failed-rounds", type=int, default=2)
    p.add_argument("--commit-seconds", type=int, default=3600)
    p.add_argument("--reveal-seconds", type=int, default=1800)
    p.add_argument("--reward", type=float, default=10.0, help="tokens per accepted update")
    p.add_argument("--aggregator-reward", type=float, default=2.0)
    p.set_defaults(func=_create_task)

    p = gs.add_parser("start-task", help="start a task with the clients that joined")
    common(p)
    p.add_argument("task", type=int)
    p.set_defaults(func=_start_task)

    p = gs.add_parser("status", help="a task's state and rounds as JSON")
    common(p, signer=False)
    p.add_argument("task", type=int)
    p.set_defaults(func=_status)


def _open(args: argparse.Namespace, signer: bool = True) -> tuple[Any, Any, Any]:
    from prismesh.chain.evm.manifest import connect, load_manifest

    manifest = load_manifest(args.manifest)
    if args.rpc_url:
        from dataclasses import replace

        manifest = replace(manifest, rpc_url=args.rpc_url)
    w3 = connect(manifest)
    account = None
    if signer:
        from prismesh.chain.identity import IdentityError, load_daemon_account

        try:
            account = load_daemon_account(args.account)
        except IdentityError as exc:
            raise SystemExit(f"error: --account: {exc}") from None
    return manifest, w3, account


def _for_each_client(action: str, done: str) -> Callable[[argparse.Namespace], int]:
    """A command applying one Registry action (``approve``, ``suspend``) to every given client."""

    def run(args: argparse.Namespace) -> int:
        from prismesh.chain.evm.contracts import Registry

        manifest, w3, acct = _open(args)
        apply = getattr(Registry(manifest, w3, acct), action)
        for c in args.clients:
            apply(c)
            print(f"{done} {c}")
        return 0

    return run


_approve = _for_each_client("approve", "approved")
_suspend = _for_each_client("suspend", "suspended")


def _add_aggregator(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Registry

    manifest, w3, acct = _open(args)
    Registry(manifest, w3, acct).add_aggregator(args.address)
    print(f"aggregator role granted to {args.address}")
    return 0


def _make_spec(args: argparse.Namespace) -> int:
    from prismesh.chain.taskspec import LoraSpec, TaskSpec, TaskSpecError, model_fingerprint

    cfg_path = args.base_model / "config.json"
    if not cfg_path.is_file():
        print(f"error: {args.base_model} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        train = json.loads(args.train)
        lora = {"r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout}
        if args.target_modules is not None:
            lora["target_modules"] = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
        spec = TaskSpec(
            base_model_id=args.base_model_id or args.base_model.name,
            base_model_sha256=model_fingerprint(args.base_model),
            lora=LoraSpec(**lora),
            model_config=json.loads(cfg_path.read_text()),
            train=train,
            strategy=args.strategy,
            norm_bound=args.norm_bound,
            report_metrics=not args.no_report_metrics,
        )
    except (json.JSONDecodeError, TaskSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


def _create_task(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Coordinator, RewardToken, TaskParams
    from prismesh.chain.storage import add_adapter, open_store
    from prismesh.chain.taskspec import TaskSpec, TaskSpecError

    try:
        spec = TaskSpec.from_bytes(args.spec.read_bytes(), where=str(args.spec))
    except (OSError, TaskSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest, w3, acct = _open(args)
    store = open_store(args.store)
    spec_cid = store.add_bytes(spec.to_bytes())
    init_cid = add_adapter(store, args.initial_adapter) if args.initial_adapter else ""
    unit = 10 ** RewardToken.read_only(manifest, w3).decimals()
    params = TaskParams.for_spec(
        spec,
        spec_cid,
        init_cid,
        num_rounds=args.rounds,
        min_participants=args.min_participants,
        max_participants=args.max_participants,
        max_failed_rounds=args.max_failed_rounds,
        commit_duration=args.commit_seconds,
        reveal_duration=args.reveal_seconds,
        reward_per_update=int(args.reward * unit),
        aggregator_reward=int(args.aggregator_reward * unit),
    )
    coord = Coordinator(manifest, w3, acct)
    task = coord.task_id_from(coord.create_task(params))
    print(json.dumps({"task": task, "hyper_params_cid": spec_cid, "initial_adapter_cid": init_cid}))
    return 0


def _start_task(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Coordinator

    manifest, w3, acct = _open(args)
    coord = Coordinator(manifest, w3, acct)
    coord.start_task(args.task)
    state = coord.get_task(args.task)
    print(f"task {args.task} started with {state.participant_count} participants; round {state.current_round} open")
    return 0


def _status(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Coordinator

    manifest, w3, _ = _open(args, signer=False)
    coord = Coordinator.read_only(manifest, w3)
    state = coord.get_task(args.task)
    rounds = []
    for r in range(1, state.current_round + 1):
        info = coord.get_round(args.task, r)
        rounds.append({
            "round": r,
            "phase": coord.phase_of(args.task, r).name,
            "commits": info.commit_count,
            "reveals": info.reveal_count,
            "aggregate_cid": info.aggregate_cid,
            "included": coord.get_included(args.task, r) if info.aggregate_cid else [],
        })
    print(json.dumps({
        "task": args.task,
        "status": state.status.name,
        "current_round": state.current_round,
        "completed_rounds": state.completed_rounds,
        "participants": coord.get_participants(args.task),
        "rounds": rounds,
    }, indent=2))
    return 0
