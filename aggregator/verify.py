"""Checks an aggregator applies to every revealed adapter before it may enter an aggregate.

A client's adapter is untrusted input: it must have exactly the tensors the task's base model and
LoRA config imply, with the right shapes and the task's rank/alpha, finite values, and an
*update* (its ΔW minus the round's global adapter's, per module) that is not empty and within
the task's norm bound. The absolute size of an adapter says nothing about what one round did to
it; the update does. Each failed check yields a human-readable reason that names the tensor or
module, so a rejection can be reported on chain and audited. Checks that compare an update with
the rest of the round (its size against the round's median) belong to the robust strategies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PEFT_KEY_PREFIX,
    Adapter,
    module_rank_alpha,
)
from prismesh.aggregator.updates import module_update_norms

# LLaMA/Qwen3-style decoder: module -> (parent block, input width, output width) as functions of
# (hidden, intermediate, q width = heads*head_dim, kv width = kv_heads*head_dim).
_DECODER_LINEARS: dict[str, tuple[str, str, str]] = {
    "q_proj": ("self_attn", "hidden", "q"),
    "k_proj": ("self_attn", "hidden", "kv"),
    "v_proj": ("self_attn", "hidden", "kv"),
    "o_proj": ("self_attn", "q", "hidden"),
    "gate_proj": ("mlp", "hidden", "inter"),
    "up_proj": ("mlp", "hidden", "inter"),
    "down_proj": ("mlp", "inter", "hidden"),
}
MAX_NAMED = 5  # tensors named per kind of problem before the rest are counted


def _text_config(model_config: Mapping[str, Any]) -> Mapping[str, Any]:
    if "hidden_size" not in model_config and isinstance(model_config.get("text_config"), Mapping):
        return model_config["text_config"]
    return model_config


def _targets(lora_config: Mapping[str, Any], name: str) -> bool:
    """PEFT's rule for whether ``target_modules`` selects a module name (minus layer filters)."""
    tm = lora_config.get("target_modules")
    if isinstance(tm, str):
        if tm == "all-linear":
            return True
        return re.fullmatch(tm, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in tm)


def _excluded(lora_config: Mapping[str, Any], name: str) -> bool:
    ex = lora_config.get("exclude_modules")
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return any(name == e or name.endswith(f".{e}") for e in ex)


def _layer_ok(lora_config: Mapping[str, Any], name: str) -> bool:
    only = lora_config.get("layers_to_transform")
    if only is None or only == []:
        return True
    only = [only] if isinstance(only, int) else only
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return match is not None and int(match["idx"]) in set(only)


def selects(lora_config: Mapping[str, Any], name: str) -> bool:
    """Whether ``lora_config`` puts LoRA on module ``name`` (e.g. ``model.layers.0.mlp.up_proj``),
    by PEFT's rules: ``target_modules``, ``exclude_modules`` and ``layers_to_transform``."""
    tm = lora_config.get("target_modules")
    if not tm:
        return False
    return (
        _targets(lora_config, name)
        and not _excluded(lora_config, name)
        and _layer_ok(lora_config, name)
    )


def expected_lora_shapes(
    model_config: Mapping[str, Any], lora_config: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Every tensor key and shape PEFT saves for ``lora_config`` on a LLaMA/Qwen3-style decoder.

    ``model_config`` is the base model's ``config.json`` (``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, optional ``num_key_value_heads`` and
    ``head_dim``). Honours ``target_modules`` (names, a regex string or ``"all-linear"``),
    ``exclude_modules``, ``layers_to_transform``, ``rank_pattern``, ``use_dora`` and ``lora_bias``.
    Raises ``ValueError`` naming the field when the configs cannot describe an adapter.
    """
    cfg = _text_config(model_config)
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if cfg.get(k) is None
    ]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    widths = {
        "hidden": hidden,
        "inter": inter,
        "q": heads * int(head_dim),
        "kv": kv_heads * int(head_dim),
    }

    tm = lora_config.get("target_modules")
    if tm is None or (not isinstance(tm, str) and len(tm) == 0):
        raise ValueError("LoRA config has no target_modules")
    if not isinstance(tm, str):
        unknown = sorted(t for t in tm if t.rsplit(".", 1)[-1] not in _DECODER_LINEARS)
        if unknown:
            raise ValueError(
                f"target_modules {unknown} are not among the decoder's LoRA-able linears "
                f"{sorted(_DECODER_LINEARS)}"
            )
    use_dora = bool(lora_config.get("use_dora", False))
    lora_bias = bool(lora_config.get("lora_bias", False))

    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for proj, (parent, w_in, w_out) in _DECODER_LINEARS.items():
            name = f"model.layers.{i}.{parent}.{proj}"
            if not selects(lora_config, name):
                continue
            r, _ = module_rank_alpha(lora_config, name)
            prefix = PEFT_KEY_PREFIX + name
            shapes[prefix + LORA_A_SUFFIX] = (r, widths[w_in])
            shapes[prefix + LORA_B_SUFFIX] = (widths[w_out], r)
            if lora_bias:
                shapes[prefix + ".lora_B.bias"] = (widths[w_out],)
            if use_dora:
                shapes[prefix + ".lora_magnitude_vector"] = (widths[w_out],)
    if not shapes:
        raise ValueError(f"target_modules {tm!r} select no module of the model")
    return dict(sorted(shapes.items()))


def _normalize(key: str, value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        value = sorted(value)
    if key == "lora_alpha" and value is not None:
        value = float(value)
    if isinstance(value, (list, dict)) and not value:
        return None
    return value


def _config_reasons(cfg: Mapping[str, Any], task: Mapping[str, Any]) -> list[str]:
    reasons: list[str] = []
    if cfg.get("peft_type", "LORA") != "LORA":
        reasons.append(f"config peft_type={cfg.get('peft_type')!r} is not LORA")
    defaults: dict[str, Any] = {
        "r": None,
        "lora_alpha": 8,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    for key, default in defaults.items():
        if key not in task:
            continue
        want, got = _normalize(key, task[key]), _normalize(key, cfg.get(key, default))
        if got != want:
            reasons.append(f"config {key}={got!r} does not match the task's {key}={want!r}")
    return reasons


def _named(kind: str, items: Sequence[str]) -> list[str]:
    out = [f"{kind}: {item}" for item in items[:MAX_NAMED]]
    if len(items) > MAX_NAMED:
        out.append(f"{kind}: ... and {len(items) - MAX_NAMED} more")
    return out


def verify_adapter(
    adapter: Adapter,
    expected_shapes: Mapping[str, Sequence[int]],
    lora_config: Mapping[str, Any],
    norm_bound: float | None,
    global_adapter: Adapter | None = None,
) -> list[str]:
    """Reasons ``adapter`` must be excluded from the aggregate; an empty list means it passed.

    Checks the config against the task's LoRA config (rank, alpha, targets, variants), the key
    set against ``expected_shapes`` (missing and unexpected tensors), each tensor's shape, dtype
    and finiteness, then the update Δ_m = s·B·A − s_g·B_g·A_g of every module against the round's
    ``global_adapter`` (``None`` or without tensors: the round starts from the bare model, Δ is
    the adapter's own weight change): not all zero (the global returned as is) and, when
    ``norm_bound`` is set, ||Δ_m||_F within it. Each reason names the field, tensor or module.
    """
    reasons = _config_reasons(adapter.config, lora_config)
    # target_modules may be spelled differently (names, a regex, the "all-linear" PEFT resolves
    # to full names): what matters is that the adapter's config selects the expected modules.
    modules = sorted(
        k[len(PEFT_KEY_PREFIX) : -len(LORA_A_SUFFIX)]
        for k in expected_shapes
        if k.endswith(LORA_A_SUFFIX) and k.startswith(PEFT_KEY_PREFIX)
    )
    unselected = [m for m in modules if not selects(adapter.config, m)]
    if unselected:
        reasons.append(
            f"config target_modules={_normalize('target_modules', adapter.config.get('target_modules'))!r} "
            f"does not select {len(unselected)} expected module(s), e.g. {unselected[0]}"
        )
    tensors = adapter.tensors
    expected = {k: tuple(int(d) for d in v) for k, v in expected_shapes.items()}
    reasons += _named("missing tensor", sorted(set(expected) - set(tensors)))
    reasons += _named("unexpected tensor", sorted(set(tensors) - set(expected)))

    bad_shape, bad_dtype, non_finite = [], [], []
    for key in sorted(set(expected) & set(tensors)):
        arr = np.asarray(tensors[key])
        if tuple(arr.shape) != expected[key]:
            bad_shape.append(f"{key} has shape {tuple(arr.shape)}, expected {expected[key]}")
            continue
        if arr.dtype.kind != "f":
            bad_dtype.append(f"{key} has dtype {arr.dtype}, expected a float dtype")
            continue
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum()) - n_nan
            non_finite.append(f"{key} has {n_nan} NaN and {n_inf} infinite values")
            continue
    reasons += _named("wrong shape", bad_shape)
    reasons += _named("wrong dtype", bad_dtype)
    reasons += _named("non-finite values", non_finite)
    if reasons:
        return reasons
    return reasons + update_reasons(adapter, norm_bound, global_adapter)


def update_reasons(adapter: Adapter, norm_bound: float | None, global_adapter: Adapter | None) -> list[str]:
    """The update-level checks of :func:`verify_adapter` on a well-formed adapter: the update is
    not empty, and no module's ||Δ_m||_F exceeds ``norm_bound``."""
    base = global_adapter if global_adapter is not None and global_adapter.tensors else None
    if base is not None:
        differ = sorted(k for k in adapter.tensors if k not in base.tensors)
        if differ:
            return [f"global adapter lacks tensor {differ[0]} that the update carries"]
    sizes = module_update_norms(adapter.as_numpy(), base)
    reasons: list[str] = []
    extra = [k for k in adapter.tensors if not k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))]
    changed_extra = base is None or any(
        not np.array_equal(np.asarray(adapter.tensors[k]), np.asarray(base.tensors[k])) for k in extra
    )
    if sizes and all(v == 0.0 for v in sizes.values()) and not (extra and changed_extra):
        where = "the round's global adapter" if base is not None else "the bare base model"
        reasons.append(f"empty update: the adapter makes no change to {where}")
    if norm_bound is not None:
        over = [
            f"{module} has ||ΔW update||_F = {n:.6g} > {norm_bound:.6g}"
            for module, n in sizes.items()
            if not n <= norm_bound
        ]
        reasons += _named("update norm bound exceeded", over)
    return reasons
