"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) beside an
in-process federation on anvil that really trains: a round seen moving from Commit to Finalized
without a reload, each hospital's status and rewards as the chain holds them, an audit that
passes, a screenshot; and the Prometheus metrics the daemons and the committee exposed.

The dashboard is opened the way ``prismesh demo --dashboard`` opens it. One hospital publishes an
adapter with a NaN in it, so the aggregator excludes it and the metrics count an exclusion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from prismesh.chain import telemetry
from prismesh.chain.evm.contracts import Coordinator, RewardToken, TaskStatus
from prismesh.chain.taskspec import LoraSpec, TaskSpec, model_fingerprint
from prismesh.runs.federation import Federation, TaskSettings, model_config_of
from tests.conftest import tiny_federation_inputs

pytestmark = pytest.mark.timeout(900)

REQUIRE_ENV = "PRISMESH_REQUIRE_BROWSER"  # set by .ci/run: a missing browser fails instead of skipping


def chromium() -> str:
    for candidate in (os.environ.get("PRISMESH_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    message = "no Chromium found: `apt-get install chromium` (Debian's package; .ci/run installs it)"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(message)
    pytest.skip(message)


def publish_nan(node) -> None:
    """Make ``node`` pin an adapter with a NaN after its honest training (a broken pipeline)."""
    import hashlib

    from prismesh.aggregator.adapters import load_adapter, save_adapter
    from prismesh.chain.storage import add_adapter, fetch_adapter

    daemon = node.daemon
    honest = daemon._train_and_pin

    def train_and_pin(task, rnd, global_cid, spec, rec):
        rec = honest(task, rnd, global_cid, spec, rec)
        work = daemon.config.state_dir / "nan" / f"{task}-{rnd}"
        adapter = load_adapter(fetch_adapter(daemon.store, rec["cid"], work / "src"))
        tensors = dict(adapter.tensors)
        key = sorted(tensors)[0]
        bad = np.array(tensors[key], dtype=np.float32)
        bad.flat[0] = np.nan
        tensors[key] = bad
        out = save_adapter(type(adapter)(adapter.config, tensors), work / "out")
        rec.update(cid=add_adapter(daemon.store, out),
                   sha256=hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest())
        daemon.state.save()
        return rec

    daemon._train_and_pin = train_and_pin


def samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, series: str, /, **labels: str) -> float:
    return found.get((series, tuple(sorted(labels.items()))), 0.0)


def carrying(found: dict, series: str, function: str, /, **labels: str) -> float:
    """``series`` summed over the transactions that carried ``function``, alone or in a batch
    (``reportMetric+commitUpdate``)."""
    total = 0.0
    for (name, items), v in found.items():
        got = dict(items)
        if name == series and function in got.get("function", "").split("+") and all(
            got.get(k) == w for k, w in labels.items()
        ):
            total += v
    return total


def test_dashboard_follows_a_federation_in_a_browser_and_metrics_count_the_round(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from prismesh.cli.dashboard import demo_observer
    from prismesh.node.trainer import TrainConfig, create_initial_adapter

    browser_path = chromium()
    base, clients = tiny_federation_inputs(tmp_path / "bench")
    metrics_port = telemetry.serve(0)
    demo_dir = tmp_path / "demo"  # laid out as `prismesh demo --out` leaves it, for --out below
    fed = Federation(demo_dir / "run", chain="anvil", parallel=False)
    watching = None
    try:
        for c in clients:
            fed.add_hospital(c.name, c.train_path, c.test_path, base, device="cpu")
        fed.add_hospital("broken-pipeline", clients[0].train_path, clients[0].test_path, base, device="cpu")
        publish_nan(fed.hospitals[-1])
        fed.add_aggregator()
        fed.approve_all()
        spec = TaskSpec(
            base_model_id="test/tiny-qwen3", base_model_sha256=model_fingerprint(base),
            lora=LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj")),
            model_config=model_config_of(base), train={"lr": 1e-3, "max_length": 96, "seed": 0},
            norm_bound=1e4, report_metrics=True,
        )
        initial = create_initial_adapter(base, tmp_path / "initial",
                                         TrainConfig.from_dict({**spec.train_config(), "device": "cpu"}))
        task = fed.create_task(spec, TaskSettings(num_rounds=2, min_participants=2), initial_adapter=initial)
        descriptors = fed.descriptors()
        watching = demo_observer(0)(fed)  # the dashboard exactly as `prismesh demo --dashboard` opens it
        url = watching.server.url
        fed.finalize()
        for h in fed.hospitals:  # each node sees the final TaskCreated and joins
            h.daemon.step()
        fed.finalize()

        with sync_playwright() as p:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            browser = p.chromium.launch(executable_path=browser_path, args=args)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/tasks/{task}")
            page.wait_for_selector("#live-state.on", timeout=30_000)  # the live stream is open
            page.evaluate("""() => {
                window.__sameDocument = true;
                window.__phases = [];
                const read = () => {
                    const el = document.getElementById('round-1-phase');
                    const now = el ? el.textContent : null;
                    if (now && window.__phases[window.__phases.length - 1] !== now) window.__phases.push(now);
                };
                new MutationObserver(read).observe(document.getElementById('live'), {childList: true, subtree: true});
                read();
            }""")
            Coordinator(fed.manifest, fed.w3, fed.governance).start_task(task)
            fed.finalize()
            fed.hospitals[0].daemon.step()  # trains and commits: the round is in its Commit phase
            fed.finalize()
            page.wait_for_function("() => window.__phases.includes('Commit')", timeout=60_000)
            state = fed.run_task(task)
            assert state.status == TaskStatus.COMPLETED
            page.wait_for_function(
                "() => window.__phases.includes('Finalized') && "
                "document.getElementById('task-status').textContent === 'Completed' && "
                "document.querySelectorAll('circle').length >= 8",  # 4 accuracies x 2 rounds
                timeout=60_000,
            )
            phases = page.evaluate("window.__phases")
            assert phases.index("Commit") < phases.index("Finalized"), phases
            assert page.evaluate("window.__sameDocument === true")  # no reload happened
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1

            # Each hospital's status and rewards, as the chain holds them (score-split, earned).
            coord = Coordinator(fed.manifest, fed.w3)
            earned: dict[str, int] = {}
            for ev in coord.get_events("RewardEarned", fed.manifest.deploy_block, taskId=task):
                if not ev.is_aggregator:
                    earned[ev.recipient] = earned.get(ev.recipient, 0) + ev.amount
            decimals = RewardToken(fed.manifest, fed.w3).decimals()
            for h in fed.hospitals:
                row = page.locator(f'tr[data-hospital="{h.daemon.address}"]')
                statuses = row.locator("[data-status]").all_text_contents()
                reward = float(row.locator(".total-reward").text_content().split()[0].replace(",", ""))
                assert reward == pytest.approx(earned.get(h.daemon.address, 0) / 10**decimals, abs=1e-4)
                if h.name == "broken-pipeline":
                    assert statuses == ["excluded", "excluded"] and reward == 0
                    assert row.locator(".why").first.text_content().strip()
                else:
                    assert statuses == ["included", "included"]
                    assert row.locator(".score").count() == 2  # its contribution score, each round
            assert sum(earned.values()) > 0
            assert h.name in page.locator("#hospitals-rounds").text_content()  # named by its descriptor

            page.click("#run-audit")
            page.wait_for_selector('#audit-state[data-state="pass"], #audit-state[data-state="fail"], '
                                   '#audit-state[data-state="error"]', timeout=180_000)
            audit = page.locator("#audit").text_content()
            assert page.get_attribute("#audit-state", "data-state") == "pass", audit
            assert "checks hold" in audit
            shot = tmp_path / "dashboard-task.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            page.goto(f"{url}/finality")
            assert page.locator("#validators li").count() == 4
            # Each node claims what it earned once the task is over; the hospitals page shows it.
            fed.step()
            fed.finalize()
            claimer = next(h.daemon for h in fed.hospitals if earned.get(h.daemon.address))
            page.goto(f"{url}/hospitals")
            page.wait_for_function(
                "(a) => (document.querySelector(`tr[data-hospital='${a}'] .total-reward`) || {}).textContent"
                "?.includes('claimed')", arg=claimer.address, timeout=30_000)
            assert RewardToken(fed.manifest, fed.w3).balance_of(claimer.address) == earned[claimer.address]
            browser.close()
        print(f"screenshot: {shot}")

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            found = samples(r.read().decode())
        start = fed.manifest.deploy_block
        for h in fed.hospitals:
            name = h.name
            assert value(found, "prismesh_rounds_joined_total", name=name) == 2
            assert value(found, "prismesh_training_seconds_count", name=name) == 2
            assert value(found, "prismesh_training_seconds_sum", name=name) > 0
            commits = coord.get_events("UpdateCommitted", start, taskId=task, client=h.daemon.address)
            gas = sum(int(fed.w3.eth.get_transaction_receipt(ev.tx_hash)["gasUsed"]) for ev in commits)
            assert carrying(found, "prismesh_transactions_total", "commitUpdate", role="node", name=name,
                            contract="Coordinator", outcome="mined") == 2
            assert carrying(found, "prismesh_gas_used_total", "commitUpdate", role="node", name=name,
                            contract="Coordinator") == gas
            assert value(found, "prismesh_final_height", role="node", name=name) > 0
            assert value(found, "prismesh_finality_lag_blocks", role="node", name=name) >= 0
            if name != "broken-pipeline":
                reveals = coord.get_events("UpdateRevealed", start, taskId=task, client=h.daemon.address)
                uploaded = sum(fed.store.stat(ev.cid).cumulative_size for ev in reveals)
                assert value(found, "prismesh_uploaded_bytes_total", name=name) == uploaded > 0
        # Round 1's metric reports rode in round 2's commitments, named for both calls.
        assert any(value(found, "prismesh_transactions_total", role="node", name=h.name, contract="Coordinator",
                         function="reportMetric+commitUpdate", outcome="mined") for h in fed.hospitals)
        assert value(found, "prismesh_aggregation_seconds_count", name="aggregator") == 2
        assert value(found, "prismesh_aggregation_seconds_sum", name="aggregator") > 0
        assert value(found, "prismesh_rounds_aggregated_total", name="aggregator", outcome="aggregated") == 2
        assert value(found, "prismesh_exclusions_total", reason="non-finite") == 2
        assert value(found, "prismesh_transactions_total", role="aggregator", name="aggregator",
                     contract="Coordinator", function="submitAggregate", outcome="mined") == 2
        assert value(found, "prismesh_certificates_total", name="committee") == len(fed.committee.certificates) > 0
        assert value(found, "prismesh_final_height", role="committee", name="committee") == fed.committee.final_height
        assert not any(n == "prismesh_retries_total" and v for (n, _), v in found.items())
    finally:
        telemetry.disable()
        if watching is not None:
            watching.close()
        fed.close()

    # The finished run's saved chain, re-opened by `prismesh dashboard --out`, as after a demo
    # (which keeps its hospitals' descriptors beside the chain).
    (demo_dir / "run" / "descriptors.json").write_text(json.dumps(descriptors))
    proc = subprocess.Popen([sys.executable, "-m", "prismesh", "dashboard", "--out", str(demo_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "dashboard of chain" in line, line + proc.stderr.read()
        base = line.split(" on ")[1].split()[0].rstrip("/")
        deadline = time.monotonic() + 60
        body = ""
        while "Completed" not in body and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"{base}/tasks/{task}", timeout=10) as r:
                    body = r.read().decode()
            except urllib.error.HTTPError as exc:  # until the first read of the chain
                assert exc.code in (404, 503), exc  # unknown yet, or known and being read
        assert "Completed" in body and "broken-pipeline" in body  # named by the descriptors kept beside it
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
