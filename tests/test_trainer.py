"""LoRA trainer: config validation, loss falls, PEFT round trip, determinism, atomic builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from prismesh.chain.taskspec import model_fingerprint
from prismesh.node import basemodel
from prismesh.node.data import format_completion, format_prompt, load_jsonl
from prismesh.node.synthetic import make_benchmark
from prismesh.node.trainer import (
    ADAPTER_FILES,
    TrainConfig,
    TrainConfigError,
    create_initial_adapter,
    train_lora,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    specs = make_benchmark(root / "data", seed=0, scale=0.2)
    examples = load_jsonl(specs[2].train_path)[:32]
    texts = [format_prompt(m) + format_completion(m) for s in specs for m in load_jsonl(s.train_path)]
    model = basemodel.build_random_model(root / "model", texts, seed=0)
    return model, examples


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "rank": 4, "alpha": 8, "max_length": 96, **kw})


def test_config_from_dict_rejects_unknown_keys_and_round_trips():
    c = TrainConfig.from_dict({"rank": 16, "alpha": 32, "lr": 1e-4, "target_modules": ["q_proj", "v_proj"]})
    assert c.rank == 16 and c.target_modules == ("q_proj", "v_proj")
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()
    d = TrainConfig()
    assert (d.rank, d.alpha, d.dropout, d.epochs, d.batch_size, d.grad_accum) == (8, 16, 0.1, 1, 1, 4)
    assert set(d.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(TrainConfigError, match=r"unknown training config key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(TrainConfigError, match="rank must be >= 1"):
        TrainConfig.from_dict({"rank": 0})
    with pytest.raises(TrainConfigError, match="bf16"):
        TrainConfig.from_dict({"bf16": "yes"})


def test_loss_falls_and_adapter_is_standard_peft(bench, tmp_path):
    model, examples = bench
    # The same answer text at a rotating letter: a regularity a LoRA picks up in a few steps.
    target = examples[0].answer_text
    learnable = []
    for i, m in enumerate(examples):
        texts = [t for t in m.options.values() if t != target][:3]
        texts.insert(i % 4, target)
        opts = dict(zip("ABCD", texts, strict=True))
        learnable.append(dataclasses.replace(m, options=opts, answer="ABCD"[i % 4]))
    res = train_lora(model, learnable, tmp_path / "ad", cfg(epochs=4, lr=3e-2), progress=False)
    m = res.metrics
    assert res.num_samples == 32
    assert m["epoch_losses"][-1] < 0.75 * m["epoch_losses"][0], m
    assert m["final_loss"] < m["first_loss"]
    assert m["optimizer_steps"] == 4 * 8  # 32 samples, batch 1 x accumulation 4
    assert m["tokens_per_s"] > 0 and m["train_tokens"] > 0
    assert sorted(p.name for p in res.adapter_dir.iterdir()) == sorted(ADAPTER_FILES)
    conf = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["lora_dropout"] == 0.1
    assert set(conf["target_modules"]) == set(TrainConfig().target_modules)


def test_peft_round_trip_and_determinism(bench, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, examples = bench
    a = train_lora(model, examples[:12], tmp_path / "a", cfg(), progress=False)
    b = train_lora(model, examples[:12], tmp_path / "b", cfg(), progress=False)
    c = train_lora(model, examples[:12], tmp_path / "c", cfg(seed=1), progress=False)
    blob = lambda r: (r.adapter_dir / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert blob(a) == blob(b)  # same inputs and seed: identical bytes on CPU
    assert blob(a) != blob(c)

    saved = load_file(str(a.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    base = AutoModelForCausalLM.from_pretrained(model)
    ids = torch.arange(5, 25)[None]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft = PeftModel.from_pretrained(base, str(a.adapter_dir)).eval()
    state = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    for k, v in saved.items():
        key = next(s for s in state if s.endswith(k.split("base_model.model.")[-1]))
        assert torch.equal(state[key], v)
    with torch.no_grad():
        assert not torch.allclose(peft(input_ids=ids).logits, base_logits)


def test_adapter_bytes_do_not_depend_on_where_the_model_lives(bench, tmp_path):
    import shutil

    model, examples = bench
    elsewhere = shutil.copytree(model, tmp_path / "hospital-disk" / "models" / "local-copy")
    a = train_lora(model, examples[:6], tmp_path / "a", cfg(), progress=False, base_model_name="task-model")
    b = train_lora(elsewhere, examples[:6], tmp_path / "b", cfg(), progress=False, base_model_name="task-model")
    for name in ADAPTER_FILES:
        assert (a.adapter_dir / name).read_bytes() == (b.adapter_dir / name).read_bytes(), name
    conf = json.loads((a.adapter_dir / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "task-model"
    # Without a name the directory's name is recorded, never the host's absolute path.
    init = create_initial_adapter(elsewhere, tmp_path / "init", cfg())
    conf = json.loads((init / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "local-copy"


def test_continue_from_global_adapter_and_config_mismatch(bench, tmp_path):
    from safetensors.torch import load_file

    model, examples = bench
    init = create_initial_adapter(model, tmp_path / "init", cfg())
    zero = load_file(str(init / "adapter_model.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in zero.items() if "lora_B" in k)
    fresh = train_lora(model, examples[:8], tmp_path / "fresh", cfg(), progress=False)
    cont = train_lora(model, examples[:8], tmp_path / "cont", cfg(), init_adapter=init, progress=False)
    # The round-0 adapter is the seeded fresh LoRA, so starting from it changes nothing.
    assert (fresh.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        cont.adapter_dir / "adapter_model.safetensors").read_bytes()
    again = train_lora(model, examples[:8], tmp_path / "again", cfg(), init_adapter=cont.adapter_dir, progress=False)
    assert again.metrics["first_loss"] < cont.metrics["first_loss"]
    assert again.metrics["started_from"] == str(cont.adapter_dir)
    with pytest.raises(TrainConfigError, match="rank: adapter 4 vs config 8"):
        train_lora(model, examples[:4], tmp_path / "bad", cfg(rank=8), init_adapter=init, progress=False)
    assert not (tmp_path / "bad").exists()


def test_base_model_build_is_atomic_and_cached(tmp_path, monkeypatch):
    def crash(out_dir: Path, seed: int = 0, progress: bool = False) -> None:
        (Path(out_dir) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(basemodel, "build_base_model", crash)
    with pytest.raises(RuntimeError):
        basemodel.ensure_base_model(tmp_path, seed=5)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    def tiny(out_dir: Path, seed: int = 0, progress: bool = False) -> None:
        basemodel.build_random_model(out_dir, ["Question: a b c Answer: d"], seed=seed)

    monkeypatch.setattr(basemodel, "build_base_model", tiny)
    path = basemodel.ensure_base_model(tmp_path, seed=5)
    assert path == basemodel.default_model_dir(tmp_path, 5) and basemodel.is_model_dir(path)
    fp = model_fingerprint(path)
    monkeypatch.setattr(basemodel, "build_base_model", crash)
    assert basemodel.ensure_base_model(tmp_path, seed=5) == path  # cached: no rebuild
    assert model_fingerprint(path) == fp and len(fp) == 64
    cfg_file = path / "config.json"
    cfg_file.write_text(cfg_file.read_text() + " ")
    assert model_fingerprint(path) != fp
