"""Training throughput: our LoRA loop vs. a plain transformers + PEFT loop, side by side.

Both loops train the same LoRA (same PEFT config, AdamW, linear decay, batch 1 x accumulation
4, loss on the answer) on the same model and the same token sequences. Each run happens in a
fresh subprocess so that its peak memory (max RSS on CPU, max allocated on CUDA) is its own;
the two loops alternate over ``--repeats`` runs and the best of each is compared.

    .venv/bin/python -m tests.benchmarks.bench_training [--samples 200] [--repeats 2]

Target: tokens/s ratio ours / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path


def _examples(n: int):
    import tempfile

    from prismesh.node.data import load_jsonl
    from prismesh.node.synthetic import make_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        specs = make_benchmark(Path(tmp), seed=0)
        big = max(specs, key=lambda s: s.n_train)
        examples = load_jsonl(big.train_path)
    return (examples * (n // len(examples) + 1))[:n]


def _ours(base: str, n: int, device: str, out: str) -> dict:
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG
    from prismesh.node.trainer import TrainConfig, train_lora

    config = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "device": device})
    res = train_lora(Path(base), _examples(n), Path(out), config, progress=False)
    return {"tokens": res.metrics["train_tokens"], "seconds": res.metrics["seconds"]}


def _plain(base: str, n: int, device: str, out: str) -> dict:
    """The textbook loop: get_peft_model, AdamW, get_linear_schedule_with_warmup."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from prismesh.node.data import format_completion, format_prompt
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG
    from prismesh.node.trainer import TrainConfig, resolve_device, use_bf16

    c = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "device": device})
    dev = resolve_device(c.device)
    bf16 = use_bf16(c.bf16, dev)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32).to(dev)
    torch.manual_seed(c.seed)
    model = get_peft_model(model, LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                             target_modules=list(c.target_modules), task_type="CAUSAL_LM"))
    batches = []
    for m in _examples(n):
        p = tok(format_prompt(m))["input_ids"]
        a = tok(format_completion(m), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + a], device=dev)
        labels = ids.clone()
        labels[0, : len(p)] = -100
        batches.append((ids, labels))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr)
    steps = -(-len(batches) // c.grad_accum)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for i, (ids, labels) in enumerate(batches):
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss / c.grad_accum
        loss.backward()
        tokens += ids.numel()
        if (i + 1) % c.grad_accum == 0 or i == len(batches) - 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.save_pretrained(out)
    return {"tokens": tokens, "seconds": seconds}


def _child(kind: str, base: str, n: int, device: str, out: str, queue) -> None:
    import torch

    result = (_ours if kind == "ours" else _plain)(base, n, device, out)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and device != "cpu":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def run_one(kind: str, base: Path, n: int, device: str, out: Path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, str(base), n, device, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from prismesh.node.basemodel import ensure_base_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="auto", help="HF model directory or 'auto'")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    base = ensure_base_model(progress=True) if args.base_model == "auto" else Path(args.base_model)
    runs: dict[str, list[dict]] = {"ours": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="prismesh-bench-") as tmp:
        for r in range(args.repeats):
            order = ("ours", "plain") if r % 2 == 0 else ("plain", "ours")
            for kind in order:
                res = run_one(kind, base, args.samples, args.device, Path(tmp) / f"{kind}-{r}")
                runs[kind].append(res)
                print(f"run {r} {kind:<5} {res['tokens_per_s']:9.1f} tok/s  "
                      f"{res['seconds']:6.2f}s  peak RSS {res['peak_rss_mib']:.0f} MiB"
                      + (f"  peak CUDA {res['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in res else ""))
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in runs.items()}
    ratio = best["ours"]["tokens_per_s"] / best["plain"]["tokens_per_s"]
    print(f"\nmodel {base}")
    print(f"{'loop':<8}{'tokens/s':>12}{'peak RSS MiB':>15}")
    for k in ("ours", "plain"):
        print(f"{k:<8}{best[k]['tokens_per_s']:>12.1f}{best[k]['peak_rss_mib']:>15.0f}")
    print(f"ratio ours/plain = {ratio:.3f} (target >= 0.95)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
