"""The dashboard over a long chain: page load time and server CPU, first paint, and the latency
from an event becoming final to the page showing it.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_dashboard [--tasks 100 --rounds 10]

1. A consortium history is written on the embedded chain through the real contracts (3 hospitals,
   ``--tasks`` tasks of ``--rounds`` rounds: commits, reveals, aggregates with rewards, accuracy
   reports; the HotStuff committee finalizes after every task; stand-in adapters in the store).
2. The dashboard (in this process, as ``prismesh dashboard`` runs it) reads it from cold: the time
   and CPU to index every final event and to read every round's gas.
3. Page loads from a separate client process (its CPU is not the server's): each distinct page
   once (rendered) and again (served from the page cache), with the server's CPU per request.
4. A real Chromium (Debian's, through Playwright): first contentful paint and load of the task
   list and of a task page.
5. Live updates: a new task is played step by step; after each step the committee finalizes it,
   and the time until the open tasks page shows the new phase (no reload) is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from prismesh.chain.evm.deploy import deploy_to_devnet
from prismesh.chain.evm.devnet import start_anvil, start_embedded
from prismesh.chain.finality.committee import devnet_validator_keys, in_process_committee
from prismesh.chain.storage import open_store
from prismesh.dashboard.server import BackgroundServer
from prismesh.dashboard.service import open_dashboard
from tests.benchmarks.dashboard_history import (
    AGGREGATOR,
    FIRST_CLIENT,
    build_history,
    create_task,
    fast,
    stand_in_adapter,
)

CLIENT = r"""
import json, sys, time, urllib.request
base, paths, repeat = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(repeat):
    for p in paths:
        t = time.perf_counter()
        with urllib.request.urlopen(base + p, timeout=120) as r:
            body = r.read()
            assert r.status == 200, (p, r.status)
        out.append([p, time.perf_counter() - t, len(body)])
print(json.dumps(out))
"""


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else "?"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def fetch(url: str, paths: list[str], repeat: int = 1) -> tuple[list[tuple[str, float, int]], float, float]:
    """Timings from a client process; returns them, the wall time and the server CPU used."""
    c0, t0 = cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CLIENT, url, json.dumps(paths), str(repeat)],
                         check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout), time.perf_counter() - t0, cpu() - c0


def describe(label: str, rows: list, wall: float, server_cpu: float) -> None:
    ms = [t * 1000 for _, t, _ in rows]
    size = statistics.mean(n for _, _, n in rows) / 1024
    print(f"  {label:<38} n={len(rows):>4}  median {statistics.median(ms):7.1f} ms  p95 {pct(ms, 0.95):7.1f} ms  "
          f"max {max(ms):7.1f} ms  | server CPU {1000 * server_cpu / len(rows):6.1f} ms/request  "
          f"({100 * server_cpu / wall:3.0f} % of a core)  | {size:5.1f} KiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--live-rounds", type=int, default=3, help="rounds of the task played live (step 5)")
    parser.add_argument("--poll", type=float, default=0.5, help="the dashboard's poll interval (its default)")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--chain", choices=("embedded", "anvil"), default="embedded",
                        help="where the history is written (anvil: to compare the cold index)")
    args = parser.parse_args(argv)
    print(f"dashboard benchmark: {args.tasks} tasks x {args.rounds} rounds, 3 hospitals, {args.chain} chain; "
          f"{os.cpu_count()} CPUs, load {load()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    root = Path(tempfile.mkdtemp(prefix="prismesh-bench-dashboard-"))
    dev = start_embedded() if args.chain == "embedded" else start_anvil()
    keys = devnet_validator_keys(n=4)
    manifest = deploy_to_devnet(dev, validators=[k.address for k in keys], aggregators=[dev.accounts[1].address])
    committee = in_process_committee(dev, manifest.to_json(), keys=keys)
    store = open_store(f"embedded:{root / 'ipfs'}")

    # 1. the history
    t0, c0 = time.perf_counter(), cpu()

    def progress(task: int) -> None:
        if task % 10 == 0:
            print(f"    task {task}/{args.tasks} written ({time.perf_counter() - t0:.0f} s)", flush=True)

    history = build_history(dev, manifest, store, committee, tasks=args.tasks, rounds=args.rounds, progress=progress)
    gen = time.perf_counter() - t0
    head = int(dev.w3.eth.block_number)
    print(f"1. history: {history.transactions} transactions, {head} blocks, final height {committee.final_height}, "
          f"{len(committee.certificates)} certificates; written in {gen:.0f} s ({cpu() - c0:.0f} s CPU)")

    # 2. cold index
    lock = threading.RLock()
    dash = open_dashboard(dev.w3, manifest, store, chain_lock=lock, descriptors=history.descriptors,
                          poll_interval=args.poll)
    t0, c0 = time.perf_counter(), cpu()
    dash.refresh()
    while not dash.index.caught_up:  # a batch of blocks per refresh, as the server's thread does
        dash.refresh()
    events = time.perf_counter() - t0
    while any(dash.index.gas_of(r)[1] for t in dash.index.tasks.values() for r in t.rounds.values()):
        dash.refresh()
    index_s, index_cpu = time.perf_counter() - t0, cpu() - c0
    print(f"2. cold index: {dash.index.events_seen} final events read in {events:.1f} s; with every round's gas "
          f"{index_s:.1f} s ({index_cpu:.1f} s CPU); afterwards a refresh with nothing new takes ", end="")
    t1 = time.perf_counter()
    for _ in range(10):
        dash.refresh()
    print(f"{100 * (time.perf_counter() - t1):.1f} ms")

    server = BackgroundServer(dash)
    url = server.start()
    try:
        # the stored objects a task page names are verified in the background on first view;
        # read every task page once so what follows measures page serving, then let that settle
        tasks = history.tasks
        task_paths = [f"/tasks/{t}" for t in tasks]
        list_paths = [f"/?page={p}" for p in range(1, (len(tasks) + 24) // 25 + 1)]
        other = ["/hospitals", "/finality"]
        # 3. page loads
        print(f"3. page loads from a client process (server: this process; dashboard key {dash.key})")
        idle_c0, idle_t0 = cpu(), time.perf_counter()
        time.sleep(3)
        idle = (cpu() - idle_c0) / (time.perf_counter() - idle_t0)
        rows, wall, used = fetch(url, list_paths + other)
        describe("task lists + hospitals + finality, cold", rows, wall, used)
        rows, wall, used = fetch(url, task_paths)
        describe("task pages (10 rounds each), cold", rows, wall, used)
        t_settle = time.perf_counter()
        while dash.checker._queue and time.perf_counter() - t_settle < 600:
            time.sleep(0.2)
        print(f"     (stored objects named on those pages verified in the background in "
              f"{time.perf_counter() - t_settle:.1f} s more)")
        rows, wall, used = fetch(url, task_paths)
        describe("task pages, objects verified, re-rendered", rows, wall, used)
        rows, wall, used = fetch(url, list_paths + other + task_paths, repeat=3)
        describe("every page again (page cache)", rows, wall, used)
        print(f"     idle server (index refresh every {args.poll} s, nothing new): {100 * idle:.1f} % of a core")

        # 4 and 5 in a real browser
        if not args.no_browser:
            browser_figures(dev, manifest, store, committee, history, dash, lock, url, args)
    finally:
        server.stop()
        dev.stop()
    print(f"load at the end: {load()}")
    return 0


def browser_figures(dev, manifest, store, committee, history, dash, lock, url, args) -> None:  # noqa: ANN001
    from playwright.sync_api import sync_playwright

    from prismesh.chain.evm.contracts import Coordinator

    chromium = os.environ.get("PRISMESH_CHROMIUM") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        print("4. first paint in Chromium (median of 5 fresh loads)")
        for path in ("/", f"/tasks/{history.tasks[-1]}", "/finality"):
            fcp, loaded = [], []
            for _ in range(5):
                page.goto("about:blank")
                page.goto(url + path, wait_until="load")
                page.wait_for_function("() => performance.getEntriesByName('first-contentful-paint').length > 0",
                                       timeout=10_000)
                fcp.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime"))
                loaded.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
            print(f"  {path:<12} first contentful paint {statistics.median(fcp):6.0f} ms, load event "
                  f"{statistics.median(loaded):6.0f} ms")

        print(f"5. live update: final event -> tasks page in Chromium, no reload (poll {args.poll} s)")
        with lock:
            task = create_task(dev, manifest, store, history, rounds=args.live_rounds, start=False)
            committee.run_until_final()
        page.goto(url + "/")
        page.wait_for_selector(f'tr[data-task="{task}"]', timeout=60_000)
        page.wait_for_selector("#live-state.on", timeout=30_000)
        page.evaluate("""(task) => {
            window.__seen = [];
            const read = () => {
                const cell = document.querySelector(`tr[data-task="${task}"] td.current`);
                const now = cell ? cell.getAttribute('data-current') : null;
                const last = window.__seen[window.__seen.length - 1];
                if (now && (!last || last[0] !== now)) window.__seen.push([now, Date.now()]);
            };
            new MutationObserver(read).observe(document.getElementById('live'), {childList: true, subtree: true});
            read();
        }""", task)
        clients = [dev.accounts[FIRST_CLIENT + i] for i in range(len(history.hospitals))]
        coord = {c.address: fast(Coordinator(manifest, dev.w3, c)) for c in clients}
        gov = fast(Coordinator(manifest, dev.w3, dev.accounts[0]))
        agg = fast(Coordinator(manifest, dev.w3, dev.accounts[AGGREGATOR]))
        latencies: list[tuple[str, float]] = []

        def step(expect: str, action) -> None:  # noqa: ANN001
            with lock:
                action()
                committee.run_until_final()
                final_at = time.time()
            page.wait_for_function("(want) => window.__seen.some(s => s[0] === want)", arg=expect, timeout=60_000)
            shown = page.evaluate("(want) => window.__seen.find(s => s[0] === want)[1]", expect)
            latencies.append((expect, shown / 1000 - final_at))

        def live_round(rnd: int) -> None:
            ups = {}
            for i, c in enumerate(clients):
                cid, sha = stand_in_adapter(store, f"live-{task}-{rnd}-{i}")
                ups[c.address] = (cid, sha, 100, bytes([rnd, i]) * 16)

            def commit(c):  # noqa: ANN001, ANN202
                cid, sha, n, salt = ups[c.address]
                coord[c.address].commit_update(task, rnd, coord[c.address].commitment_for(task, rnd, cid, sha, n, salt))

            def reveal(c):  # noqa: ANN001, ANN202
                coord[c.address].reveal_update(task, rnd, *ups[c.address])

            step(f"{rnd}:Commit", lambda: commit(clients[0]))
            step(f"{rnd}:Reveal", lambda: [commit(c) for c in clients[1:]])
            step(f"{rnd}:Aggregating", lambda: [reveal(c) for c in clients])
            aggregate, agg_sha = stand_in_adapter(store, f"live-aggregate-{task}-{rnd}")
            after = f"{rnd + 1}:Open" if rnd < args.live_rounds else f"{rnd}:Finalized"
            step(after, lambda: agg.submit_aggregate(task, rnd, aggregate, agg_sha, sorted(ups)))

        step("1:Open", lambda: gov.start_task(task))
        for rnd in range(1, args.live_rounds + 1):
            live_round(rnd)
        ms = [1000 * s for _, s in latencies]
        print(f"  {len(ms)} phase changes: median {statistics.median(ms):.0f} ms, p95 {pct(ms, 0.95):.0f} ms, "
              f"min {min(ms):.0f} ms, max {max(ms):.0f} ms (from the certificate's transaction to the DOM)")
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
        browser.close()


if __name__ == "__main__":
    raise SystemExit(main())
