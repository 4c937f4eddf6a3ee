"""What sealing adds per client per round: bytes stored and seconds, beside the plaintext round.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_encryption [--recipients 2] [--repeat 3]``

For adapters of three sizes (the tests' one-layer model, Qwen3-0.6B and LLaMA-3.1-8B with LoRA
r = 8 on q/k/v/o/gate/up/down, float32, random values), both paths are measured side by side in
one run on the same store: the plaintext round (add the PEFT directory, then fetch it back
verified) and the sealed round (seal to the recipients and add; fetch, verify and open). The
ratio is what a node (seal + add) and the aggregator (fetch + open) pay on top of the plaintext
round; the byte overhead is the sealed header (one HPKE-wrapped key per recipient) and the GCM
tag. The chain pays nothing more per round: the reveal carries the ciphertext's CID and the
plaintext's hash in the same fields as before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from prismesh.chain.sealing import (
    Recipient,
    SealContext,
    add_sealed,
    fetch_sealed_adapter,
    new_box_key,
    open_sealed,
    public_key_bytes,
    seal_dir,
)
from prismesh.chain.storage import EmbeddedStore, add_adapter, fetch_adapter

# (name, hidden, intermediate, layers, heads, kv heads, head dim)
MODELS = [
    ("tiny (tests, q/v)", 32, 64, 1, 4, 4, 8),
    ("Qwen3-0.6B", 1024, 3072, 28, 16, 8, 128),
    ("LLaMA-3.1-8B", 4096, 14336, 32, 32, 8, 128),
]


def lora_tensors(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, r: int = 8,
                 tiny: bool = False) -> dict[str, np.ndarray]:
    q, kvw = heads * head_dim, kv * head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kvw), "self_attn.v_proj": (hidden, kvw),
              "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    if tiny:
        shapes = {k: v for k, v in shapes.items() if k in ("self_attn.q_proj", "self_attn.v_proj")}
    rng = np.random.default_rng(0)
    out = {}
    for i in range(layers):
        for name, (w_in, w_out) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            out[key + ".lora_A.weight"] = rng.standard_normal((r, w_in), dtype=np.float32)
            out[key + ".lora_B.weight"] = rng.standard_normal((w_out, r), dtype=np.float32)
    return out


def write_adapter(path: Path, tensors: dict[str, np.ndarray]) -> int:
    from prismesh.aggregator.adapters import Adapter, save_adapter

    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "bench", "task_type": "CAUSAL_LM"}
    save_adapter(Adapter(config, tensors), path)
    return sum(p.stat().st_size for p in path.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipients", type=int, default=2, help="aggregator + auditors (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="leave out the 8B adapter")
    args = ap.parse_args()
    keys = [new_box_key() for _ in range(args.recipients)]
    recipients = [Recipient(f"0x{i + 1:040x}", public_key_bytes(k)) for i, k in enumerate(keys)]
    ctx = SealContext(31337, "0x" + "c0" * 20, 1, 1, "0x" + "11" * 20, "update")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prismesh-bench-enc-") as tmp:
        root = Path(tmp)
        for name, *dims in MODELS:
            if args.skip_large and "8B" in name:
                continue
            src = root / name.split()[0]
            plain_bytes = write_adapter(src, lora_tensors(*dims, tiny=name.startswith("tiny")))
            t_plain, t_sealed, t_seal, t_open, t_crypto = [], [], [], [], []
            sealed_bytes = 0
            for i in range(args.repeat):
                # A fresh store per repeat and path: no block is ever already there.
                store = EmbeddedStore(root / f"store-{src.name}-{i}")
                t0 = time.perf_counter()
                cid = add_adapter(store, src)
                fetch_adapter(store, cid, root / f"p{i}-{src.name}")
                t_plain.append(time.perf_counter() - t0)
                store = EmbeddedStore(root / f"store-{src.name}-{i}-sealed")
                t0 = time.perf_counter()
                blob = seal_dir(src, recipients, ctx)
                open_sealed(blob, keys[-1], ctx)
                t_crypto.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                blob = seal_dir(src, recipients, ctx)
                scid = add_sealed(store, blob)
                t1 = time.perf_counter()
                fetch_sealed_adapter(store, scid, root / f"s{i}-{src.name}", keys[-1], ctx)
                t2 = time.perf_counter()
                t_sealed.append(t2 - t0)
                t_seal.append(t1 - t0)
                t_open.append(t2 - t1)
                sealed_bytes = len(blob)
            med = statistics.median
            rows.append({
                "adapter": name,
                "plaintext_bytes": plain_bytes,
                "sealed_bytes": sealed_bytes,
                "added_bytes": sealed_bytes - plain_bytes,
                "plaintext_round_s": round(med(t_plain), 4),
                "sealed_round_s": round(med(t_sealed), 4),
                "added_s": round(med(t_sealed) - med(t_plain), 4),
                "seal_and_add_s": round(med(t_seal), 4),
                "fetch_and_open_s": round(med(t_open), 4),
                "seal_plus_open_crypto_only_s": round(med(t_crypto), 4),
                "ratio": round(med(t_sealed) / med(t_plain), 3),
            })
    print(json.dumps({"recipients": args.recipients, "repeat": args.repeat, "rows": rows}, indent=1))
    print()
    print("| adapter | plaintext | sealed | bytes added | plaintext round | sealed round | added | ratio | "
          "seal + open alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['adapter']} | {r['plaintext_bytes']:,} B | {r['sealed_bytes']:,} B | {r['added_bytes']:,} B | "
              f"{r['plaintext_round_s']:.3f} s | {r['sealed_round_s']:.3f} s | {r['added_s']:+.3f} s | {r['ratio']:.2f}x | "
              f"{r['seal_plus_open_crypto_only_s']:.3f} s |")


if __name__ == "__main__":
    main()
