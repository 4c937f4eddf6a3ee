"""Finality latency and certificate gas, measured side by side in one run.

1. Real anvil, committee thread on the wall clock (n = 4): for each of ``--txs`` transactions,
   the blocks and milliseconds from the block that holds it to the gadget marking it final;
   with no faults, with f = 1 silent validator, and durable (anvil's state written to disk
   before every certificate, as ``prismesh devnet`` runs it): the latency that durability adds,
   the dumps per certificate and the milliseconds per dump.
2. Seeded simulation (virtual clock, n = 4, a block every 0.5 s, delays 10-100 ms): latency in
   blocks, views and milliseconds from a block being mined to 2f + 1 replicas committing it;
   with no faults, with f silent, and with f Byzantine (equivocating, double-voting) validators.
3. Gas of one certificate submission (2f + 1 signatures) for n = 4 and n = 7.

Run: ``.venv/bin/python -m tests.benchmarks.bench_finality [--txs 8]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from prismesh.chain.evm.devnet import start_anvil
from prismesh.chain.finality.committee import Committee, SimConfig, devnet_validator_keys, simulate
from prismesh.chain.finality.gadget import (
    FinalityGadgetClient,
    deploy_gadget,
    generate_validator_keys,
    sign_certificate,
)


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):8.1f}  max {max(values):8.1f}"


def bench_anvil(
    txs: int, silent: list[int], durable: bool = False, dumps: dict | None = None
) -> tuple[list[float], list[float], list[int]]:
    from prismesh.chain.evm.devnet import StateDumper

    tmp = tempfile.TemporaryDirectory(prefix="prismesh-bench-")
    state = Path(tmp.name) / "anvil-state.json"
    dev = start_anvil(state_file=state if durable else None)
    try:
        keys = devnet_validator_keys(dev)
        gadget = deploy_gadget(dev.w3, [k.address for k in keys], dev.accounts[0])
        dumper = StateDumper(dev.w3, state) if durable else None
        committee = Committee(
            dev.w3, gadget, keys, dev.accounts[16], silent=silent, realtime=True, idle_interval=0.2,
            durability=dumper,
        )
        committee.start_thread()
        sender, receiver = dev.accounts[1], dev.accounts[2]
        ms, blocks = [], []
        try:
            for _ in range(txs):
                tx = {
                    "to": receiver.address,
                    "value": 1,
                    "gas": 21000,
                    "gasPrice": dev.w3.eth.gas_price,
                    "nonce": dev.w3.eth.get_transaction_count(sender.address),
                    "chainId": dev.w3.eth.chain_id,
                }
                signed = sender.sign_transaction(tx)
                t0 = time.perf_counter()
                receipt = dev.w3.eth.wait_for_transaction_receipt(
                    dev.w3.eth.send_raw_transaction(signed.raw_transaction)
                )
                height = receipt["blockNumber"]
                committee.wait_final(height, timeout=60)
                ms.append((time.perf_counter() - t0) * 1000)
                blocks.append(dev.w3.eth.block_number - height)
                time.sleep(0.3)
        finally:
            committee.stop()
        gas = [int(r["gasUsed"]) for _, r in committee.certificates]
        if dumper is not None and dumps is not None:
            dumps.update(count=dumper.count, certificates=len(committee.certificates),
                         ms=1000 * dumper.seconds / max(1, dumper.count), bytes=state.stat().st_size,
                         blocks=dev.block_number)
        return ms, [float(b) for b in blocks], gas
    finally:
        dev.stop()
        tmp.cleanup()


def bench_sim(faults: dict[int, str], seeds: int) -> tuple[list[float], list[float], list[float]]:
    """Per block: time, blocks mined and views begun between its mining and 2f + 1 commits."""
    ms, blocks, views = [], [], []
    for seed in range(seeds):
        cfg = SimConfig(n=4, seed=seed, faults=faults, duration=20.0, block_interval=0.5)
        res = simulate(cfg)
        quorum = min(3, len(res.honest))
        per_ep: dict[int, list[tuple[float, int]]] = {ep: [] for ep in res.honest}
        for rec in res.commits:
            if rec.endpoint in per_ep:
                per_ep[rec.endpoint].append((rec.time, rec.node.payload.height))
        view_times = sorted((v.time, v.view) for v in res.views)
        for block_hash, height in res.ledger.height_of.items():
            made = res.ledger.created_at[block_hash]
            if height == 0 or made > cfg.duration - 5:
                continue
            firsts = sorted(
                next((t for t, h in commits if h >= height), float("inf"))
                for commits in per_ep.values()
            )
            final = firsts[quorum - 1]
            if final == float("inf"):
                continue
            ms.append((final - made) * 1000)
            blocks.append(float(res.height_at(final) - height))
            begun = {v for t, v in view_times if made <= t <= final}
            views.append(float(len(begun)))
    return ms, blocks, views


def bench_gas() -> dict[int, int]:
    out = {}
    dev = start_anvil()
    try:
        for n in (4, 7):
            keys = generate_validator_keys(n, seed=n)
            address = deploy_gadget(dev.w3, [k.address for k in keys], dev.accounts[0])
            client = FinalityGadgetClient(dev.w3, address)
            dev.mine(2)
            height = dev.w3.eth.block_number - 1
            block_hash = bytes(dev.w3.eth.get_block(height)["hash"])
            quorum = client.quorum()
            cert = sign_certificate(keys[:quorum], dev.w3.eth.chain_id, address, height, block_hash, 3)
            out[n] = int(client.submit_certificate(cert, dev.accounts[0])["gasUsed"])
    finally:
        dev.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--txs", type=int, default=8, help="transactions per anvil scenario")
    parser.add_argument("--seeds", type=int, default=3, help="simulation schedules per scenario")
    args = parser.parse_args(argv)

    print("== anvil, committee thread (n = 4), latency from a tx's block to final ==")
    print(f"{'scenario':<22} {'ms':>34} {'blocks':>34}")
    anvil_gas: list[int] = []
    dumps: dict = {}
    medians = {}
    for name, silent, durable in (("no faults", [], False), ("durable (no faults)", [], True),
                                  ("f = 1 silent", [3], False)):
        ms, blocks, gas = bench_anvil(args.txs, silent, durable, dumps)
        anvil_gas += gas
        medians[name] = statistics.median(ms) if ms else float("nan")
        print(f"{name:<22} {_stats(ms):>34} {_stats(blocks):>34}")
    print(f"durability: {dumps['count']} state dumps for {dumps['certificates']} certificates, "
          f"{dumps['ms']:.1f} ms per dump ({dumps['bytes'] / 1e3:.0f} kB for {dumps['blocks']} blocks); "
          f"median latency {medians['durable (no faults)'] - medians['no faults']:+.1f} ms vs not durable "
          f"(ratio {medians['durable (no faults)'] / medians['no faults']:.2f})")

    print("\n== simulation (n = 4, block every 500 ms, delays 10-100 ms), block mined -> 2f+1 commit ==")
    print(f"{'scenario':<22} {'ms':>34} {'blocks':>34} {'views':>34}")
    scenarios = (
        ("no faults", {}),
        ("f = 1 silent", {3: "silent"}),
        ("f = 1 byzantine", {3: "byzantine"}),
    )
    for name, faults in scenarios:
        ms, blocks, views = bench_sim(faults, args.seeds)
        print(f"{name:<22} {_stats(ms):>34} {_stats(blocks):>34} {_stats(views):>34}")

    gas = bench_gas()
    print("\n== gas of one certificate submission (2f + 1 signatures) ==")
    for n, used in gas.items():
        print(f"n = {n} ({2 * ((n - 1) // 3) + 1} signatures): {used} gas")
    if anvil_gas:
        print(f"committee certificates above (n = 4): median {statistics.median(anvil_gas):.0f} gas")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
