"""Chain-side figures, measured side by side in one run.

    .venv/bin/python -m tests.benchmarks.bench_chain

* compile: a cold solc-js compile of contracts/ (fresh cache dir) vs. the cached lookup;
* devnet start: anvil process to first answer vs. the embedded py-evm chain;
* deploy: the three core contracts (+ gadget) on each chain;
* one 3-client round (3 commits, 3 reveals, 1 aggregate) through the typed client on each
  chain, with its gas (the same on both up to calldata: same bytecode, same fork rules; the
  commitments bind the chain id, so their zero bytes, at 4 gas instead of 16, differ);
* a transaction on anvil with its gas, fees and nonce asked in one JSON-RPC batch vs one
  web3 request each (``TxSender``'s two paths; a fresh anvil per run, runs alternating).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from prismesh.chain.evm.contracts import Coordinator, Registry, TaskParams, TxSender, Weighting
from prismesh.chain.evm.deploy import deploy_to_devnet
from prismesh.chain.evm.devnet import Devnet, start_anvil, start_embedded
from prismesh.chain.evm.toolchain import compile_contracts, repo_root


def _timed(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - tiny local helper
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _round(dev: Devnet) -> tuple[float, int, int]:
    manifest = deploy_to_devnet(dev, aggregators=[dev.accounts[1].address])
    gov, agg, clients = dev.accounts[0], dev.accounts[1], dev.accounts[2:5]
    reg, coord = Registry(manifest, dev.w3, gov), Coordinator(manifest, dev.w3, gov)
    for c in clients:
        reg.with_sender(c).register(b"\x01" * 32)
        reg.approve(c.address)
    params = TaskParams("m", b"\x02" * 32, "bafyhp", "", b"\x00" * 32, 3, 1, 2, 4, Weighting.SAMPLES, 1000,
                        600, 600, 600, 10, 3, 10_000)
    task = coord.task_id_from(coord.create_task(params))
    for c in clients:
        coord.with_sender(c).join_task(task)
    coord.start_task(task)
    t0 = time.perf_counter()
    gas = 0
    ups = [
        (c, f"bafyupdate{i}", bytes([i + 1]) * 32, 100 + i, bytes([9, i]) * 16)
        for i, c in enumerate(clients)
    ]
    for c, cid, sha, n, salt in ups:
        mine = coord.with_sender(c)
        gas += mine.commit_update(task, 1, mine.commitment_for(task, 1, cid, sha, n, salt))["gasUsed"]
    for c, cid, sha, n, salt in ups:
        gas += coord.with_sender(c).reveal_update(task, 1, cid, sha, n, salt)["gasUsed"]
    gas += coord.with_sender(agg).submit_aggregate(
        task, 1, "bafyagg", b"\x03" * 32, {c.address: 1_000_000 for c in clients}
    )["gasUsed"]
    return time.perf_counter() - t0, 7, gas


def _per_transaction_ms(batched: bool, n: int = 150) -> float:
    """Milliseconds a transaction (calldata and a value, as the clients send) takes on a fresh
    anvil, through one of ``TxSender``'s two paths."""
    dev = start_anvil()
    try:
        sender = TxSender(dev.w3, dev.accounts[1])
        sender._batched = batched
        tx = {"to": dev.accounts[2].address, "value": 1, "data": b"\x01" * 68}
        for _ in range(5):
            sender.send(tx)
        t0 = time.perf_counter()
        for _ in range(n):
            sender.send(tx)
        return (time.perf_counter() - t0) / n * 1000
    finally:
        dev.stop()


def main() -> None:
    root = repo_root()
    tmp = Path(tempfile.mkdtemp(prefix="prismesh-bench-"))
    try:
        (tmp / "node_modules").mkdir()
        for pkg in ("@openzeppelin", "solc"):
            (tmp / "node_modules" / pkg).symlink_to(root / "node_modules" / pkg)
        shutil.copytree(root / "contracts", tmp / "contracts")
        _, cold = _timed(compile_contracts, root=tmp, use_cache=False)
        _, warm = _timed(compile_contracts, root=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"compile contracts/: cold {cold:.2f} s, cached {warm * 1000:.1f} ms ({cold / warm:.0f}x)"
    )

    anvil, t_anvil = _timed(start_anvil)
    try:
        emb, t_emb = _timed(start_embedded)
        print(f"devnet start: anvil {t_anvil:.2f} s, embedded {t_emb:.2f} s")
        (sec_a, n, gas_a) = _round(anvil)
        (sec_e, _, gas_e) = _round(emb)
    finally:
        anvil.stop()
    print(
        f"one 3-client round ({n} transactions): anvil {sec_a:.2f} s ({sec_a / n * 1000:.0f} ms/tx), "
        f"embedded {sec_e:.2f} s ({sec_e / n * 1000:.0f} ms/tx), embedded/anvil {sec_e / sec_a:.1f}x"
    )
    print(f"gas of that round: anvil {gas_a:,}, embedded {gas_e:,} "
          f"(difference {gas_a - gas_e:+,}, a multiple of 12 from calldata zero bytes: {(gas_a - gas_e) % 12 == 0})")
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for batched in (True, False):
            runs[batched].append(_per_transaction_ms(batched))
    one, each = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"a transaction on anvil (median of 3 runs of 150): gas/fees/nonce in one batch {one:.2f} ms, "
          f"one request each {each:.2f} ms ({each / one:.2f}x)")


if __name__ == "__main__":
    main()
