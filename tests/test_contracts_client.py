"""The typed client covers every ABI function and event; mined failures are decoded too."""

from __future__ import annotations

import re

import pytest

from prismesh.chain.evm.contracts import (
    EVENT_CLASSES,
    Coordinator,
    EmptyDescriptor,
    Registry,
    RewardToken,
    TransactionFailed,
    TxSender,
    revert_class,
)
from prismesh.chain.evm.toolchain import compile_contracts
from tests.conftest import ChainEnv, open_task

CLIENTS = {"Registry": Registry, "Coordinator": Coordinator, "RewardToken": RewardToken}
# ABI names whose Python method reads better under another name.
ALIASES = {"DEFAULT_ADMIN_ROLE": "default_admin_role", "MAX_PARTICIPANTS": "max_participants"}


def _snake(name: str) -> str:
    if name.isupper() or "_" in name:
        return name.lower()
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_every_function_and_event_has_a_typed_counterpart(name: str) -> None:
    abi = compile_contracts()[name]["abi"]
    cls = CLIENTS[name]
    special = {"registry": "registry_address", "rewardToken": "reward_token_address"}
    missing = []
    for entry in abi:
        if entry["type"] == "function":
            method = (
                special.get(entry["name"]) or ALIASES.get(entry["name"]) or _snake(entry["name"])
            )
            if not callable(getattr(cls, method, None)):
                missing.append(f"{entry['name']} -> {method}")
        elif entry["type"] == "event" and entry["name"] not in EVENT_CLASSES:
            missing.append(f"event {entry['name']}")
        elif (
            entry["type"] == "error" and revert_class(entry["name"]).__module__ != "prismesh.chain.evm.contracts"
        ):
            missing.append(f"error {entry['name']}")
    assert not missing, missing


def test_mined_failures_are_decoded(chain_env: ChainEnv) -> None:
    """With an explicit gas limit no estimate runs first: the transaction is mined, fails, and
    the sender replays it to name the error (or reports the failure when there is none)."""
    acct = chain_env.clients[0]
    reg = Registry(chain_env.manifest, chain_env.w3, acct)
    sender = TxSender(chain_env.w3, acct, reg.decoder)
    data = reg.contract.encode_abi("register", args=[b"\x00" * 32])
    with pytest.raises(EmptyDescriptor) as exc:
        sender.send({"to": reg.address, "data": data, "gas": 100_000}, "Registry", "register")
    assert exc.value.contract == "Registry" and exc.value.function == "register"
    ok = reg.contract.encode_abi("register", args=[b"\x01" * 32])
    with pytest.raises(TransactionFailed) as exc:
        sender.send({"to": reg.address, "data": ok, "gas": 30_000}, "Registry", "register")
    assert exc.value.args["gas_used"] <= 30_000 and exc.value.args["tx_hash"].startswith("0x")
    assert reg.get_client(acct.address).descriptor_hash == b"\x00" * 32  # nothing was stored


def test_concurrent_senders_share_one_account(chain_env: ChainEnv) -> None:
    """Threads sending from one account get distinct nonces (all transactions land)."""
    from concurrent.futures import ThreadPoolExecutor

    gov = chain_env.registry()
    targets = chain_env.outsiders[:6]
    with ThreadPoolExecutor(max_workers=3) as pool:
        receipts = list(
            pool.map(
                lambda a: gov.with_sender(chain_env.governance).add_aggregator(a.address), targets
            )
        )
    assert all(r["status"] == 1 for r in receipts)
    assert all(gov.is_aggregator(a.address) for a in targets)


def _requests(w3, monkeypatch: pytest.MonkeyPatch) -> list:
    """Every request ``w3`` makes from now on, as it goes to the node: a method name, or a list
    of them for a batch."""
    seen: list = []
    single, batch = w3.manager._make_request, w3.provider.make_batch_request
    monkeypatch.setattr(w3.manager, "_make_request", lambda m, p: (seen.append(m), single(m, p))[1])
    monkeypatch.setattr(w3.provider, "make_batch_request",
                        lambda calls: (seen.append([m for m, _ in calls]), batch(calls))[1])
    return seen


def test_a_transaction_asks_for_gas_fees_and_nonce_in_one_batch(chain_env: ChainEnv, monkeypatch) -> None:
    """Over HTTP a transaction is one batch (estimate, latest block, pending nonce), the send and
    the receipt; a revert in the estimate is named and nothing is sent."""
    acct = chain_env.outsiders[0]
    reg = Registry(chain_env.manifest, chain_env.w3, acct)
    nonce = chain_env.w3.eth.get_transaction_count(acct.address)
    seen = _requests(chain_env.w3, monkeypatch)
    with pytest.raises(EmptyDescriptor):
        reg.register(b"\x00" * 32)
    assert seen == [["eth_estimateGas", "eth_getBlockByNumber", "eth_getTransactionCount"]]
    seen.clear()
    receipt = reg.register(b"\x07" * 32)
    assert seen[0] == ["eth_estimateGas", "eth_getBlockByNumber", "eth_getTransactionCount"]
    sent = [m for m in seen[1:] if m != "eth_chainId"]  # asked once per sender, then cached
    assert receipt["status"] == 1 and reg.get_client(acct.address).descriptor_hash == b"\x07" * 32
    assert sent[0] == "eth_sendRawTransaction" and set(sent[1:]) == {"eth_getTransactionReceipt"}
    tx = chain_env.w3.eth.get_transaction(receipt["transactionHash"])
    assert tx["nonce"] == nonce and tx["gas"] > receipt["gasUsed"] and tx["maxFeePerGas"] > 0


def test_a_node_without_batches_gets_one_request_each(chain_env: ChainEnv, monkeypatch) -> None:
    """A node that answers a batch with one error (batches unsupported) gets web3's requests
    one by one from then on; the transaction lands all the same. Other failures of a batched
    request are raised as web3 raises them, naming the request."""
    from eth_account import Account
    from web3.exceptions import Web3RPCError

    acct = chain_env.outsiders[1]
    sender = TxSender(chain_env.w3, acct)
    refused = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "batch requests are not supported"}}
    monkeypatch.setattr(chain_env.w3.provider, "make_batch_request", lambda calls: refused)
    receipt = sender.send({"to": chain_env.outsiders[2].address, "value": 1})
    assert receipt["status"] == 1 and sender._batched is False
    monkeypatch.undo()
    broke = TxSender(chain_env.w3, Account.create())  # no ether for the value: the send says so
    with pytest.raises(Web3RPCError, match="Insufficient funds"):
        broke.send({"to": acct.address, "value": 10**18})
    lost = [{"jsonrpc": "2.0", "id": 0, "error": {"code": -32000, "message": "header not found"}},
            {"jsonrpc": "2.0", "id": 1, "result": hex(7)}]
    monkeypatch.setattr(chain_env.w3.provider, "make_batch_request", lambda calls: lost)
    with pytest.raises(Web3RPCError) as exc:
        TxSender(chain_env.w3, acct).send({"to": acct.address, "value": 1, "maxFeePerGas": 10**10,
                                           "maxPriorityFeePerGas": 10**9})
    assert exc.value.message == "eth_estimateGas: header not found"


def _sample_args(entry: dict, addresses: list[str], task: int) -> list:
    """Arguments of each ABI input type: a live address, the open task (round 1), a role id."""
    values = {"address": addresses, "uint256": [task], "uint32": [1], "string": ["accuracy"],
              "bytes32": [b"\x00" * 32], "bytes4": [bytes.fromhex("01ffc9a7")]}
    args = []
    for i, p in enumerate(entry["inputs"]):
        choices = values[p["type"]]
        args.append(choices[i % len(choices)])
    return args


@pytest.mark.parametrize("env", ["chain_env", "embedded_env"])
def test_direct_reads_return_what_web3s_contract_call_returns(env: str, request: pytest.FixtureRequest) -> None:
    """Every view function, read through the client's own encoder (``_call``), gives exactly
    web3's answer (structs, lists, checksummed addresses, bytes, enums as ints) on anvil and on
    the embedded chain, and a read web3 refuses is refused too."""
    chain_env: ChainEnv = request.getfixturevalue(env)
    clients = chain_env.clients[:2]
    task = open_task(chain_env, clients)
    addresses = [clients[0].address, chain_env.governance.address]
    checked = 0
    for name, cls in CLIENTS.items():
        client = cls.read_only(chain_env.manifest, chain_env.w3)
        for entry in client.abi:
            if entry["type"] != "function" or entry["stateMutability"] not in ("view", "pure"):
                continue
            args = _sample_args(entry, addresses, task)
            try:
                expected = getattr(client.contract.functions, entry["name"])(*args).call()
            except Exception:  # noqa: BLE001 - a read web3 refuses must fail here too
                with pytest.raises(Exception):  # noqa: B017
                    client._call(entry["name"], *args)
                continue
            assert entry["name"] in client._views, f"{name}.{entry['name']} is not read directly"
            got = client._call(entry["name"], *args)
            assert got == expected and type(got) is type(expected), f"{name}.{entry['name']}{tuple(args)}"
            checked += 1
    assert checked >= 30
    coord = chain_env.coordinator()
    assert coord.is_participant(task, clients[0].address) and coord.get_task_params(task).num_rounds >= 1
    with pytest.raises(Exception, match="feesOwed"):  # a wrong argument count is named by web3
        coord._call("feesOwed", task, clients[0].address)


def test_a_receipt_is_awaited_with_a_short_back_off_and_a_lost_one_times_out() -> None:
    """A transaction mined late is found soon after it is mined (asked for at once, then ever
    less often, at most 50 ms apart); one never mined raises TimeExhausted naming its hash."""
    import threading
    import time

    from web3.exceptions import TimeExhausted

    from prismesh.chain.evm.contracts import await_receipt
    from prismesh.chain.evm.devnet import start_anvil

    with start_anvil() as dev:
        w3 = dev.w3
        w3.provider.make_request("evm_setAutomine", [False])
        asked: list[float] = []
        real = w3.provider.make_request

        def counted(method, params):
            if method == "eth_getTransactionReceipt":
                asked.append(time.monotonic())
            return real(method, params)

        w3.provider.make_request = counted
        tx = w3.eth.send_transaction({"from": dev.accounts[0].address, "to": dev.accounts[1].address, "value": 1})
        timer = threading.Timer(0.3, lambda: real("evm_mine", []))
        timer.start()
        receipt = await_receipt(w3, tx, timeout=10)
        timer.join()
        assert receipt["status"] == 1 and receipt["blockNumber"] == 1
        gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
        assert 5 <= len(asked) <= 30, len(asked)
        assert max(gaps) < 0.5 and gaps[-1] > gaps[0]  # growing, never a long fixed wait
        lost = w3.eth.send_transaction({"from": dev.accounts[2].address, "to": dev.accounts[1].address, "value": 1})
        with pytest.raises(TimeExhausted, match=bytes(lost).hex()):
            await_receipt(w3, lost, timeout=0.2)
