"""Read and write Hugging Face PEFT LoRA adapter directories, deterministically.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, so that
``PeftModel.from_pretrained(base, dir)`` loads it as-is. The aggregate's CID is published on
chain and re-derived by auditors, so the bytes written here must depend on the adapter's content
only: tensors are laid out in a fixed order, the safetensors header is canonical JSON with fixed
metadata, and the config is canonical JSON. The safetensors codec is implemented here (the format
is an 8-byte length, a JSON header and a flat byte buffer) rather than delegated, because the
reference writer does not promise a byte-stable header, and because adapters arrive from other
parties: the reader validates every offset before touching the data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}
MAX_HEADER_BYTES = 100 * 1024 * 1024

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
PEFT_KEY_PREFIX = "base_model.model."

# safetensors dtype tag <-> numpy dtype (little-endian, as the format requires).
_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST: dict[str, str] = {dt.str.lstrip("<>|="): tag for tag, dt in _ST_TO_NP.items()}


class AdapterFormatError(ValueError):
    """An adapter directory or safetensors file is malformed; the message names the file and why."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in PEFT layout: its ``adapter_config.json`` and its named tensors.

    Tensors are numpy arrays (``torch.Tensor`` values are accepted by :func:`save_adapter` and
    :meth:`as_numpy`). Keys are PEFT's saved names, e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` with shape ``[r, in]``.
    """

    config: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)

    def as_numpy(self) -> Adapter:
        """The same adapter with every tensor as a numpy array (torch tensors are copied to CPU)."""
        return Adapter(dict(self.config), {k: to_numpy(v, k) for k, v in self.tensors.items()})

    def lora_modules(self) -> list[str]:
        """Sorted module prefixes that carry both a ``lora_A`` and a ``lora_B`` weight."""
        a = {k[: -len(LORA_A_SUFFIX)] for k in self.tensors if k.endswith(LORA_A_SUFFIX)}
        b = {k[: -len(LORA_B_SUFFIX)] for k in self.tensors if k.endswith(LORA_B_SUFFIX)}
        return sorted(a & b)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The LoRA rank and alpha of one module prefix, honouring ``rank_pattern``/``alpha_pattern``."""
        return module_rank_alpha(self.config, module)

    def scaling(self, module: str) -> float:
        """PEFT's multiplier of ``B @ A`` for one module: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r, alpha = self.rank_alpha(module)
        return lora_scaling(r, alpha, bool(self.config.get("use_rslora", False)))


def peft_module_name(module: str) -> str:
    """The module name PEFT matches patterns against (the saved prefix without ``base_model.model.``)."""
    return module[len(PEFT_KEY_PREFIX) :] if module.startswith(PEFT_KEY_PREFIX) else module


def _pattern_value(patterns: Mapping[str, Any] | None, name: str) -> Any | None:
    # Same rule as peft.utils.other.get_pattern_key: the first key that matches a dotted suffix.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def module_rank_alpha(lora_config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """Rank and alpha that ``lora_config`` gives ``module`` (a saved prefix or a PEFT module name)."""
    if "r" not in lora_config:
        raise ValueError("LoRA config has no 'r' (rank)")
    name = peft_module_name(module)
    r = _pattern_value(lora_config.get("rank_pattern"), name)
    r = int(lora_config["r"] if r is None else r)
    alpha = _pattern_value(lora_config.get("alpha_pattern"), name)
    alpha = float(lora_config.get("lora_alpha", 8) if alpha is None else alpha)
    return r, alpha


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling factor."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def to_numpy(value: Any, name: str = "tensor") -> np.ndarray:
    """A numpy view/copy of a numpy array or torch tensor; refuses bfloat16 (numpy has no such dtype)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            raise ValueError(f"{name}: bfloat16 tensors cannot be written; cast to float32 first")
        return value.detach().cpu().numpy()
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")


def canonical_config_json(config: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an adapter config: sorted keys, sorted lists, 2-space indent, newline.

    PEFT keeps ``target_modules`` (and ``modules_to_save``, ``layers_to_transform``, ...) as sets
    and saves them in hash order, which differs between processes; every list of names or
    indices in a LoRA config means a set, so each top-level list of strings (or of integers) is
    sorted. The same tensors then always give the same bytes, and so the same CID."""
    cfg = dict(config)
    for key, value in cfg.items():
        if isinstance(value, (list, tuple, set, frozenset)) and value:
            items = list(value)
            if all(isinstance(v, str) for v in items) or all(
                isinstance(v, int) and not isinstance(v, bool) for v in items
            ):
                cfg[key] = sorted(items)
    try:
        text = json.dumps(cfg, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"adapter config is not canonical JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def serialize_safetensors(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Byte-stable safetensors encoding.

    Data is laid out by decreasing item size, then name, so every tensor is aligned to its item
    size without holes; the header is compact JSON with sorted keys, padded with spaces to 8 bytes.
    """
    arrays: dict[str, np.ndarray] = {}
    for name in tensors:
        arr = to_numpy(tensors[name], name)
        tag = _NP_TO_ST.get(arr.dtype.str.lstrip("<>|="))
        if tag is None:
            raise ValueError(f"{name}: dtype {arr.dtype} cannot be stored in safetensors")
        arrays[name] = np.ascontiguousarray(arr, dtype=_ST_TO_NP[tag])
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata or SAFETENSORS_METADATA)}
    offset = 0
    for name in order:
        arr = arrays[name]
        tag = _NP_TO_ST[arr.dtype.str.lstrip("<>|=")]
        header[name] = {
            "dtype": tag,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)
    parts = [struct.pack("<Q", len(head)), head]
    parts.extend(arrays[name].tobytes(order="C") for name in order)
    return b"".join(parts)


def deserialize_safetensors(
    data: bytes | bytearray, source: str = "<bytes>"
) -> dict[str, np.ndarray]:
    """Decode safetensors bytes into numpy arrays, validating the header against the buffer.

    BF16 tensors are widened to float32 (exactly; numpy has no bfloat16). Arrays share one
    writable buffer with each other.
    """

    def bad(why: str) -> AdapterFormatError:
        return AdapterFormatError(f"{source}: {why}")

    buf = data if isinstance(data, bytearray) else bytearray(data)
    if len(buf) < 8:
        raise bad("file too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER_BYTES or 8 + n > len(buf):
        raise bad(f"header length {n} exceeds the file ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(buf)[8 + n :]
    spans: list[tuple[int, int, str]] = []
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise bad(f"tensor {name!r} has a malformed header entry") from exc
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(body)):
            raise bad(f"tensor {name!r} has offsets [{begin}, {end}] outside the data")
        itemsize = 2 if tag == "BF16" else _ST_TO_NP[tag].itemsize if tag in _ST_TO_NP else None
        if itemsize is None:
            raise bad(f"tensor {name!r} has unsupported dtype {tag!r}")
        if end - begin != math.prod(shape) * itemsize:
            raise bad(f"tensor {name!r}: {end - begin} bytes do not match shape {shape} of {tag}")
        spans.append((begin, end, name))
        if tag == "BF16":
            raw = np.frombuffer(body[begin:end], dtype="<u2").astype("<u4") << 16
            out[name] = raw.view("<f4").reshape(shape)
        else:
            out[name] = np.frombuffer(body[begin:end], dtype=_ST_TO_NP[tag]).reshape(shape)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise bad(f"tensor {name!r} at offset {begin} leaves a hole or overlaps at {pos}")
        pos = end
    if pos != len(body):
        raise bad(f"{len(body) - pos} trailing bytes after the last tensor")
    return out


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Load a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    root = Path(path)
    cfg_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise AdapterFormatError(f"{root}: missing {p.name}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    tensors = deserialize_safetensors(bytearray(weights_path.read_bytes()), str(weights_path))
    return Adapter(config, tensors)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_adapter(
    adapter: Adapter, out_dir: str | os.PathLike[str], *, overwrite: bool = True
) -> Path:
    """Write ``adapter`` as a PEFT directory at ``out_dir``, atomically; returns the directory.

    Identical adapters give byte-identical files (and so the same CID). The directory is built
    under a temporary sibling name and renamed into place, so a reader never sees half an adapter;
    an existing directory is replaced only when ``overwrite`` is true.
    """
    out = Path(out_dir)
    config_bytes = canonical_config_json(adapter.config)
    weights_bytes = serialize_safetensors(adapter.tensors)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        _write_synced(tmp / CONFIG_NAME, config_bytes)
        _write_synced(tmp / WEIGHTS_NAME, weights_bytes)
        if out.exists():
            os.rename(out, trash)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash.exists() and not out.exists():
            os.rename(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return out
