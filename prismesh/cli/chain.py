"""``prismesh devnet | deploy | gas-report``: the chain side of the command line."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prismesh.cli.errors import CommandError, UsageError
from prismesh.cli.output import add_daemon_output_arguments

DEFAULT_DEVNET_DIR = Path(".prismesh") / "devnet"


def register(subparsers: Any) -> None:
    """Add the chain subcommands to the ``prismesh`` parser."""
    p = subparsers.add_parser(
        "devnet",
        help="start anvil, deploy the contracts (once) and print the manifest path",
        description="Start a local anvil devnet whose state persists in --state, deploy the "
        "PrisMesh contracts unless the manifest already points at live ones, and run until "
        "interrupted (or --detach). Account 0 is governance, account 1 the aggregator.",
    )
    p.add_argument("--port", type=int, default=8545, help="RPC port (default 8545)")
    p.add_argument("--chain-id", type=int, default=31337)
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="anvil state file (default .prismesh/devnet/anvil-state.json)",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="manifest path (default .prismesh/deployments/<chain id>.json)",
    )
    p.add_argument(
        "--block-time",
        type=float,
        default=None,
        help="seconds per block (default: mine on each transaction)",
    )
    p.add_argument(
        "--validators",
        default="4",
        help="finality validators: a count N (dev accounts 16..16+N-1) or comma-separated addresses; 0 for none",
    )
    p.add_argument("--fresh", action="store_true", help="discard the saved state and deploy anew")
    p.add_argument(
        "--no-deploy",
        action="store_true",
        help="start anvil only, for a deployment of your own (e.g. `brownie run scripts/deploy.py "
        "--network anvil`, then `prismesh committee --manifest M` for its finality)",
    )
    p.add_argument(
        "--no-finality",
        action="store_true",
        help="do not run the HotStuff committee (nothing becomes final; for quick experiments)",
    )
    p.add_argument(
        "--detach", action="store_true", help="leave anvil running in the background and exit"
    )
    p.add_argument("--stop", action="store_true", help="stop a detached devnet (state is saved)")
    p.set_defaults(func=cmd_devnet)

    d = subparsers.add_parser(
        "deploy",
        help="deploy the contracts with web3.py and write the manifest",
        description="Deploy Registry, RewardToken, Coordinator (and FinalityGadget with "
        "--validators) to an RPC endpoint. The deployer becomes governance unless --governance "
        "hands it to another account (e.g. a multisig); the admin role then moves only in two "
        "steps, --admin-delay seconds apart. Only the Coordinator can ever mint rewards.",
    )
    d.add_argument("--rpc-url", default=os.environ.get("PRISMESH_RPC_URL", "http://127.0.0.1:8545"))
    d.add_argument(
        "--key",
        default=None,
        help="deployer: dev:N, a 0x private key, or a keystore file (default dev:0 on a devnet chain id)",
    )
    d.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="output path (default .prismesh/deployments/<chain id>.json)",
    )
    d.add_argument(
        "--validators",
        default="0",
        help="a count N (dev accounts 16..) or comma-separated addresses; 0 for no finality gadget",
    )
    d.add_argument(
        "--aggregator",
        action="append",
        default=[],
        help="address granted the aggregator role (repeatable)",
    )
    d.add_argument(
        "--governance",
        default=None,
        help="address that receives the admin and governance roles (default: the deployer)",
    )
    d.add_argument(
        "--admin-delay",
        type=int,
        default=None,
        help="seconds between beginning and accepting an admin transfer (default two days)",
    )
    d.add_argument(
        "--kind",
        default=None,
        help="manifest kind (default: anvil for a devnet chain id, else rpc)",
    )
    d.set_defaults(func=cmd_deploy)

    c = subparsers.add_parser(
        "committee",
        help="run the HotStuff finality committee of a deployment beside its chain",
        description="Run n = 3f+1 devnet validators over the chain's blocks and post their commit "
        "certificates to the deployment's FinalityGadget, until interrupted. `prismesh devnet` "
        "starts one itself; this is for chains deployed by other means (brownie, a detached devnet).",
    )
    c.add_argument("--rpc-url", default=os.environ.get("PRISMESH_RPC_URL", "http://127.0.0.1:8545"))
    c.add_argument("--manifest", type=Path, required=True, help="deployment manifest naming the gadget")
    c.add_argument("--validators", type=int, default=4, help="committee size n = 3f+1 (devnet keys)")
    c.add_argument("--state", type=Path, default=None,
                   help="anvil's state file, written before every certificate (final implies durable)")
    c.add_argument("--silent", default="", help="comma-separated validator indices kept down (fault drills)")
    add_daemon_output_arguments(c)
    c.set_defaults(func=cmd_committee)

    g = subparsers.add_parser(
        "gas-report",
        help="measure gas per external call on anvil (3 and 32 clients) beside the targets",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=Path("docs") / "gas.md",
        help="markdown output (default docs/gas.md)",
    )
    g.add_argument("--no-write", action="store_true", help="print only")
    g.set_defaults(func=cmd_gas_report)

    c = subparsers.add_parser(
        "claim",
        help="mint the rewards a key earned (a participant's per task, an aggregator's fees)",
        description="Rewards accrue on chain as rounds are accepted and are minted when claimed. "
        "Node daemons claim once a task is over and the aggregator daemon when a task completes; "
        "this claims by hand. Without --task or --fees it claims everything the key is owed.",
    )
    c.add_argument("--manifest", type=Path, required=True, help="deployment manifest")
    c.add_argument("--rpc-url", default=None, help="override the manifest's RPC URL")
    c.add_argument("--account", required=True, help="the earning key: dev:N, 0x key or keystore path")
    c.add_argument("--task", type=int, action="append", default=[], help="claim this task's rewards (repeatable)")
    c.add_argument("--fees", action="store_true", help="claim aggregator fees")
    c.set_defaults(func=cmd_claim)


def _validators(spec: str) -> list[str]:
    from eth_utils import is_address, to_checksum_address

    from prismesh.chain.evm.devnet import dev_accounts

    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if n == 0:
            return []
        return [a.address for a in dev_accounts(16 + n)[16 : 16 + n]]
    out = []
    for part in spec.split(","):
        if not is_address(part.strip()):
            raise UsageError(f"--validators: {part!r} is neither a count nor an address")
        out.append(to_checksum_address(part.strip()))
    return out


def cmd_deploy(args: argparse.Namespace) -> int:
    from eth_utils import is_address

    from prismesh.chain.evm.deploy import deploy
    from prismesh.chain.evm.devnet import DEV_CHAIN_IDS, http_web3
    from prismesh.chain.evm.manifest import default_manifest_path
    from prismesh.chain.identity import IdentityError, load_account

    w3 = http_web3(args.rpc_url)
    try:
        chain_id = int(w3.eth.chain_id)
    except Exception as exc:  # noqa: BLE001 - any failure to answer means no chain there
        raise CommandError(
            f"no chain answers at {args.rpc_url} ({type(exc).__name__}); start one with `prismesh devnet`"
        ) from None
    key = args.key
    if key is None:
        if chain_id not in DEV_CHAIN_IDS:
            raise UsageError(f"chain {chain_id} is not a devnet: pass the deployer's key with --key")
        key = "dev:0"
    try:
        deployer = load_account(key)
    except IdentityError as exc:
        raise CommandError(f"--key: {exc}") from None
    kind = args.kind or ("anvil" if chain_id in DEV_CHAIN_IDS else "rpc")
    path = args.manifest or default_manifest_path(chain_id)
    if args.governance is not None and not is_address(args.governance):
        raise UsageError(f"--governance: {args.governance!r} is not an address")
    if args.admin_delay is not None and args.admin_delay < 0:
        raise UsageError("--admin-delay must be zero or more seconds")
    extra: dict[str, Any] = {}
    if args.admin_delay is not None:
        extra["admin_delay"] = args.admin_delay
    manifest = deploy(
        w3,
        deployer,
        governance=args.governance,
        **extra,
        validators=_validators(args.validators) or None,
        aggregators=args.aggregator,
        kind=kind,
        rpc_url=args.rpc_url,
        manifest_path=path,
    )
    for name, addr in manifest.addresses.items():
        print(f"{name:16s} {addr}")
    print(f"manifest: {path}")
    return 0


def _pid_file(state: Path) -> Path:
    return state.parent / "anvil.pid"


def _committee_pid_file(state: Path) -> Path:
    return state.parent / "committee.pid"


def _committee_size(args: argparse.Namespace, manifest: Any) -> int | None:
    """The committee size when the devnet's own validator keys back the gadget, else None."""
    if args.no_finality or not manifest.finality_gadget:
        return None
    spec = str(args.validators).strip()
    if not spec.isdigit() or int(spec) == 0:
        print("note: validators given as addresses; start their committee yourself", file=sys.stderr)
        return None
    return int(spec)


def cmd_devnet(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.deploy import deploy_to_devnet
    from prismesh.chain.evm.devnet import start_anvil
    from prismesh.chain.evm.manifest import default_manifest_path, is_deployed, load_manifest

    state = (args.state or DEFAULT_DEVNET_DIR / "anvil-state.json").resolve()
    pid_file = _pid_file(state)
    if args.stop:
        _stop_detached(_committee_pid_file(state), quiet=True)
        _dump_detached(pid_file, state)
        return _stop_detached(pid_file)
    manifest_path = (args.manifest or default_manifest_path(args.chain_id)).resolve()
    if pid_file.exists():
        pid = int(pid_file.read_text().split()[0])
        if _alive(pid):
            if args.detach and not args.fresh:
                return _restart_committee(args, state, manifest_path, pid)
            raise CommandError(
                f"a detached devnet (pid {pid}) already runs; stop it first with `prismesh devnet --stop`"
            )
        pid_file.unlink()
        print(f"note: the detached anvil (pid {pid}) is gone; restarting it from {state}")
    if args.fresh:
        state.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)
    dev = start_anvil(
        state_file=state, port=args.port, chain_id=args.chain_id, block_time=args.block_time
    )
    committee = None
    try:
        if args.no_deploy:
            return _serve_bare(args, dev, state, pid_file)
        manifest = None
        if manifest_path.exists():
            try:
                manifest = load_manifest(manifest_path)
                if not is_deployed(manifest, dev.w3):
                    manifest = None
            except Exception:
                manifest = None
        if manifest is not None and manifest.rpc_url != dev.rpc_url:
            # the same chain restored on another port: the manifest must point where it runs now
            from dataclasses import replace

            manifest = replace(manifest, rpc_url=dev.rpc_url)
            manifest.save(manifest_path)
        if manifest is None:
            manifest = deploy_to_devnet(
                dev,
                validators=_validators(args.validators) or None,
                aggregators=[dev.accounts[1].address],
                manifest_path=manifest_path,
            )
            print("deployed:")
        else:
            print("contracts already deployed (state restored):")
        for name, addr in manifest.addresses.items():
            print(f"  {name:16s} {addr}")
        print(f"rpc:       {dev.rpc_url} (chain id {dev.chain_id}, block {dev.block_number})")
        print(f"state:     {state}")
        print(f"manifest:  {manifest_path}")
        print(
            f"governance {dev.accounts[0].address} (dev:0), aggregator {dev.accounts[1].address} (dev:1)"
        )
        sys.stdout.flush()
        n_validators = _committee_size(args, manifest)
        if args.detach:
            pid = dev.detach()
            pid_file.write_text(f"{pid} {dev.port}\n")
            running = _pid_from(_committee_pid_file(state))
            if n_validators and running is not None and _alive(running):
                # The committee outlived anvil: it waits for the chain and resumes by itself.
                print(f"finality: HotStuff committee already running (pid {running})")
            elif n_validators:
                _spawn_committee(dev.rpc_url, manifest_path, n_validators, state)
            print(f"detached (pid {pid}); stop with `prismesh devnet --stop`")
            return 0
        if n_validators:
            from prismesh.chain.finality.committee import (
                devnet_validator_keys,
                start_committee_thread,
            )

            committee = start_committee_thread(
                dev, manifest.to_json(), keys=devnet_validator_keys(n=n_validators)
            )
            print(f"finality: HotStuff committee of {n_validators} validators running beside anvil")
        else:
            print("finality: off (no committee; nothing becomes final)")
        print("running; Ctrl-C stops it (state is saved)")
        sys.stdout.flush()
        stop = {"now": False}

        def _handler(signum: int, frame: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, _handler)
        try:
            while not stop["now"] and dev.healthy():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    finally:
        if committee is not None:
            committee.stop()
        if not args.detach:
            dev.stop()
    print("devnet stopped")
    return 0


def _serve_bare(args: argparse.Namespace, dev: Any, state: Path, pid_file: Path) -> int:
    """``--no-deploy``: anvil alone (its state kept), for a deployment made by another tool."""
    print(f"rpc:       {dev.rpc_url} (chain id {dev.chain_id}, block {dev.block_number})")
    print(f"state:     {state}")
    print("no contracts deployed by this command; finality: start `prismesh committee` once deployed")
    if args.detach:
        pid = dev.detach()
        pid_file.write_text(f"{pid} {dev.port}\n")
        print(f"detached (pid {pid}); stop with `prismesh devnet --stop`")
        return 0
    print("running; Ctrl-C stops it (state is saved)", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and dev.healthy():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_committee(args: argparse.Namespace) -> int:
    from prismesh.chain.finality.committee import main as committee_main

    argv = ["--rpc", args.rpc_url, "--manifest", str(args.manifest), "--validators", str(args.validators)]
    if args.silent:
        argv += ["--silent", args.silent]
    argv += ["--log-format", args.log_format]
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port), "--metrics-host", args.metrics_host or "127.0.0.1"]
    if args.state is not None:
        argv += ["--state", str(args.state)]
    if getattr(args, "debug", False):
        argv.append("--debug")
    return int(committee_main(argv) or 0)


def _spawn_committee(rpc_url: str, manifest_path: Path, n_validators: int, state: Path) -> int:
    log_path = state.parent / "committee.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismesh.chain.finality.committee", "--rpc", rpc_url,
         "--manifest", str(manifest_path), "--validators", str(n_validators), "--state", str(state)],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    _committee_pid_file(state).write_text(f"{proc.pid}\n")
    print(f"finality: HotStuff committee of {n_validators} (pid {proc.pid}, log {log_path})")
    return proc.pid


def _restart_committee(args: argparse.Namespace, state: Path, manifest_path: Path, anvil_pid: int) -> int:
    """`prismesh devnet --detach` with anvil still running: bring back a committee that died."""
    from prismesh.chain.evm.manifest import load_manifest

    running = _pid_from(_committee_pid_file(state))
    if running is not None and _alive(running):
        raise CommandError(
            f"a detached devnet (anvil pid {anvil_pid}, committee pid {running}) already runs; "
            "stop it first with `prismesh devnet --stop`"
        )
    port = int(_pid_file(state).read_text().split()[1])
    n_validators = _committee_size(args, load_manifest(manifest_path))
    if not n_validators:
        raise CommandError(f"a detached devnet (pid {anvil_pid}) already runs without a committee")
    print(f"anvil already runs (pid {anvil_pid}); its committee is gone: starting a new one")
    _spawn_committee(f"http://127.0.0.1:{port}", manifest_path, n_validators, state)
    return 0


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _dump_detached(pid_file: Path, state: Path) -> None:
    """Write the detached anvil's state durably before it is asked to stop."""
    from prismesh.chain.evm.devnet import dump_anvil_state, http_web3

    try:
        port = int(pid_file.read_text().split()[1])
        dump_anvil_state(http_web3(f"http://127.0.0.1:{port}", timeout=30), state)
    except Exception as exc:  # noqa: BLE001 - the state of the last certificate is on disk anyway
        print(f"note: could not write the final state ({type(exc).__name__}); "
              "the state of the last certificate is kept", file=sys.stderr)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a killed process left unreaped (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stop_detached(pid_file: Path, quiet: bool = False) -> int:
    if not pid_file.exists():
        if not quiet:
            raise CommandError(f"no detached devnet to stop ({pid_file} is missing)")
        return 1
    pid = int(pid_file.read_text().split()[0])
    if _alive(pid):
        os.kill(pid, signal.SIGINT)
        for _ in range(150):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    print(f"stopped {pid_file.stem} pid {pid}")
    return 0


def cmd_gas_report(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.gas import run_gas_report, write_report

    report = run_gas_report()
    text = report.markdown()
    print(text)
    if not args.no_write:
        write_report(report, args.out)
        print(f"written to {args.out}", file=sys.stderr)
    over = [f"{n} clients: {what} {gas:,} > {target:,}" for what, gas, target, n in report.target_rows() if gas > target]
    if over:
        raise CommandError("gas over target: " + "; ".join(over))
    return 0



def cmd_claim(args: argparse.Namespace) -> int:
    from prismesh.chain.evm.contracts import Coordinator, RewardToken
    from prismesh.chain.evm.manifest import connect_with
    from prismesh.chain.identity import IdentityError, load_daemon_account

    manifest, w3 = connect_with(args.manifest, args.rpc_url)
    try:
        account = load_daemon_account(args.account)
    except IdentityError as exc:
        raise CommandError(f"--account: {exc}") from None
    coord = Coordinator(manifest, w3, account)
    everything = not args.task and not args.fees
    tasks = args.task or (list(range(1, coord.task_count() + 1)) if everything else [])
    claimed = 0
    for task in tasks:
        owed = coord.rewards_owed(task, account.address)
        if owed:
            coord.claim_rewards(task)
            print(f"task {task}: claimed {owed} reward units")
            claimed += owed
        elif args.task:
            print(f"task {task}: nothing to claim")
    if args.fees or everything:
        owed = coord.fees_owed(account.address)
        if owed:
            coord.claim_fees()
            print(f"aggregator fees: claimed {owed} reward units")
            claimed += owed
        elif args.fees:
            print("aggregator fees: nothing to claim")
    token = RewardToken.read_only(manifest, w3)
    print(f"{account.address}: balance {token.balance_of(account.address)} (claimed {claimed} now)")
    return 0
