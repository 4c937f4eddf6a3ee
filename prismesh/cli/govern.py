"""``prismesh govern``: the governance side of a deployment — vet clients, create and start
tasks, and read a task's state. Every command signs with the governance key it is given."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prismesh.cli.errors import CommandError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("govern", help="governance: approve clients, create and start tasks")
    gs = g.add_subparsers(dest="govern_command", metavar="ACTION")
    gs.required = True

    def common(p: argparse.ArgumentParser, signer: bool = True, demo: bool = False) -> None:
        if demo:
            where = p.add_mutually_exclusive_group(required=True)
            where.add_argument("--manifest", type=Path, help="deployment manifest")
            where.add_argument("--out", type=Path, help="a finished `prismesh demo --out DIR`: re-open its saved chain")
        else:
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

    p = gs.add_parser(
        "fund",
        help="send native currency (gas money) from the signing account to node or aggregator keys",
        description="Every key that sends transactions needs gas. On a devnet the governance "
        "account (dev:0) holds plenty; on a real chain any funded account can pay (see "
        "docs/deployment.md, 'Funding keys').",
    )
    common(p)
    p.add_argument("addresses", nargs="+", help="addresses to fund")
    p.add_argument("--eth", type=float, default=None,
                   help="amount per address in ether (default 10 on a devnet; required elsewhere)")
    p.set_defaults(func=_fund)

    p = gs.add_parser("add-aggregator", help="grant the aggregator role")
    common(p)
    p.add_argument("address")
    p.set_defaults(func=_add_aggregator)

    p = gs.add_parser("add-auditor", help="appoint an auditor (grant the auditor role; it may then publish "
                      "an encryption key and be named among a task's privacy.recipients)")
    common(p)
    p.add_argument("address")
    p.set_defaults(func=_add_auditor)

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
    p.add_argument("--strategy", default=None,
                   help="aggregation strategy (default: the task spec's default, clipped-fedavg; see docs/robustness.md "
                        "and docs/learning.md)")
    p.add_argument("--strategy-options", default="{}",
                   help='the strategy\'s options as JSON, e.g. \'{"clip": 1.5}\', or \'{"inner": "fairavg", "lr": 2.0}\' '
                        "for fedavgm; training settings the strategy needs of clients (FedProx's prox_mu) are added to --train")
    p.add_argument("--metric-scoring", choices=("letter", "mean", "sum"), default="letter",
                   help="how nodes score the accuracy they report (default letter, the MedQA standard)")
    p.add_argument("--norm-bound", type=float, default=1.0e4,
                   help="hard cap on each module's per-round update ||ΔW||_F (default 1e4; the default "
                        "strategy also bounds updates relative to the round's median)")
    p.add_argument("--train", default="{}", help="training settings as JSON (lr, max_length, seed, ...)")
    p.add_argument("--privacy", default="{}",
                   help="privacy settings as JSON: recipients, aggregate, client_dp, delta, epsilon_budget, ... "
                   "(see docs/privacy.md)")
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
    p.add_argument("--aggregation-seconds", type=int, default=3600,
                   help="time the aggregator has once reveals close; after it anyone may fail the round")
    p.add_argument("--weighting", choices=("samples", "uniform"), default="samples",
                   help="aggregation weights: claimed sample counts (capped) or equal (default samples)")
    p.add_argument("--sample-cap", type=int, default=10_000,
                   help="most samples a client may claim (the chain refuses more; default 10000)")
    p.add_argument("--reward", type=float, default=10.0,
                   help="tokens per included update, pooled per round and split by contribution score")
    p.add_argument("--aggregator-reward", type=float, default=2.0)
    p.set_defaults(func=_create_task)

    p = gs.add_parser("start-task", help="start a task with the clients that joined")
    common(p)
    p.add_argument("task", type=int)
    p.set_defaults(func=_start_task)

    p = gs.add_parser("status", help="a task's state and rounds as JSON (every task without TASK)")
    common(p, signer=False, demo=True)
    p.add_argument("task", type=int, nargs="?", default=None)
    p.set_defaults(func=_status)


def _open(args: argparse.Namespace, signer: bool = True) -> tuple[Any, Any, Any]:
    from prismesh.chain.evm.manifest import connect_with

    manifest, w3 = connect_with(args.manifest, args.rpc_url)
    account = None
    if signer:
        from prismesh.chain.identity import IdentityError, load_daemon_account

        try:
            account = load_daemon_account(args.account)
        except IdentityError as exc:
            raise CommandError(f"--account: {exc}") from None
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


def _fund(args: argparse.Namespace) -> int:
    from eth_utils import is_address, to_checksum_address, to_wei

    from prismesh.chain.evm.contracts import TxSender
    from prismesh.chain.evm.devnet import DEV_CHAIN_IDS

    bad = [a for a in args.addresses if not is_address(a)]
    if bad:
        raise UsageError(f"not an address: {bad[0]}")
    manifest, w3, acct = _open(args)
    amount = args.eth
    if amount is None:
        if manifest.chain_id not in DEV_CHAIN_IDS:
            raise UsageError(f"chain {manifest.chain_id} is not a devnet: say how much with --eth")
        amount = 10.0
    if not amount > 0:
        raise UsageError(f"--eth must be > 0, got {amount}")
    wei = to_wei(amount, "ether")
    sender = TxSender(w3, acct)
    for address in args.addresses:
        to = to_checksum_address(address)
        sender.send({"to": to, "value": wei, "gas": 21_000}, None, "transfer")
        print(f"funded {to} with {amount:g} ETH (balance {w3.eth.get_balance(to) / 10**18:g})")
    return 0


def _add_aggregator(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Registry

    manifest, w3, acct = _open(args)
    Registry(manifest, w3, acct).add_aggregator(args.address)
    print(f"aggregator role granted to {args.address}")
    return 0


def _add_auditor(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Registry

    manifest, w3, acct = _open(args)
    Registry(manifest, w3, acct).add_auditor(args.address)
    print(f"auditor role granted to {args.address}")
    return 0


def _json_option(flag: str, text: str, object_example: str | None = None) -> Any:
    """The JSON value of ``flag``; with ``object_example``, it must be an object (the example
    is shown in the error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not JSON: {exc}") from None
    if object_example is not None and not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, e.g. '{object_example}'")
    return value


def _make_spec(args: argparse.Namespace) -> int:
    from prismesh.chain.taskspec import LoraSpec, TaskSpec, TaskSpecError, model_fingerprint

    cfg_path = args.base_model / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"--base-model {args.base_model} is not a Hugging Face model directory (no config.json)")
    train = _json_option("--train", args.train, '{"lr": 1e-3}')
    privacy = _json_option("--privacy", args.privacy)
    strategy_options = _json_option("--strategy-options", args.strategy_options, '{"clip": 1.5}')
    from prismesh.aggregator.strategies import client_settings, get_strategy

    strategy = args.strategy or TaskSpec.__dataclass_fields__["strategy"].default
    try:
        get_strategy(strategy, **strategy_options)
        required = client_settings(strategy, strategy_options)
    except ValueError as exc:
        raise UsageError(f"--strategy: {exc}") from None
    for key, value in required.items():
        if key in train and train[key] != value:
            raise UsageError(f"--train {key}={train[key]!r} contradicts strategy {strategy}, which needs {value!r}")
        train[key] = value
    try:
        lora = {"r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout}
        if args.target_modules is not None:
            lora["target_modules"] = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
        spec = TaskSpec(
            base_model_id=args.base_model_id or args.base_model.name,
            base_model_sha256=model_fingerprint(args.base_model),
            lora=LoraSpec(**lora),
            model_config=json.loads(cfg_path.read_text()),
            train=train,
            strategy=strategy,
            strategy_options=strategy_options,
            metric_scoring=args.metric_scoring,
            norm_bound=args.norm_bound,
            report_metrics=not args.no_report_metrics,
            privacy=privacy,
        )
    except TaskSpecError as exc:
        raise UsageError(str(exc).replace("train:", "--train:", 1)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


def _create_task(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Coordinator, RewardToken, TaskParams
    from prismesh.chain.storage import add_adapter, open_store
    from prismesh.chain.taskspec import TaskSpec

    if not args.spec.is_file():
        raise CommandError(f"--spec {args.spec}: no such file (write one with `prismesh govern make-spec`)")
    spec = TaskSpec.from_bytes(args.spec.read_bytes(), where=str(args.spec))
    manifest, w3, acct = _open(args)
    store = open_store(args.store)
    spec_cid = store.add_bytes(spec.to_bytes())
    init_cid, init_sha = "", b""
    if args.initial_adapter:
        weights = args.initial_adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise CommandError(f"--initial-adapter {args.initial_adapter}: no adapter_model.safetensors")
        init_cid = add_adapter(store, args.initial_adapter)
        init_sha = hashlib.sha256(weights.read_bytes()).digest()
    unit = 10 ** RewardToken.read_only(manifest, w3).decimals()
    params = TaskParams.for_spec(
        spec,
        spec_cid,
        init_cid,
        init_sha,
        num_rounds=args.rounds,
        min_participants=args.min_participants,
        max_participants=args.max_participants,
        max_failed_rounds=args.max_failed_rounds,
        commit_duration=args.commit_seconds,
        reveal_duration=args.reveal_seconds,
        aggregation_duration=args.aggregation_seconds,
        reward_per_update=int(args.reward * unit),
        aggregator_reward=int(args.aggregator_reward * unit),
        sample_cap=args.sample_cap,
        weighting=args.weighting,
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
    from prismesh.cli.audit import chain_from_args

    with chain_from_args(args) as (manifest, w3, _store):
        print(json.dumps(_status_of(Coordinator.read_only(manifest, w3), args.task), indent=2))
    return 0


def _status_of(coord: Any, task: int | None) -> dict[str, Any]:
    if task is None:
        tasks = []
        for task_id in range(1, coord.task_count() + 1):
            state = coord.get_task(task_id)
            params = coord.get_task_params(task_id)
            tasks.append({
                "task": task_id,
                "status": state.status.name,
                "completed_rounds": state.completed_rounds,
                "num_rounds": params.num_rounds,
                "participants": state.participant_count,
            })
        return {"tasks": tasks}
    state = coord.get_task(task)
    params = coord.get_task_params(task)
    start = coord.manifest.deploy_block
    # History lives in events: CIDs, included clients, scores and rewards of every round.
    accepted = {ev.round: ev for ev in coord.get_events("AggregateAccepted", start, taskId=task)}
    earned: dict[int, dict[str, dict[str, int]]] = {}
    for ev in coord.get_events("RewardEarned", start, taskId=task):
        if not ev.is_aggregator:
            earned.setdefault(ev.round, {})[ev.recipient] = {"score": ev.score, "reward": ev.amount}
    rounds = []
    for r in range(1, state.current_round + 1):
        info = coord.get_round(task, r)
        acc = accepted.get(r)
        row: dict[str, Any] = {"round": r, "phase": info.phase.name}
        if r == state.current_round:
            row.update(commits=info.commit_count, reveals=info.reveal_count,
                       commit_deadline=info.commit_deadline, reveal_deadline=info.reveal_deadline,
                       aggregation_deadline=info.aggregation_deadline)
        row.update(aggregate_cid=acc.aggregate_cid if acc else "", included=list(acc.included) if acc else [],
                   rewards=earned.get(r, {}))
        rounds.append(row)
    return {
        "task": task,
        "status": state.status.name,
        "current_round": state.current_round,
        "completed_rounds": state.completed_rounds,
        "weighting": params.weighting.name.lower(),
        "sample_cap": params.sample_cap,
        "reward_budget": params.reward_budget,
        "rewards_paid": state.rewards_paid,
        "participants": coord.get_participants(task),
        "rounds": rounds,
    }
