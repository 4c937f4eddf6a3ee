"""How often anvil answers a torn ``anvil_dumpState`` under load, and that none is ever written.

Four threads send transfers to one real anvil as fast as it mines them while the main thread
dumps ``--dumps`` times, twice per step: once raw (the answer checked with
``anvil_dump_inconsistency`` and thrown away) and once through ``dump_anvil_state`` (which asks
again until the dump is whole, holding mining after three torn answers, then writes it). Prints
the block rate, the torn raw answers, the requests the checked dumps needed, how many held
mining, the torn files written (must be 0) and the milliseconds per dump.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_dump_race [--dumps 100]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from prismesh.chain.evm.devnet import (
    anvil_dump_inconsistency,
    dump_anvil_state,
    request_anvil_dump,
    start_anvil,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dumps", type=int, default=100)
    ap.add_argument("--senders", type=int, default=4)
    args = ap.parse_args()
    dev = start_anvil()
    w3 = dev.w3
    stop = threading.Event()

    def send(i: int) -> None:
        sender, to = dev.accounts[i].address, dev.accounts[(i + 1) % args.senders].address
        while not stop.is_set():
            w3.eth.send_transaction({"from": sender, "to": to, "value": 1})

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(args.senders)]
    requests = held = 0
    real = w3.provider.make_request

    def counted(method, params):  # type: ignore[no-untyped-def]
        nonlocal requests, held
        requests += method == "anvil_dumpState"
        held += method == "evm_setAutomine" and params == [False]
        return real(method, params)

    torn_raw = torn_written = 0
    seconds = 0.0
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        first, started = w3.eth.block_number, time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.json"
            for _ in range(args.dumps):
                torn_raw += anvil_dump_inconsistency(json.loads(request_anvil_dump(w3))) is not None
                w3.provider.make_request = counted  # type: ignore[method-assign]
                start = time.perf_counter()
                dump_anvil_state(w3, path)
                seconds += time.perf_counter() - start
                w3.provider.make_request = real  # type: ignore[method-assign]
                torn_written += anvil_dump_inconsistency(json.loads(path.read_text())) is not None
            head = w3.eth.block_number
            rate = (head - first) / (time.perf_counter() - started)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        dev.stop()
    print(f"{args.dumps} dumps of a chain growing to block {head} ({args.senders} senders, {rate:.0f} blocks/s)")
    print(f"raw anvil_dumpState answers torn:          {torn_raw} of {args.dumps}")
    print(f"checked dumps: requests / dumps            {requests} / {args.dumps} = {requests / args.dumps:.2f}")
    print(f"checked dumps with mining held:            {held} of {args.dumps}")
    print(f"checked dumps written torn:                {torn_written}")
    print(f"ms per checked dump (mean):                {1000 * seconds / args.dumps:.1f}")
    return 1 if torn_written else 0


if __name__ == "__main__":
    raise SystemExit(main())
