"""Daemon telemetry: metric hooks that cost nothing until enabled, the exposition endpoint, the
folding of exclusion reasons into a few kinds, and JSON log lines.

The series a real federation produces are checked after real rounds in
``test_dashboard_browser``; the dashboard's own command line here."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request

import pytest

from prismesh.chain import telemetry
from prismesh.cli import main


@pytest.fixture
def metrics():
    telemetry.disable()
    yield telemetry.enable()
    telemetry.disable()


def test_hooks_do_nothing_until_enabled() -> None:
    telemetry.disable()
    telemetry.round_joined("site", 1.0)
    telemetry.exclusions(["fetch failed (BlockNotFound): ..."])
    assert telemetry.registry() is None and not telemetry.enabled()


def test_exclusion_reasons_fold_into_kinds() -> None:
    """The reasons the aggregator's verification really writes (aggregator/parallel.py, verify.py)."""
    cases = {
        "fetch failed (BlockNotFound): block QmX is not available": "fetch",
        "adapter weights sha256 ab12 differs from the revealed cd34": "hash mismatch",
        "shape: base_model.model.q_proj.lora_A.weight has shape (3, 3), expected (4, 32)": "shape",
        "non-finite values: base_model.x has 1 NaN and 0 infinite values": "non-finite",
        "norm: q_proj has ||scaling*B*A||_F = 1e+09 > 10000": "norm bound",
        "timed out after 600 s": "timeout",
        "client submitted 2 updates in one round": "duplicate",
        "config lora_alpha=32 does not match the task's lora_alpha=16": "config",
        "something nobody foresaw": "other",
    }
    assert {r: telemetry.exclusion_kind(r) for r in cases} == cases


def test_metrics_endpoint_serves_what_the_hooks_counted(metrics) -> None:
    telemetry.actor("0xA", "node", "site-a")
    telemetry.round_joined("site-a", 2.5)
    telemetry.uploaded("site-a", 4096)
    telemetry.transaction("0xA", "Coordinator", "commitUpdate", {"gasUsed": 51_000})
    telemetry.transaction("0xA", "Coordinator", "revealUpdate", error="CommitmentMismatch")
    telemetry.finality("node", "site-a", 10, 13)
    telemetry.exclusions(["timed out after 600 s", "timed out after 5 s"])
    port = telemetry.serve(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'prismesh_rounds_joined_total{name="site-a"} 1.0' in text
    assert 'prismesh_training_seconds_sum{name="site-a"} 2.5' in text
    assert 'prismesh_uploaded_bytes_total{name="site-a"} 4096.0' in text
    assert ('prismesh_gas_used_total{contract="Coordinator",function="commitUpdate",name="site-a",role="node"} '
            "51000.0") in text
    assert 'outcome="reverted"' in text and 'kind="CommitmentMismatch"' in text
    assert 'prismesh_finality_lag_blocks{name="site-a",role="node"} 3.0' in text
    assert 'prismesh_exclusions_total{reason="timeout"} 2.0' in text
    assert "process_cpu_seconds_total" in text


def test_json_log_lines() -> None:
    formatter = telemetry.JsonFormatter()
    record = logging.LogRecord("prismesh.node", logging.WARNING, __file__, 1, "task %d: %s", (3, "late"), None)
    record.task = 3
    line = json.loads(formatter.format(record))
    assert line["level"] == "WARNING" and line["logger"] == "prismesh.node"
    assert line["message"] == "task 3: late" and line["task"] == 3 and line["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(record))["exception"]
    code = ("from prismesh.cli.output import configure_output; import logging; "
            "configure_output(level=logging.INFO, log_format='json'); logging.getLogger('prismesh.x').info('hi')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stderr.strip().splitlines()[-1])["message"] == "hi"


def test_dashboard_command_line_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dashboard"])  # neither --manifest nor --out
    assert exc.value.code == 2
    bad = tmp_path / "descriptors.json"
    bad.write_text('{"not": "a list"}')
    manifest = tmp_path / "missing.json"
    assert main(["dashboard", "--manifest", str(manifest), "--descriptors", str(bad)]) == 2
    assert "expected a JSON list" in capsys.readouterr().err
    assert main(["dashboard", "--manifest", str(manifest), "--port", "70000"]) == 2
    assert main(["demo", "--dashboard", "--chain", "embedded", "--out", str(tmp_path / "d")]) == 2
    assert "needs --chain anvil" in capsys.readouterr().err
