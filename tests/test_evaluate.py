"""Evaluator: fairness formulas, option log-likelihood accuracy, the cross-dataset matrix."""

from __future__ import annotations

import math

import pytest

from prismesh.node import basemodel
from prismesh.node.data import MCQ, completion_ids, format_completion, format_prompt
from prismesh.node.evaluate import (
    Evaluator,
    cross_dataset_matrix,
    evaluate,
    fairness,
    render_markdown,
)
from prismesh.node.trainer import TrainConfig, train_lora


def test_fairness_against_hand_computed_values():
    f = fairness({"cn": 0.5846, "en": 0.4101, "in": 0.3402})  # paper Table 2, baseline row
    assert f["macro_acc"] == pytest.approx((0.5846 + 0.4101 + 0.3402) / 3)
    assert f["min_acc"] == 0.3402
    assert f["h_mean"] == pytest.approx(3 / (1 / 0.5846 + 1 / 0.4101 + 1 / 0.3402))
    assert f["h_mean"] == pytest.approx(0.4232, abs=5e-4)  # Table 3 reports 42.32
    g = fairness({"a": 0.5, "b": 1.0})
    assert (g["macro_acc"], g["min_acc"], g["h_mean"]) == (0.75, 0.5, pytest.approx(2 / 3))
    assert fairness({"a": 0.9, "b": 0.0})["h_mean"] == 0.0  # the limit of n / sum(1/acc)
    assert fairness({"solo": 0.3}) == {"macro_acc": 0.3, "min_acc": 0.3, "h_mean": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="'b' must be a fraction"):
        fairness({"a": 0.5, "b": 50.0})
    with pytest.raises(ValueError, match="at least one"):
        fairness({})
    with pytest.raises(ValueError):
        fairness({"a": math.nan})


def _qs(n: int, prefix: str) -> list[MCQ]:
    """Questions whose answer is always Alpha, at a rotating letter: a preference to learn."""
    names = ["Alpha", "Bravo", "Charlie", "Delta"]
    out = []
    for i in range(n):
        opts = {letter: names[(j + i) % 4] for j, letter in enumerate("ABCD")}
        ans = next(letter for letter, t in opts.items() if t == "Alpha")
        out.append(MCQ(f"Case {i}: which one?", opts, ans, "medqa", "en", f"{prefix}{i}"))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    data = _qs(24, "x")
    texts = [format_prompt(m) + format_completion(m) for m in data] * 4
    model = basemodel.build_random_model(root / "model", texts, seed=0)
    config = TrainConfig(lr=3e-2, rank=4, alpha=8, epochs=2, max_length=64)
    adapter = train_lora(model, data, root / "adapter", config, progress=False).adapter_dir
    return model, adapter, data


def test_option_loglik_accuracy_rises_after_training(tiny):
    model, adapter, data = tiny
    ev = Evaluator(model, scoring="sum")
    base_acc = ev.accuracy(None, data)
    tuned = ev.accuracy(adapter, data)
    assert tuned >= 0.9 > base_acc + 0.2
    assert ev.accuracy(None, data) == base_acc  # the adapter was unloaded again
    assert evaluate(model, adapter, data, scoring="sum") == tuned
    # Every scoring agrees with a direct computation for one example.
    import torch

    m = data[0]
    tok = ev.tokenizer
    prompt = tok(format_prompt(m))["input_ids"]
    key, text = completion_ids(tok, m, "B")
    with torch.no_grad():
        logp = torch.log_softmax(ev.model(torch.tensor([prompt + key + text])).logits[0], -1)
    per_token = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(key + text)]
    want = {"letter": sum(per_token[: len(key)]), "sum": sum(per_token), "mean": sum(per_token) / len(per_token)}
    every = ev.all_scores(ev.model, [m])
    for scoring, value in want.items():
        assert ev.option_scores(ev.model, [m], scoring=scoring)[0][1] == pytest.approx(value, abs=1e-4)
        assert every[scoring][0][1] == pytest.approx(value, abs=1e-4)
    # The one-pass-per-question letter path equals reading the key off the full answer line.
    fast, full = ev.letter_scores(ev.model, data), ev.all_scores(ev.model, data)["letter"]
    for a, b in zip(fast, full, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_scorings_are_named_and_checked(tiny):
    """Likelihood scorings read what training taught (the answer's text); letter scoring needs a
    model that points from the answer to its key, which a one-layer random model does not learn."""
    model, adapter, data = tiny
    ev = Evaluator(model)
    assert ev.scoring == "letter"  # the MedQA standard is the default
    flags = ev.correct(adapter, {"d": data}, scorings=("letter", "sum", "mean"))
    assert set(flags) == {"letter", "sum", "mean"} and len(flags["letter"]["d"]) == len(data)
    for scoring in ("sum", "mean"):
        assert sum(flags[scoring]["d"]) / len(data) >= 0.9
    with pytest.raises(ValueError, match="scoring must be one of"):
        Evaluator(model, scoring="bytes")
    with pytest.raises(ValueError, match="scoring must be one of"):
        ev.accuracy(None, data, scoring="median")


def test_cross_dataset_matrix_and_markdown(tiny):
    model, adapter, data = tiny
    tests = {"half-a": data[:12], "half-b": data[12:]}
    mat = cross_dataset_matrix(model, {"Base model": None, "+ LoRA (x)": adapter}, tests)
    assert mat["columns"] == ["half-a", "half-b"] and mat["n_test"] == {"half-a": 12, "half-b": 12}
    row = mat["rows"]["+ LoRA (x)"]
    assert row["min_acc"] == min(row["acc"].values())
    assert row["h_mean"] == pytest.approx(fairness(row["acc"])["h_mean"])
    assert row["min_acc"] > mat["rows"]["Base model"]["min_acc"]
    md = render_markdown(mat, title="T")
    lines = md.strip().splitlines()
    assert lines[0] == "### T"
    assert lines[2] == "| Model | half-a | half-b | Macro-Acc | Min-Acc | H-mean |"
    assert lines[5].startswith("| + LoRA (x) | ") and f"{100 * row['min_acc']:.2f}" in lines[5]
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        Evaluator(model).accuracy(model, data[:2])
