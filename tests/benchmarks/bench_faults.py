"""Faults and memory of the multi-process deployment, measured on one cluster in one run.

1. Memory: ``--tasks`` consecutive one-round tasks without faults; after each, the resident and
   peak resident memory (VmRSS / VmHWM) of every daemon: the three nodes, the aggregator (and,
   apart, the Ray processes it started), the committee and anvil. The node's growth is judged
   a leak when it keeps growing at the same pace in the second half of the tasks as in the first.
2. Ray leftovers: the aggregator is killed with SIGKILL; the processes it leaves behind are
   counted every half second until none is left.
3. The fault campaign (``tests/cluster.py``): ``--runs`` seeded runs, each a one-round task with
   one SIGKILL of a random component (node, aggregator, committee, anvil) at a random phase and
   a restart, checked like the test suite's campaign. Runs × components × phases with outcomes,
   restart → back at work and kill → task done, then per component the median and worst.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_faults [--runs 30] [--tasks 10]
[--seed 12] [--out out/bench-faults]``; writes ``report.md`` and ``results.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.cluster import NODE_NAMES, Cluster, group_members, run_campaign, summary, table


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def memory(cluster: Cluster) -> dict[str, dict[str, int]]:
    """MB resident and peak resident per daemon (Ray's processes summed apart)."""
    pids = {f"node-{n}": cluster.current[f"node-{n}"].popen.pid for n in NODE_NAMES}
    pids["aggregator"] = cluster.current["aggregator"].popen.pid
    pids["committee"] = cluster.committee_pid() or 0
    pids["anvil"] = cluster.anvil_pid() or 0
    out = {name: _status(pid) for name, pid in pids.items()}
    ray = [_status(p).get("VmRSS", 0) for p in _descendants(pids["aggregator"])]
    out["ray (sum)"] = {"VmRSS": sum(ray), "VmHWM": 0, "processes": len(ray)}
    return out


def leak_verdict(series: list[int]) -> str:
    """Growth per task in the first and second half: a leak keeps its pace, warm-up does not."""
    if len(series) < 4:
        return "too few tasks to judge"
    half = len(series) // 2
    first = (series[half] - series[0]) / half
    second = (series[-1] - series[half]) / (len(series) - 1 - half)
    verdict = "grows steadily: a leak" if second > max(1.0, 0.5 * first) else "levels off: not a leak"
    return f"{first:+.1f} MB/task in tasks 1-{half + 1}, {second:+.1f} MB/task after: {verdict}"


def bench_memory(cluster: Cluster, tasks: int, lines: list[str]) -> dict:
    rows = []
    for i in range(tasks):
        # As the walkthrough runs them: each node also evaluates every aggregate on its test set.
        task = cluster.create_task(seed=5000 + i, report_metrics=True)
        start = cluster.start_task(task)
        cluster.wait_done(task)
        problems = cluster.check_task(task, start - 2, audit=False)
        assert not problems, problems
        rows.append(memory(cluster))
    names = [*(f"node-{n}" for n in NODE_NAMES), "aggregator", "ray (sum)", "committee", "anvil"]
    lines += ["## Memory after each task (MB resident; peak resident in the last row)", "",
              "| after task | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(str(row[n].get("VmRSS", "-")) for n in names) + " |")
    lines.append("| peak | " + " | ".join(str(rows[-1][n].get("VmHWM", "-") or "-") for n in names) + " |")
    lines.append("")
    verdicts = {n: leak_verdict([r[n].get("VmRSS", 0) for r in rows]) for n in names if n not in ("ray (sum)", "anvil")}
    # anvil keeps every block in memory: its growth is the chain's, measured per block.
    blocks = int(cluster.chain().w3.eth.block_number)
    grown = rows[-1]["anvil"].get("VmRSS", 0) - rows[0]["anvil"].get("VmRSS", 0)
    verdicts["anvil"] = f"{grown:+d} MB over {tasks - 1} tasks, the chain at {blocks} blocks: it keeps every block in memory"
    for n, v in verdicts.items():
        lines.append(f"- {n}: {v}")
    lines.append("")
    return {"rows": rows, "verdicts": verdicts}


def bench_ray_leftovers(cluster: Cluster, lines: list[str]) -> dict:
    proc = cluster.current["aggregator"]
    pgid = proc.popen.pid
    before = len(_descendants(pgid))
    os.kill(pgid, signal.SIGKILL)
    proc.popen.wait(timeout=10)
    t0 = time.monotonic()
    counts = []
    while True:
        left = group_members(pgid)
        counts.append((round(time.monotonic() - t0, 1), len(left)))
        if not left or time.monotonic() - t0 > 180:
            break
        time.sleep(0.5)
    names = sorted({Path(f"/proc/{p}/cmdline").read_text().split("\0")[0] for p in group_members(pgid)}
                   if group_members(pgid) else [])
    cluster.restart("aggregator")
    cluster.wait_for("the aggregator", lambda: "following final events" in cluster.current["aggregator"].text(), 180)
    first = next((n for t, n in counts if t >= 1.0), counts[-1][1])
    gone = counts[-1][0] if counts[-1][1] == 0 else None
    lines += ["## Ray processes left after the aggregator is killed (SIGKILL)", "",
              f"- Ray processes under the aggregator before the kill: {before}",
              f"- left 1 s after the kill: {first}" + (f" ({', '.join(names)})" if names else ""),
              f"- all gone {gone:.1f} s after the kill" if gone is not None else "- still there after 180 s", ""]
    return {"before": before, "counts": counts, "gone_after_s": gone}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="fault campaign runs")
    parser.add_argument("--tasks", type=int, default=10, help="consecutive tasks for the memory figures")
    parser.add_argument("--seed", type=int, default=12, help="campaign schedule")
    parser.add_argument("--out", type=Path, default=Path("out/bench-faults"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    lines = ["# Fault campaign and daemon memory", "",
             f"Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)", ""]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prismesh-faults-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start()
            mem = bench_memory(cluster, args.tasks, lines) if args.tasks else {}
            ray = bench_ray_leftovers(cluster, lines)
            results = run_campaign(cluster, args.runs, args.seed,
                                   on_result=lambda r: print(f"run {r.run}: {r.victim} at {r.phase}: {r.outcome} "
                                                             f"(back {r.restart_to_ready_s:.1f} s, done "
                                                             f"{r.kill_to_done_s:.1f} s)", flush=True))
        finally:
            cluster.close()
    ok = sum(r.outcome == "ok" for r in results)
    lines += [f"## Fault campaign: {ok} of {len(results)} runs recovered (seed {args.seed})", "",
              table(results), "", summary(results), ""]
    if results:
        done = [r.kill_to_done_s for r in results]
        lines.append(f"kill → task done over all runs: median {statistics.median(done):.1f} s, max {max(done):.1f} s")
    load = os.getloadavg()
    lines += ["", f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
              f"{time.monotonic() - started:.0f} s in all."]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"memory": mem, "ray": ray, "campaign": [r.row() for r in results]}, indent=1))
    print(text)
    return 0 if ok == len(results) == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
