"""``prismesh experiment``: statistics over seeds, the pooled baseline and the gap closed, and the
protocol on a given model directory and JSONL files (a tiny random model stands in for a real
checkpoint: these tests check the protocol's bookkeeping, not learning quality)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prismesh.runs.stats import mean_ci, paired, proportion_ci, t_critical

pytestmark = pytest.mark.timeout(900)


def test_mean_and_interval_against_hand_computation():
    xs = [0.50, 0.55, 0.60, 0.65, 0.70]
    s = mean_ci(xs)
    sd = math.sqrt(sum((x - 0.6) ** 2 for x in xs) / 4)
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(sd) and s["n"] == 5
    assert s["hi"] - s["mean"] == pytest.approx(2.776 * sd / math.sqrt(5))
    assert mean_ci([0.3]) == {"mean": 0.3, "sd": None, "lo": None, "hi": None, "n": 1}
    assert t_critical(1) == 12.706 and t_critical(30) == 2.042
    assert 1.96 < t_critical(200) < t_critical(40) < 2.03
    d = paired([0.6, 0.7, 0.5], [0.5, 0.7, 0.6])
    assert (d["wins"], d["ties"], d["losses"]) == (1, 1, 1) and d["mean"] == pytest.approx(0.0)
    w = proportion_ci(75, 300)
    assert w["lo"] < 0.25 < w["hi"] and w["hi"] - w["lo"] == pytest.approx(0.098, abs=0.003)
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([0.1, math.nan])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """A one-layer random Qwen3 whose tokenizer covers the tiny benchmark, and that benchmark."""
    from prismesh.node.basemodel import build_random_model
    from prismesh.node.data import format_completion, format_prompt, load_jsonl
    from prismesh.node.synthetic import make_benchmark, new_site_spec

    root = tmp_path_factory.mktemp("exp")
    specs = make_benchmark(root / "bench", seed=0, scale=0.05)
    texts = []
    for s in [*specs, new_site_spec(root / "bench")]:
        for m in load_jsonl(s.train_path)[:40] + load_jsonl(s.test_path)[:10]:
            texts.append(format_prompt(m) + format_completion(m))
    return build_random_model(root / "base", texts, seed=0, hidden_size=32, layers=1), root


@pytest.mark.slow
def test_protocol_on_the_synthetic_benchmark_over_two_seeds(tiny_model, tmp_path):
    from prismesh.runs.experiment import STRATEGY_CONFIGS, Plan, run_experiment, seed_metrics

    base, _ = tiny_model
    plan = Plan(out=tmp_path / "exp", seeds=[0, 1], rounds=1,
                strategies={k: STRATEGY_CONFIGS[k] for k in ("fedavg", "fedavgm-fair")},
                train={"lr": 3e-3, "rank": 2, "alpha": 4, "max_length": 96}, base_model=base, scale=0.05,
                new_site_sizes=(0, 4), device="cpu", eval_limit=12, personalise=1, personalise_mu=3.0,
                command="test")
    out = run_experiment(plan, resume=False)
    summary = out["summary"]
    results = [json.loads((tmp_path / "exp" / f"seed-{s}" / "result.json").read_text()) for s in (0, 1)]
    res = results[0]
    # Every row the protocol promises, a curve point per round, all three scorings at the end.
    assert set(res["models"]) == {"base", "single:medqa-cn", "single:medqa-en", "single:medmcqa-in",
                                  "pooled", "fed:fedavg", "fed:fedavgm-fair", "personal:fedavg",
                                  "personal:fedavgm-fair"}
    for label, mod in res["models"].items():
        assert len(mod["curve"]) == (0 if label == "base" else 1)
        assert set(mod["final"]) == {"letter", "sum", "mean"}
        assert mod["curve"][-1:] in ([], [mod["final"]["letter"]])
    # The pooled model trained on every client's examples, the clients on their own.
    assert res["strategies"]["fedavgm-fair"]["options"]["inner"] == "fairavg"
    assert res["strategies"]["fedavgm-fair"]["rounds"][0]["metrics"]["weights"]
    # Each client's fine-tuned copy is scored on its own test set, all of it, once.
    for name, stats in res["models"]["personal:fedavgm-fair"]["final"]["mean"].items():
        assert stats["n"] == res["clients"][name]["n_eval"]
    assert res["strategies"]["fedavgm-fair"]["personalise"] == [1, 3.0]
    # Own/shared parts add up to the test sets; the new site was adapted from both starts.
    stats = res["models"]["fed:fedavg"]["final"]["letter"]["medqa-en"]
    assert sum(n for _, n in stats["parts"].values()) == stats["n"] == res["clients"]["medqa-en"]["n_eval"]
    assert set(res["new_site"]["from_global"]) == set(res["new_site"]["from_base"]) == {"0", "4"}
    # The summary is the mean and t-interval of the per-seed figures, recomputed here.
    per = [seed_metrics(r, "fed:fedavgm-fair") for r in results]
    for label in ("pooled", "fed:fedavgm-fair"):
        vals = [p["models"][label]["h_mean"] for p in per]
        assert summary["models"][f"{label}"]["h_mean"] == pytest.approx(mean_ci(vals))
    for p in per:
        best = p["best_single"]["min_acc"]
        assert p["models"][best]["min_acc"] == max(p["models"][k]["min_acc"] for k in p["models"] if k.startswith("single:"))
        span = p["models"]["pooled"]["min_acc"] - p["models"][best]["min_acc"]
        want = (p["models"]["fed:fedavgm-fair"]["min_acc"] - p["models"][best]["min_acc"]) / span if span > 0 else None
        assert p["gap"]["fed:fedavgm-fair"]["min_acc"] == (pytest.approx(want) if want is not None else None)
        assert p["gap"]["fed:fedavgm-fair"]["smallest"] in ("medqa-cn", "medqa-en", "medmcqa-in")
    d = summary["paired"]["fed:fedavgm-fair"]["vs_fedavg_h_mean"]
    assert d["n"] == 2 and d["wins"] + d["ties"] + d["losses"] == 2
    assert set(summary["targets"]) >= {"no_negative_transfer", "no_negative_transfer_personalised",
                                       "smallest_client_reaches_others"}
    assert set(summary["gap_closed"]["personal:fedavgm-fair"]["own_change"]) == set(res["clients"])
    report = (tmp_path / "exp" / "report.md").read_text()
    for needle in ("Pooled-data LoRA (upper bound)", "Gap closed", "Federated (fedavgm-fair) + local fine-tuning", "New-site adaptation", "chance (1 / options)", "## Targets"):
        assert needle in report
    # A second run reads the seeds back instead of recomputing them.
    again = run_experiment(plan, resume=True)
    assert again["summary"]["models"]["pooled"] == summary["models"]["pooled"]


def _write_real_like_files(root: Path) -> dict[str, tuple[Path, Path]]:
    """Small MedQA- and MedMCQA-format files as a hospital would have them (no benchmark ids)."""
    from prismesh.node.data import MCQ, to_row

    names = ["Alpha", "Bravo", "Charlie", "Delta", "Echo"]
    out = {}
    for client, fmt, n_opt in (("usmle", "medqa", 5), ("mcqa", "medmcqa", 4)):
        files = []
        for split, n in (("train", 12), ("test", 6)):
            rows = []
            for i in range(n):
                opts = {k: names[(j + i) % n_opt] for j, k in enumerate("ABCDE"[:n_opt])}
                ans = next(k for k, v in opts.items() if v == "Alpha")
                rows.append(to_row(MCQ(f"Case {i} of {client}: which one?", opts, ans, fmt, "en", f"{client}-{split}-{i}")))
            path = root / client / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            for row in rows:
                row.pop("id")  # real releases carry no benchmark ids
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            files.append(path)
        out[client] = (files[0], files[1])
    return out


@pytest.mark.slow
def test_cli_runs_the_paper_preset_on_a_model_directory_and_jsonl_files(tiny_model, tmp_path, capsys):
    from prismesh.cli import main

    base, _ = tiny_model
    files = _write_real_like_files(tmp_path / "data")
    args = ["experiment", "--preset", "paper", "--base-model", str(base), "--seeds", "0", "--rounds", "1",
            "--set", "max_length=96", "--set", "lr=0.003", "--device", "cpu", "--out", str(tmp_path / "out"),
            "--new-site", f"site={files['mcqa'][0]},{files['mcqa'][1]}", "--new-site-sizes", "0,4"]
    for name, (train, test) in files.items():
        args += ["--data", f"{name}={train},{test}"]
    assert main(args) == 0
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["preset"] == "paper" and out["rounds"] == 1
    # Table 1 as far as the paper gives it, with the overrides applied.
    assert {k: out["train"][k] for k in ("rank", "alpha", "dropout", "batch_size", "grad_accum", "epochs")} == \
        {"rank": 8, "alpha": 16, "dropout": 0.1, "batch_size": 1, "grad_accum": 4, "epochs": 1}
    assert out["train"]["lr"] == 0.003 and out["train"]["max_length"] == 96
    assert list(out["strategies"]) == ["fedavg"]
    s = out["summary"]
    assert set(s["models"]) == {"base", "single:usmle", "single:mcqa", "pooled", "fed:fedavg"}
    assert "own" not in s["models"]["base"]  # real files name no fact owners: no own/shared split
    assert set(s["new_site"]) == {"0", "4"}
    seed = json.loads((tmp_path / "out" / "seed-0" / "result.json").read_text())
    assert seed["clients"] == {"usmle": {"n_train": 12, "n_eval": 6}, "mcqa": {"n_train": 12, "n_eval": 6}}
    assert seed["chance"] == {"usmle": pytest.approx(0.2), "mcqa": pytest.approx(0.25)}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--data", "only=a.jsonl,b.jsonl"], "no such file"),
        (["--new-site", "x=a,b"], "goes with --data"),
        (["--strategies", "fedavg,nope"], "unknown configuration 'nope'"),
        (["--strategy", 'x={"strategy": "fedavgm", "momentum": 2}'], "strategy x: momentum"),
        (["--set", "prox_mu=-1"], "prox_mu"),
        (["--seeds", "1,1"], "distinct"),
        (["--personalise", "-1"], "--personalise must be >= 0 epochs"),
        (["--personalise-mu", "nan"], "--personalise-mu must be a number >= 0"),
        (["--base-model", "."], "not a Hugging Face model directory"),
    ],
)
def test_cli_refuses_bad_input_naming_it(extra, needle, tmp_path, capsys):
    from prismesh.cli import main

    assert main(["experiment", "--out", str(tmp_path / "o"), *extra]) == 2
    assert needle in capsys.readouterr().err
