"""What pairwise-masking secure aggregation (Bonawitz et al. 2017) would cost this protocol.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_secagg_cost``

Measures, on this machine, the two primitives that dominate SecAgg's cost (AES-256-CTR keystream
as the mask PRG, X25519 key agreement) and prints the per-client and per-round cost for this
protocol's sizes: 3 and 32 participants (the demo and MAX_PARTICIPANTS), the LoRA factors of
Qwen3-0.6B and LLaMA-3.1-8B at r = 8 (what FedAvg of A and B would mask) and the dense ΔW the
project's exact and robust strategies need (what they would have to mask, since masking only
sums vectors). Masks live in Z_2^32, one 4-byte word per parameter. Nothing of SecAgg is built:
docs/secure-aggregation.md explains why, with these figures.
"""

from __future__ import annotations

import json
import os
import time

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# (name, hidden, intermediate, layers, heads, kv heads, head dim)
MODELS = [("Qwen3-0.6B", 1024, 3072, 28, 16, 8, 128), ("LLaMA-3.1-8B", 4096, 14336, 32, 32, 8, 128)]


def sizes(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, r: int = 8) -> tuple[int, int]:
    q, kvw = heads * head_dim, kv * head_dim
    mats = [(hidden, q), (hidden, kvw), (hidden, kvw), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    factors = layers * sum(r * (i + o) for i, o in mats)
    dense = layers * sum(i * o for i, o in mats)
    return factors, dense


def keystream_rate(mb: int = 256) -> float:
    """Bytes per second of AES-256-CTR keystream (the PRG that expands a mask seed)."""
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    block = bytes(1 << 20)
    t0 = time.perf_counter()
    for _ in range(mb):
        enc.update(block)
    return mb * (1 << 20) / (time.perf_counter() - t0)


def x25519_rate(n: int = 2000) -> float:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key()
    t0 = time.perf_counter()
    for _ in range(n):
        a.exchange(b)
    return n / (time.perf_counter() - t0)


def main() -> None:
    prg, dh = keystream_rate(), x25519_rate()
    rows = []
    for name, *dims in MODELS:
        factors, dense = sizes(*dims)
        for what, length in (("LoRA factors", factors), ("dense ΔW", dense)):
            for n in (3, 32):
                word = 4
                client_prg = n * length * word  # n − 1 pairwise masks + 1 self mask
                upload = length * word + 2 * 32 + (n - 1) * 2 * 64  # masked vector, 2 keys, encrypted shares
                drop = max(1, n // 10)
                server_prg = (n - drop) * length * word + drop * (n - drop) * length * word
                rows.append({
                    "model": name, "masked": what, "n": n, "parameters": length,
                    "client_prg_GB": round(client_prg / 1e9, 3),
                    "client_s": round(client_prg / prg + (n - 1) * 2 / dh, 3),
                    "upload_MB": round(upload / 1e6, 2),
                    "server_prg_GB_with_drops": round(server_prg / 1e9, 2), "drops": drop,
                    "server_s_with_drops": round(server_prg / prg, 2),
                })
    print(json.dumps({"aes_ctr_GBps": round(prg / 1e9, 3), "x25519_per_s": round(dh), "rows": rows}, indent=1))
    print()
    print("| model | masked | n | parameters | upload per client | client PRG | client time | server PRG (drops) | server time |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['masked']} | {r['n']} | {r['parameters']:,} | {r['upload_MB']:,} MB | "
              f"{r['client_prg_GB']} GB | {r['client_s']} s | {r['server_prg_GB_with_drops']} GB ({r['drops']}) | "
              f"{r['server_s_with_drops']} s |")


if __name__ == "__main__":
    main()
