"""Aggregation strategies on real PEFT adapters saved from a tiny Qwen3 model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from prismesh.aggregator.adapters import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    WEIGHTS_NAME,
    Adapter,
    load_adapter,
    save_adapter,
)
from prismesh.aggregator.strategies import (
    ClientUpdate,
    available_strategies,
    get_strategy,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_QWEN3 = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # differs from hidden/heads, so q/o widths differ from hidden
    max_position_embeddings=64,
)
LORA = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1)


def tiny_base(seed: int = 0):
    """A tiny Qwen3 causal LM built from a config (no download), deterministic in ``seed``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN3)).eval()


def train_client_adapters(out: Path, n_clients: int = 3, steps: int = 3) -> list[Path]:
    """Distinct client adapters: each client inits LoRA with its own seed, trains a few AdamW steps
    on its own random tokens (so B ≠ 0 and A differs across clients), and ``save_pretrained``s."""
    import torch

    dirs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared host
    try:
        for c in range(n_clients):
            dirs.append(_train_one(c, out, steps))
    finally:
        torch.set_num_threads(threads)
    return dirs


def _train_one(c: int, out: Path, steps: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_base()
    torch.manual_seed(100 + c)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, TINY_QWEN3["vocab_size"], (2, 12))
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    d = out / f"client{c}"
    model.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def client_dirs(tmp_path_factory) -> list[Path]:
    return train_client_adapters(tmp_path_factory.mktemp("clients"))


@pytest.fixture(scope="module")
def updates(client_dirs) -> list[ClientUpdate]:
    samples = [120, 45, 300]
    return [
        ClientUpdate(f"0xclient{i}", n, load_adapter(d))
        for i, (n, d) in enumerate(zip(samples, client_dirs, strict=True))
    ]


def dense_delta(adapter: Adapter, module: str) -> np.ndarray:
    a = adapter.tensors[module + LORA_A_SUFFIX].astype(np.float64)
    b = adapter.tensors[module + LORA_B_SUFFIX].astype(np.float64)
    return adapter.scaling(module) * (b @ a)


def weighted_dense_delta(updates: list[ClientUpdate], module: str) -> np.ndarray:
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    return sum(
        (k / n.sum()) * dense_delta(u.adapter, module) for k, u in zip(n, updates, strict=True)
    )


def test_peft_adapters_are_distinct_and_trained(updates):
    m = updates[0].adapter.lora_modules()[0]
    b0 = updates[0].adapter.tensors[m + LORA_B_SUFFIX]
    assert np.abs(b0).max() > 0  # training moved B off its zero init
    a0, a1 = (u.adapter.tensors[m + LORA_A_SUFFIX] for u in updates[:2])
    assert not np.allclose(a0, a1)


def test_fedavg_is_sample_weighted_mean(updates):
    result = get_strategy("fedavg").aggregate(updates, None)
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    w = n / n.sum()
    assert result.metrics["weights"] == pytest.approx(
        {u.client: x for u, x in zip(updates, w, strict=True)}
    )
    for key, got in result.adapter.tensors.items():
        want = sum(
            x * u.adapter.tensors[key].astype(np.float64) for x, u in zip(w, updates, strict=True)
        )
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", available_strategies())
def test_same_inputs_any_order_give_identical_bytes(updates, tmp_path, name):
    strategy = get_strategy(name)
    blobs = set()
    for i, perm in enumerate(itertools.islice(itertools.permutations(updates), 4)):
        out = save_adapter(strategy.aggregate(list(perm), None).adapter, tmp_path / f"agg{i}")
        blobs.add(((out / WEIGHTS_NAME).read_bytes(), (out / "adapter_config.json").read_bytes()))
    assert len(blobs) == 1


def test_exact_error_matches_independent_computation(updates):
    result = get_strategy("fedavg-exact").aggregate(updates, None)
    agg = result.adapter
    errors = result.metrics["rel_frobenius_error"]
    assert sorted(errors) == updates[0].adapter.lora_modules()
    tail, total = 0.0, 0.0
    for m, reported in errors.items():
        target = weighted_dense_delta(updates, m)
        resid = np.linalg.norm(target - dense_delta(agg, m))
        independent = resid / np.linalg.norm(target)
        assert reported == pytest.approx(independent, abs=1e-5)
        tail, total = tail + resid**2, total + np.linalg.norm(target) ** 2
        # three clients of rank 4 with distinct A: the mean has rank 12, so truncating loses something
        assert reported > 1e-3
        assert (
            agg.tensors[m + LORA_A_SUFFIX].shape
            == updates[0].adapter.tensors[m + LORA_A_SUFFIX].shape
        )
    assert result.metrics["rel_frobenius_error_overall"] == pytest.approx(
        np.sqrt(tail / total), abs=1e-5
    )
    assert result.metrics["rel_frobenius_error_max"] == max(errors.values())


def test_exact_rank_truncation_is_optimal(updates):
    """Eckart–Young: the SVD truncation is no worse than fedavg's factor averaging."""
    exact = get_strategy("fedavg-exact").aggregate(updates, None).adapter
    plain = get_strategy("fedavg").aggregate(updates, None).adapter
    for m in updates[0].adapter.lora_modules():
        target = weighted_dense_delta(updates, m)
        e_exact = np.linalg.norm(target - dense_delta(exact, m))
        e_plain = np.linalg.norm(target - dense_delta(plain, m))
        assert e_exact <= e_plain * (1 + 1e-5)


def test_shared_A_fedavg_equals_exact(updates):
    """When every client has the same A, mean(B)·A is the mean ΔW and is already rank r."""
    shared = updates[0].adapter
    same_a = []
    for u in updates:
        tensors = dict(u.adapter.tensors)
        for k in tensors:
            if k.endswith(LORA_A_SUFFIX):
                tensors[k] = shared.tensors[k]
        same_a.append(ClientUpdate(u.client, u.num_samples, Adapter(u.adapter.config, tensors)))
    plain = get_strategy("fedavg").aggregate(same_a, None).adapter
    exact_result = get_strategy("fedavg-exact").aggregate(same_a, None)
    assert exact_result.metrics["rel_frobenius_error_overall"] < 1e-6
    for m in shared.lora_modules():
        d_plain, d_exact = dense_delta(plain, m), dense_delta(exact_result.adapter, m)
        scale = np.linalg.norm(d_plain)
        assert np.linalg.norm(d_plain - d_exact) / scale < 1e-5
        assert np.linalg.norm(weighted_dense_delta(same_a, m) - d_exact) / scale < 1e-5


def test_exact_with_enough_rank_is_lossless(updates):
    """An output rank ≥ the rank of the sum (3 clients × r=4) reproduces ΔW; the aggregate takes
    the global adapter's rank and alpha."""
    global_cfg = dict(updates[0].adapter.config, r=12, lora_alpha=24)
    result = get_strategy("fedavg-exact").aggregate(updates, Adapter(global_cfg, {}))
    assert result.metrics["rel_frobenius_error_max"] < 1e-6
    for m in updates[0].adapter.lora_modules():
        assert result.adapter.tensors[m + LORA_A_SUFFIX].shape[0] == 12
        target = weighted_dense_delta(updates, m)
        got = dense_delta(result.adapter, m)
        assert np.linalg.norm(target - got) / np.linalg.norm(target) < 1e-5


def test_exact_split_options_and_signs(updates):
    balanced = get_strategy("fedavg-exact").aggregate(updates, None).adapter
    b_split = get_strategy("fedavg-exact", split="B").aggregate(updates, None).adapter
    for m in updates[0].adapter.lora_modules():
        d1, d2 = dense_delta(balanced, m), dense_delta(b_split, m)
        assert np.linalg.norm(d1 - d2) / np.linalg.norm(d1) < 1e-5
        a = b_split.tensors[m + LORA_A_SUFFIX].astype(np.float64)
        np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-5)
        b = balanced.tensors[m + LORA_B_SUFFIX]
        cols = np.arange(b.shape[1])
        assert (b[np.argmax(np.abs(b), axis=0), cols] > 0).all()
        # balanced: both factors carry sqrt of the singular values
        a_bal = balanced.tensors[m + LORA_A_SUFFIX].astype(np.float64)
        np.testing.assert_allclose(
            np.linalg.norm(a_bal, axis=1), np.linalg.norm(b.astype(np.float64), axis=0), rtol=1e-4
        )


@pytest.mark.parametrize("name", ["fedavg", "fedavg-exact"])
def test_peft_loads_the_aggregate(updates, tmp_path, name):
    """``PeftModel.from_pretrained`` loads the saved aggregate as-is, and the merged weights are
    the base weights plus the aggregate's ΔW."""
    import torch
    from peft import PeftModel

    agg = get_strategy(name).aggregate(updates, None).adapter
    out = save_adapter(agg, tmp_path / name)
    base = tiny_base()
    base_q = base.model.layers[1].self_attn.q_proj.weight.detach().clone().double().numpy()
    model = PeftModel.from_pretrained(base, str(out))
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, want in agg.tensors.items():
        got = sd[key.replace(".weight", ".default.weight")].numpy()
        np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()
    merged = model.merge_and_unload()
    m = "base_model.model.model.layers.1.self_attn.q_proj"
    got_delta = merged.model.layers[1].self_attn.q_proj.weight.detach().double().numpy() - base_q
    np.testing.assert_allclose(got_delta, dense_delta(agg, m), atol=1e-6)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "clipped-fedavg", "multi-krum", "geomedian"])
def test_robust_strategies_resist_one_outlier(updates, name):
    """A fourth client whose ΔW is a million times an honest one's, claiming 10,000 samples,
    leaves every robust aggregate within twice the largest honest update (a coordinate-wise
    statistic may combine large entries of different clients; a geometric median gives the
    outlier a tiny but non-zero share); fedavg-exact is captured by it."""
    bad = updates[0].adapter
    huge = Adapter(bad.config, {k: v * 1e3 for k, v in bad.tensors.items()})  # ΔW = B·A: 1e6x
    pool = [*updates, ClientUpdate("0xoutlier", 10_000, huge)]

    def size(adapter: Adapter) -> float:
        return float(np.sqrt(sum(np.sum(dense_delta(adapter, m) ** 2) for m in adapter.lora_modules())))

    honest_max = max(size(u.adapter) for u in updates)
    result = get_strategy(name).aggregate(pool, None)
    assert size(result.adapter) <= 2 * honest_max
    if name not in ("median", "trimmed-mean"):  # coordinate-wise: one client one vote, no weights
        assert result.metrics["capped_samples"]["0xoutlier"] < 10_000
    assert size(get_strategy("fedavg-exact").aggregate(pool, None).adapter) > 100 * honest_max


def test_bad_updates_are_refused_with_the_client_named(updates):
    fedavg = get_strategy("fedavg")
    with pytest.raises(ValueError, match="no updates"):
        fedavg.aggregate([], None)
    with pytest.raises(ValueError, match="0xclient0 appears more than once"):
        fedavg.aggregate([updates[0], updates[0]], None)
    zero = ClientUpdate("0xzero", 0, updates[0].adapter)
    with pytest.raises(ValueError, match="0xzero: num_samples must be positive"):
        fedavg.aggregate([updates[1], zero], None)
    a = updates[1].adapter
    key = sorted(a.tensors)[0]
    wrong = Adapter(a.config, {**a.tensors, key: np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=f"0xwrong: tensor {key}"):
        get_strategy("fedavg-exact").aggregate([updates[0], ClientUpdate("0xwrong", 5, wrong)])
    with pytest.raises(ValueError, match="unknown aggregation strategy 'nope'; known: .*fedavg"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="bad options"):
        get_strategy("fedavg", momentum=0.9)
    with pytest.raises(ValueError, match="needs the round's global adapter"):
        get_strategy("fedavg", server_lr=0.5).aggregate(updates, None)
    assert {
        "fedavg", "fedavg-exact", "median", "trimmed-mean", "clipped-fedavg", "multi-krum", "krum", "geomedian"
    } <= set(available_strategies())


def test_server_learning_rate_moves_part_way(updates):
    g = updates[0].adapter
    plain = get_strategy("fedavg").aggregate(updates, g).adapter
    half = get_strategy("fedavg", server_lr=0.5).aggregate(updates, g).adapter
    for k, v in g.tensors.items():
        want = 0.5 * (v.astype(np.float64) + plain.tensors[k].astype(np.float64))
        np.testing.assert_allclose(half.tensors[k], want, rtol=1e-5, atol=1e-7)


def test_aggregate_config_is_the_global_or_first_client(updates, tmp_path):
    result = get_strategy("fedavg").aggregate(list(reversed(updates)), None)
    assert result.adapter.config == updates[0].adapter.config
    out = save_adapter(result.adapter, tmp_path / "agg")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(TARGETS)


@pytest.mark.parametrize("split", ["balanced", "B"])
def test_exact_null_directions(updates, split):
    """A ΔW of lower rank than the output rank (shared A, or B still at PEFT's zero init) is
    reproduced exactly; with ``split="B"`` the spare rows of A' stay orthonormal, so training can
    resume on them."""
    shared = updates[0].adapter
    modules = shared.lora_modules()
    same_a = [
        ClientUpdate(
            u.client,
            u.num_samples,
            Adapter(
                u.adapter.config,
                {
                    k: shared.tensors[k] if k.endswith(LORA_A_SUFFIX) else v
                    for k, v in u.adapter.tensors.items()
                },
            ),
        )
        for u in updates
    ]
    wider = Adapter(dict(shared.config, r=8, lora_alpha=16), {})  # same scaling, rank 8 > 4
    zero_b = [
        ClientUpdate(
            u.client,
            u.num_samples,
            Adapter(
                u.adapter.config,
                {
                    k: v * 0 if k.endswith(LORA_B_SUFFIX) else v
                    for k, v in u.adapter.tensors.items()
                },
            ),
        )
        for u in updates
    ]
    strategy = get_strategy("fedavg-exact", split=split)
    for pool, global_adapter in ((same_a, wider), (zero_b, None)):
        result = strategy.aggregate(pool, global_adapter)
        assert result.metrics["rel_frobenius_error_overall"] < 1e-6
        for m in modules:
            target = weighted_dense_delta(pool, m)
            got = dense_delta(result.adapter, m)
            assert np.linalg.norm(target - got) <= 1e-5 * max(np.linalg.norm(target), 1e-12)
            a = result.adapter.tensors[m + LORA_A_SUFFIX].astype(np.float64)
            assert np.isfinite(a).all()
            if split == "B":
                np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-5)
