"""Adapter verification and the deterministic PEFT adapter codec, against real PEFT output."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from prismesh.aggregator.adapters import (
    CONFIG_NAME,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    WEIGHTS_NAME,
    Adapter,
    AdapterFormatError,
    deserialize_safetensors,
    load_adapter,
    save_adapter,
    serialize_safetensors,
)
from prismesh.aggregator.verify import MAX_NAMED, expected_lora_shapes, verify_adapter

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN3 = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=32,
)
LLAMA = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def peft_save(arch: str, lora: dict, out: Path, seed: int = 0) -> tuple[dict, Path]:
    """Build a tiny model from a config, wrap it with PEFT, give B non-zero values, save it.

    Returns the model's ``config.json`` dict (as a user's base model directory would hold it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3))
    else:
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(out))
    return model.config.to_dict(), out


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors.numpy import load_file

    return {k: tuple(v.shape) for k, v in load_file(str(path / WEIGHTS_NAME)).items()}


PEFT_CASES = {
    "qwen3-all7": ("qwen3", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "llama-subset": (
        "llama",
        dict(
            r=6,
            lora_alpha=12,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=[0, 2],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
    ),
    "qwen3-all-linear-dora": ("qwen3", dict(r=2, target_modules="all-linear", use_dora=True)),
    "qwen3-regex-bias": (
        "qwen3",
        dict(
            r=3,
            target_modules=r".*\.(mlp\.up_proj|self_attn\.[ko]_proj)",
            lora_bias=True,
            exclude_modules=["model.layers.1.self_attn.k_proj"],
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_expected_shapes_match_real_peft(case, tmp_path):
    arch, lora = PEFT_CASES[case]
    model_cfg, out = peft_save(arch, lora, tmp_path / case)
    want = saved_shapes(out)
    assert expected_lora_shapes(model_cfg, lora) == want
    if arch == "llama":  # a config.json without head_dim implies hidden/heads
        model_cfg.pop("head_dim", None)
        assert expected_lora_shapes(model_cfg, lora) == want
    # the task config as PEFT writes it (every field) gives the same answer
    saved_cfg = json.loads((out / CONFIG_NAME).read_text())
    assert expected_lora_shapes(model_cfg, saved_cfg) == want
    adapter = load_adapter(out)
    assert verify_adapter(adapter, want, lora, norm_bound=None) == []


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    lora = dict(r=4, lora_alpha=8, target_modules=ALL7)
    model_cfg, out = peft_save("qwen3", lora, tmp_path_factory.mktemp("honest") / "a")
    return model_cfg, lora, expected_lora_shapes(model_cfg, lora), load_adapter(out)


def with_tensor(adapter: Adapter, key: str, value) -> Adapter:
    return Adapter(dict(adapter.config), {**adapter.tensors, key: value})


def test_honest_adapter_passes(honest):
    _, lora, shapes, adapter = honest
    assert verify_adapter(adapter, shapes, lora, norm_bound=1e6) == []
    reordered = dict(lora, target_modules=list(reversed(ALL7)))
    assert verify_adapter(adapter, shapes, reordered, norm_bound=None) == []


def test_non_finite_values_are_named(honest):
    _, lora, shapes, adapter = honest
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    bad = adapter.tensors[key].copy()
    bad[0, 0], bad[1, 1], bad[2, 2] = np.nan, np.inf, -np.inf
    reasons = verify_adapter(with_tensor(adapter, key, bad), shapes, lora, 1e6)
    assert reasons == [f"non-finite values: {key} has 1 NaN and 2 infinite values"]


def test_shapes_keys_and_dtypes(honest):
    _, lora, shapes, adapter = honest
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    reasons = verify_adapter(with_tensor(adapter, key, adapter.tensors[key].T), shapes, lora, None)
    assert reasons == [f"wrong shape: {key} has shape (64, 4), expected (4, 64)"]

    tensors = dict(adapter.tensors)
    del tensors[key]
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    reasons = verify_adapter(Adapter(adapter.config, tensors), shapes, lora, None)
    assert reasons == [
        f"missing tensor: {key}",
        "unexpected tensor: base_model.model.lm_head.lora_A.weight",
    ]

    as_int = adapter.tensors[key].astype(np.int32)
    reasons = verify_adapter(with_tensor(adapter, key, as_int), shapes, lora, None)
    assert reasons == [f"wrong dtype: {key} has dtype int32, expected a float dtype"]


def test_wrong_rank_and_alpha_are_reported(honest, tmp_path):
    model_cfg, lora, shapes, _ = honest
    _, out = peft_save("qwen3", dict(r=8, lora_alpha=16, target_modules=ALL7), tmp_path / "r8")
    reasons = verify_adapter(load_adapter(out), shapes, lora, None)
    assert reasons[0] == "config r=8 does not match the task's r=4"
    assert reasons[1] == "config lora_alpha=16.0 does not match the task's lora_alpha=8.0"
    shape_reasons = [r for r in reasons if r.startswith("wrong shape: ")]
    # 2 layers x 7 modules x (A, B) wrong, named up to MAX_NAMED, the rest counted
    assert len(shape_reasons) == MAX_NAMED + 1
    assert shape_reasons[-1] == f"wrong shape: ... and {28 - MAX_NAMED} more"

    _, out = peft_save("qwen3", dict(r=4, lora_alpha=8, target_modules=ALL7[:4]), tmp_path / "t4")
    reasons = verify_adapter(load_adapter(out), shapes, lora, None)
    assert reasons[0] == (
        "config target_modules=['k_proj', 'o_proj', 'q_proj', 'v_proj'] does not select "
        "6 expected module(s), e.g. model.layers.0.mlp.down_proj"
    )
    assert any(r.startswith("missing tensor: ") for r in reasons)


def test_norm_bound_applies_to_the_update_and_names_the_module(honest):
    _, lora, shapes, adapter = honest
    dense = {}
    for m in adapter.lora_modules():
        a = adapter.tensors[m + LORA_A_SUFFIX].astype(np.float64)
        b = adapter.tensors[m + LORA_B_SUFFIX].astype(np.float64)
        dense[m] = np.linalg.norm((lora["lora_alpha"] / lora["r"]) * (b @ a))
    ranked = sorted(dense, key=dense.get)
    top, second = ranked[-1], ranked[-2]
    bound = (dense[top] + dense[second]) / 2
    reasons = verify_adapter(adapter, shapes, lora, bound)
    assert len(reasons) == 1
    assert reasons[0].startswith(f"update norm bound exceeded: {top} has ||ΔW update||_F = ")
    assert verify_adapter(adapter, shapes, lora, dense[top] * 1.001) == []
    # Against a global adapter the bound is on the change: the same adapter a little moved from
    # a large global passes a bound its absolute size would fail, and the global itself is empty.
    moved = Adapter(adapter.config, {
        k: v * 1.01 if k.endswith(LORA_B_SUFFIX) else v for k, v in adapter.tensors.items()
    })
    assert verify_adapter(moved, shapes, lora, dense[top] * 0.02, global_adapter=adapter) == []
    assert verify_adapter(moved, shapes, lora, dense[top] * 0.005, global_adapter=adapter)[0].startswith(
        "update norm bound exceeded: "
    )
    assert verify_adapter(adapter, shapes, lora, None, global_adapter=adapter) == [
        "empty update: the adapter makes no change to the round's global adapter"
    ]
    zero_b = Adapter(adapter.config, {
        k: np.zeros_like(v) if k.endswith(LORA_B_SUFFIX) else v for k, v in adapter.tensors.items()
    })
    assert verify_adapter(zero_b, shapes, lora, None) == [
        "empty update: the adapter makes no change to the bare base model"
    ]


def test_expected_shapes_refuse_bad_configs():
    lora = dict(r=4, target_modules=ALL7)
    with pytest.raises(ValueError, match="lacks hidden_size, intermediate_size"):
        expected_lora_shapes({"num_hidden_layers": 2, "num_attention_heads": 2}, lora)
    with pytest.raises(ValueError, match=r"\['lm_head'\] are not among"):
        expected_lora_shapes(QWEN3, dict(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="select no module"):
        expected_lora_shapes(QWEN3, dict(r=4, target_modules=r".*\.nothing"))
    with pytest.raises(ValueError, match="no target_modules"):
        expected_lora_shapes(QWEN3, dict(r=4))
    nested = {"text_config": QWEN3, "model_type": "multimodal"}
    assert expected_lora_shapes(nested, lora) == expected_lora_shapes(QWEN3, lora)


# --- the adapter codec -------------------------------------------------------------------------


def test_peft_dir_round_trip_is_exact_and_readable_by_safetensors(honest, tmp_path):
    from safetensors import safe_open

    _, _, _, adapter = honest
    out = save_adapter(adapter, tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(str(out / WEIGHTS_NAME), "np") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert sorted(fh.keys()) == sorted(adapter.tensors)
        for k in fh.keys():
            np.testing.assert_array_equal(fh.get_tensor(k), adapter.tensors[k])
    again = load_adapter(out)
    assert again.config == adapter.config | {"target_modules": sorted(ALL7)}
    assert save_adapter(again, tmp_path / "copy2") and all(
        (tmp_path / "copy" / n).read_bytes() == (tmp_path / "copy2" / n).read_bytes()
        for n in (CONFIG_NAME, WEIGHTS_NAME)
    )


def test_bytes_do_not_depend_on_insertion_order_and_mixed_dtypes_align(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(1)
    tensors = {
        "h": rng.standard_normal((3, 5)).astype(np.float16),
        "d": rng.standard_normal((7,)),
        "f": rng.standard_normal((2, 3)).astype(np.float32),
        "g": rng.standard_normal((1,)).astype(np.float16),
    }
    cfg = {"r": 2, "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"}
    a = Adapter(cfg, tensors)
    b = Adapter(
        {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": 2},
        dict(reversed(list(tensors.items()))),
    )
    blob = serialize_safetensors(a.tensors)
    assert blob == serialize_safetensors(b.tensors)
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8 : 8 + n])
    for k, v in tensors.items():
        assert header[k]["data_offsets"][0] % v.dtype.itemsize == 0
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    back = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)


def test_bf16_is_read_exactly_as_float32(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"x": t, "y": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    out = deserialize_safetensors((tmp_path / "w.safetensors").read_bytes())
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], t.float().numpy())
    with pytest.raises(ValueError, match="x: bfloat16 tensors cannot be written"):
        serialize_safetensors({"x": t})


def test_malformed_files_are_refused_naming_the_file(tmp_path):
    good = serialize_safetensors({"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)})
    (n,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8 : 8 + n])

    def with_header(h: dict, body: bytes) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    body = good[8 + n :]
    holey = dict(header, b=dict(header["b"], data_offsets=[20, 32]))
    cases = {
        "too short": good[:5],
        "exceeds the file": struct.pack("<Q", 10**6) + good[8:],
        "not JSON": struct.pack("<Q", 4) + b"{{{{" + body,
        "outside the data": with_header(
            dict(header, b=dict(header["b"], data_offsets=[16, 99])), body
        ),
        "do not match shape": with_header(dict(header, b=dict(header["b"], shape=[4])), body),
        "leaves a hole": with_header(holey, body + b"\0" * 4),
        "trailing bytes": good + b"\0" * 8,
        "unsupported dtype": with_header(dict(header, b=dict(header["b"], dtype="F8_E4M3")), body),
    }
    for why, blob in cases.items():
        d = tmp_path / why.replace(" ", "_")
        d.mkdir()
        (d / CONFIG_NAME).write_text("{}")
        (d / WEIGHTS_NAME).write_bytes(blob)
        with pytest.raises(AdapterFormatError, match=why) as err:
            load_adapter(d)
        assert str(d / WEIGHTS_NAME) in str(err.value)
    d = tmp_path / "badcfg"
    d.mkdir()
    (d / CONFIG_NAME).write_text("{not json")
    (d / WEIGHTS_NAME).write_bytes(good)
    with pytest.raises(AdapterFormatError, match="adapter_config.json: not valid JSON"):
        load_adapter(d)
    with pytest.raises(AdapterFormatError, match="missing adapter_config.json"):
        load_adapter(tmp_path / "absent")


def test_save_is_atomic_and_replaces(tmp_path):
    first = Adapter({"r": 1}, {"x": np.ones(2, np.float32)})
    out = save_adapter(first, tmp_path / "agg")
    with pytest.raises(ValueError, match="not canonical JSON"):
        save_adapter(Adapter({"r": float("nan")}, {"x": np.zeros(2, np.float32)}), out)
    with pytest.raises(TypeError, match="x: expected a numpy array"):
        save_adapter(Adapter({"r": 1}, {"x": [1.0, 2.0]}), out)
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(first, out, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg"]  # no temp dirs left behind
    np.testing.assert_array_equal(load_adapter(out).tensors["x"], np.ones(2))
    save_adapter(Adapter({"r": 2}, {"x": np.zeros(2, np.float32)}), out)
    assert load_adapter(out).config == {"r": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg"]
