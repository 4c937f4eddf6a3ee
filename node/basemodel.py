"""The offline stand-in base model: a byte-level BPE tokenizer and a small Qwen3 causal LM.

No weights can be downloaded here, so the benchmark's base model is built from a
``Qwen3Config`` and briefly pretrained (full parameters) on generic text of the benchmark's
languages and formats: fact-free type sentences naming every lexicon entity, and exam
questions about *decoy* facts that share no entity with the benchmark's facts. What it learns
is the formats and a language-independent way of retrieving an association, not the answers.

The result is an ordinary Hugging Face model directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` ...), cached under ``$PRISMESH_HOME/models`` and
rebuilt only when missing; everything downstream takes a directory, so a real checkpoint
(e.g. Qwen3-1.7B) drops in unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from prismesh.chain.taskspec import BUILD_INFO_NAME as _BUILD_INFO

BASE_MODEL_VERSION = 2
MODEL_NAME = "prismesh-tiny-qwen3"
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PAD = "<|pad|>"
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}
PRETRAIN = {"n_mcqs": 6000, "steps": 700, "batch_size": 24, "lr": 3e-3, "warmup": 50}


def prismesh_home() -> Path:
    """Where caches live: ``$PRISMESH_HOME`` or ``~/.prismesh``."""
    return Path(os.environ.get("PRISMESH_HOME", Path.home() / ".prismesh")).expanduser()


def default_model_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
    root = Path(cache_dir) if cache_dir is not None else prismesh_home() / "models"
    return root / f"{MODEL_NAME}-v{BASE_MODEL_VERSION}-seed{seed}"


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock, so that nodes started together build the model once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_base_model(cache_dir: Path | None = None, seed: int = 0, progress: bool = False) -> Path:
    """Return the stand-in base model's directory, building and pretraining it if missing.

    The build happens in a temporary sibling directory renamed into place at the end, under a
    file lock: a crash leaves no half directory and concurrent callers build it once.
    """
    target = default_model_dir(cache_dir, seed)
    if is_model_dir(target):
        return target
    with _lock(target.parent / f".{target.name}.lock"):
        if is_model_dir(target):
            return target
        tmp = target.parent / f".{target.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_base_model(tmp, seed=seed, progress=progress)
            if target.exists():  # a stale, incomplete directory from an older layout
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus(seed: int) -> tuple[list[tuple[str, tuple[str, ...]]], list[str]]:
    """((prompt, target parts) documents to pretrain on, text to train the tokenizer on).

    The loss is taken on the target only: for exam questions the answer line (which is what
    builds the retrieval and option-pointing circuits), for type sentences the whole text.
    Target parts are tokenised separately, as the trainer does with an answer's key and text.
    """
    from prismesh.node.data import completion_parts, format_prompt
    from prismesh.node.synthetic import pretraining_mcqs, type_sentences

    mcqs = pretraining_mcqs(seed, PRETRAIN["n_mcqs"])
    docs = [(format_prompt(m), completion_parts(m)) for m in mcqs]
    types = type_sentences()
    rng = random.Random(f"prismesh-types-{seed}")
    rng.shuffle(types)
    # Pack short type sentences a few to a document.
    type_docs = [("", (" " + " ".join(types[i : i + 6]),)) for i in range(0, len(types), 6)]
    # Names are repeated for the tokenizer so that each becomes one token, as real entity
    # names mostly are in a large vocabulary.
    return docs + type_docs, [p + "".join(c) for p, c in docs[:300]] + [" " + t for t in types] * 4


def build_tokenizer(texts: list[str], out_dir: Path):
    """Train a byte-level BPE (any UTF-8 text encodes) and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.padding_side = "right"
    fast.save_pretrained(out_dir)
    return fast


def build_base_model(out_dir: Path, seed: int = 0, progress: bool = False) -> None:
    """Build the tokenizer and model into ``out_dir`` and pretrain it (deterministic in seed)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, tok_texts = _corpus(seed)
    tokenizer = build_tokenizer(tok_texts, out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        **MODEL_CONFIG,
    )
    model = Qwen3ForCausalLM(config)
    encoded = []
    for prompt, target in docs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = [t for part in target for t in tokenizer(part, add_special_tokens=False)["input_ids"]] + [eos_id]
        encoded.append((p + c, len(p)))
    stats = _pretrain(model, encoded, pad_id, seed, progress)
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    info = {
        "name": MODEL_NAME,
        "version": BASE_MODEL_VERSION,
        "seed": seed,
        "config": MODEL_CONFIG,
        "pretrain": {**PRETRAIN, **stats},
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "note": "stand-in for a real HF checkpoint; pretrained on decoy facts only",
    }
    (out_dir / _BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _pretrain(model, encoded: list[tuple[list[int], int]], pad_id: int, seed: int, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    steps, bs, lr, warmup = PRETRAIN["steps"], PRETRAIN["batch_size"], PRETRAIN["lr"], PRETRAIN["warmup"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.05, (steps - step) / (steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(encoded), generator=gen).tolist()
    pos = 0
    bar = tqdm(range(steps), desc="pretrain base model", disable=not progress)
    for _step in bar:
        if pos + bs > len(order):
            order = torch.randperm(len(encoded), generator=gen).tolist()
            pos = 0
        batch = [encoded[i] for i in order[pos : pos + bs]]
        pos += bs
        width = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (x, n_prompt) in enumerate(batch):
            t = torch.tensor(x)
            ids[r, : len(x)] = t
            mask[r, : len(x)] = 1
            labels[r, n_prompt : len(x)] = t[n_prompt:]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return {"first_loss": round(losses[0], 4), "final_loss": round(sum(losses[-20:]) / 20, 4)}


def build_random_model(
    out_dir: Path, texts: list[str], seed: int = 0, hidden_size: int = 32, layers: int = 1
) -> Path:
    """An untrained Qwen3 of the same family with a tokenizer fitted to ``texts``.

    For tests and smoke runs that need a real model directory in a second, not a useful one.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=hidden_size // 2, max_position_embeddings=512, tie_word_embeddings=True,
        # Large enough embeddings that a random model can still express a confident prediction.
        initializer_range=0.3,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    Qwen3ForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
