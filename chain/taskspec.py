"""The task specification: the hyper-parameter file whose CID a task carries on chain.

Nodes read the LoRA and training settings from it, the aggregator the LoRA shapes, the
strategy and the norm bound; governance writes it once. It is canonical JSON (sorted keys, no
whitespace) so the same settings always give the same bytes and therefore the same CID.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_FORMAT = "prismesh-task/1"
METRIC_SCORINGS = ("letter", "mean", "sum")  # the node evaluator's scorings
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Build notes a model directory may carry; like documentation and hidden files they do not
# define the model, so model_fingerprint skips them.
BUILD_INFO_NAME = "prismesh_build.json"
_FINGERPRINT_EXCLUDE_SUFFIXES = (".md",)
_FINGERPRINT_EXCLUDE_NAMES = {BUILD_INFO_NAME, "LICENSE", "NOTICE"}


class TaskSpecError(ValueError):
    """A task specification that is malformed; the message names the field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# The training settings a task may fix for every node (the ``train`` section), with what each
# must be. The node's trainer reads the same names (``TrainConfig``: a test keeps the two lists
# equal); LoRA's shape lives in ``lora`` and the device is each host's own choice.
TRAIN_FIELDS: dict[str, tuple[str, Any]] = {
    "lr": ("a number > 0", lambda v: _is_num(v) and v > 0),
    "epochs": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "grad_accum": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "max_length": ("an integer >= 8", lambda v: _is_int(v) and v >= 8),
    "seed": ("an integer", _is_int),
    "bf16": ("'auto', true or false", lambda v: v in ("auto", True, False)),
    "weight_decay": ("a number >= 0", lambda v: _is_num(v) and v >= 0),
    "warmup_steps": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "max_grad_norm": ("a number >= 0 (0 disables clipping)", lambda v: _is_num(v) and v >= 0),
    # Sample-level DP (DP-SGD): per-example clipping to dp_clip and Gaussian noise of
    # dp_noise_multiplier * dp_clip on each Poisson-sampled batch; 0 turns it off.
    "dp_noise_multiplier": ("a number >= 0 (0: no DP-SGD)", lambda v: _is_num(v) and v >= 0),
    "dp_clip": ("a number > 0 (per-example gradient norm bound)", lambda v: _is_num(v) and v > 0),
    "prox_mu": ("a number >= 0 (FedProx's proximal weight; 0 = off)", lambda v: _is_num(v) and v >= 0),
}


def check_train(train: dict[str, Any], where: str = "train") -> None:
    """Refuse unknown training settings (naming the known ones) and out-of-range values."""
    unknown = sorted(set(train) - set(TRAIN_FIELDS))
    if unknown:
        raise TaskSpecError(
            f"{where}: unknown field(s) {unknown}; known: {sorted(TRAIN_FIELDS)}"
        )
    for key, value in train.items():
        expected, ok = TRAIN_FIELDS[key]
        if not ok(value):
            raise TaskSpecError(f"field '{where}.{key}' must be {expected}, got {value!r}")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings, in PEFT's own names so they map onto ``LoraConfig`` unchanged."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass(frozen=True)
class TaskSpec:
    """Everything a participant needs to train and an aggregator needs to check and merge.

    ``model_config`` carries the base model's ``config.json`` so an aggregator (or an auditor)
    can check adapter shapes without holding the model's weights."""

    base_model_id: str
    base_model_sha256: str
    lora: LoraSpec = field(default_factory=LoraSpec)
    model_config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    strategy: str = "clipped-fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    norm_bound: float = 1.0e4
    report_metrics: bool = True
    # How nodes score the accuracy they report: "letter" (the option key after the answer cue,
    # the MedQA standard), "mean" (length-normalised answer-line likelihood) or "sum".
    metric_scoring: str = "letter"
    test_fraction: float = 0.2
    split_seed: int = 0
    privacy: dict[str, Any] = field(default_factory=dict)
    format: str = SPEC_FORMAT

    def __post_init__(self) -> None:
        _require(isinstance(self.base_model_id, str) and self.base_model_id, "base_model_id", "a non-empty string")
        h = self.base_model_sha256
        _require(
            isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h),
            "base_model_sha256",
            "64 lower-case hex characters",
        )
        lo = self.lora
        _require(isinstance(lo.r, int) and lo.r >= 1, "lora.r", "an integer >= 1")
        _require(isinstance(lo.lora_alpha, (int, float)) and lo.lora_alpha > 0, "lora.lora_alpha", "> 0")
        _require(0.0 <= float(lo.lora_dropout) < 1.0, "lora.lora_dropout", "in [0, 1)")
        _require(
            len(lo.target_modules) > 0 and all(isinstance(m, str) and m for m in lo.target_modules),
            "lora.target_modules",
            "a non-empty list of module names",
        )
        _require(isinstance(self.model_config, dict), "model_config", "an object (the base model's config.json)")
        _require(isinstance(self.train, dict), "train", "an object")
        for key in ("rank", "alpha", "dropout", "target_modules"):
            _require(key not in self.train, f"train.{key}", "absent (LoRA settings belong in 'lora')")
        check_train(self.train)
        _require(isinstance(self.strategy, str) and self.strategy, "strategy", "a strategy name")
        _require(isinstance(self.strategy_options, dict), "strategy_options", "an object")
        _require(
            isinstance(self.norm_bound, (int, float)) and math.isfinite(self.norm_bound) and self.norm_bound > 0,
            "norm_bound",
            "a finite number > 0",
        )
        _require(0.0 < float(self.test_fraction) < 1.0, "test_fraction", "in (0, 1)")
        from prismesh.chain.privacy import PrivacySpec, PrivacySpecError

        try:
            privacy = PrivacySpec.from_dict(self.privacy)
        except PrivacySpecError as exc:
            raise TaskSpecError(str(exc)) from None
        if privacy.central_dp and self.strategy != "fedavg-exact":
            raise TaskSpecError(
                "field 'strategy' must be 'fedavg-exact' with client-level DP at the aggregator: the aggregate is "
                f"the mean of the clipped updates in ΔW space plus noise, got {self.strategy!r}")
        _require(self.metric_scoring in METRIC_SCORINGS, "metric_scoring", f"one of {METRIC_SCORINGS}")
        _require(self.format == SPEC_FORMAT, "format", f"{SPEC_FORMAT!r}")

    @property
    def privacy_spec(self) -> Any:
        """The validated privacy settings (``prismesh.chain.privacy.PrivacySpec``)."""
        from prismesh.chain.privacy import PrivacySpec

        return PrivacySpec.from_dict(self.privacy)

    @property
    def base_model_hash(self) -> bytes:
        """The 32 bytes stored on chain as the task's base-model hash."""
        return bytes.fromhex(self.base_model_sha256)

    def train_config(self) -> dict[str, Any]:
        """The node trainer's configuration: the optimisation settings plus the LoRA shape."""
        cfg = dict(self.train)
        cfg.update(
            rank=self.lora.r,
            alpha=self.lora.lora_alpha,
            dropout=self.lora.lora_dropout,
            target_modules=list(self.lora.target_modules),
        )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        if not self.privacy:
            del d["privacy"]  # a spec without privacy settings keeps its bytes (and its CID)
        return d

    def to_bytes(self) -> bytes:
        """Canonical JSON: the bytes whose CID goes on chain."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any, where: str = "task spec") -> TaskSpec:
        if not isinstance(data, dict):
            raise TaskSpecError(f"{where}: expected an object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskSpecError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        lora = values.pop("lora", {})
        if not isinstance(lora, dict):
            raise TaskSpecError(f"{where}: field 'lora' must be an object")
        lora_known = set(LoraSpec.__dataclass_fields__)
        bad = sorted(set(lora) - lora_known)
        if bad:
            raise TaskSpecError(f"{where}: unknown lora field(s) {bad}; known: {sorted(lora_known)}")
        if "target_modules" in lora:
            lora = {**lora, "target_modules": tuple(lora["target_modules"])}
        try:
            return cls(lora=LoraSpec(**lora), **values)
        except TaskSpecError as exc:
            raise TaskSpecError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise TaskSpecError(f"{where}: {exc}") from None

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "task spec") -> TaskSpec:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TaskSpecError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)


def _require(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise TaskSpecError(f"field {name!r} must be {expected}")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 (hex) over the names and bytes of a model directory's weight, config and tokenizer
    files, in name order: the base-model hash a task records on chain and every node checks its
    local copy against before it joins."""
    model_dir = Path(model_dir)
    files = sorted(
        p for p in model_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _FINGERPRINT_EXCLUDE_NAMES
        and not p.name.endswith(_FINGERPRINT_EXCLUDE_SUFFIXES)
    )
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"{model_dir}: no weight files (*.safetensors / *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        h.update(p.stat().st_size.to_bytes(8, "big"))
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
