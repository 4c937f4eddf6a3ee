"""Local LoRA fine-tuning of a Hugging Face causal LM on multiple-choice QA (PEFT).

One call trains one client's adapter for one round: the backbone is frozen, LoRA is injected
into the attention and MLP projections (the paper's defaults), the loss is taken on the answer
only, and the result is a standard PEFT adapter directory that ``PeftModel.from_pretrained``
loads as-is. The loop is a plain PyTorch loop (no ``Trainer``) so that its cost is visible and
its randomness is fully seeded: on CPU the same inputs give the same adapter bytes.

The trainer knows nothing of chains or storage: it takes a base-model directory, examples,
an optional starting adapter (the round's global adapter) and returns a directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prismesh.aggregator.adapters import canonical_config_json
from prismesh.node.data import MCQ, completion_ids, format_prompt

DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class TrainConfigError(ValueError):
    """A training configuration that cannot be used as given."""


@dataclass
class TrainConfig:
    """LoRA and optimisation hyper-parameters of a local round (paper Table 1 defaults)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lr: float = 2e-4
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 4
    max_length: int = 512
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1" ...
    bf16: str | bool = "auto"  # "auto": bf16 on a CUDA device that supports it; True / False
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    dp_noise_multiplier: float = 0.0  # > 0: DP-SGD (Opacus) with Poisson-sampled batches
    dp_clip: float = 1.0  # DP-SGD's bound on each example's gradient norm
    prox_mu: float = 0.0  # FedProx: (mu/2)·||w − w_start||² on the LoRA weights; 0 = plain local training

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        checks = [
            (self.rank >= 1, "rank must be >= 1"),
            (self.alpha > 0, "alpha must be > 0"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (len(self.target_modules) > 0, "target_modules must not be empty"),
            (self.lr > 0, "lr must be > 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (self.bf16 in ("auto", True, False), "bf16 must be 'auto', true or false"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)"),
            (self.dp_noise_multiplier >= 0, "dp_noise_multiplier must be >= 0 (0: no DP-SGD)"),
            (self.dp_clip > 0, "dp_clip must be > 0"),
            (math.isfinite(self.prox_mu) and self.prox_mu >= 0, "prox_mu must be a number >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainConfigError(msg)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a task's JSON hyper-parameters; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise TrainConfigError(f"training config must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(
                f"unknown training config key(s) {unknown}; known keys: {sorted(known)}"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise TrainConfigError(str(exc)) from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class TrainResult:
    """A trained adapter, how many samples it saw (FedAvg's weight) and training metrics."""

    adapter_dir: Path
    num_samples: int
    metrics: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"device {device!r} requested but CUDA is not available")
    return device


def use_bf16(config_bf16: str | bool, device: str) -> bool:
    import torch

    if config_bf16 == "auto":
        return device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return bool(config_bf16)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the duration (cheap on CPU; warn-only where none exists)."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)


def load_base(base_model: Path, device: str, bf16: bool):
    """Load tokenizer and causal LM from a HF directory onto ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = Path(base_model)
    if not (base_model / "config.json").is_file():
        raise FileNotFoundError(f"{base_model}: not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    model.to(device)
    return tokenizer, model


def encode_example(tokenizer, mcq: MCQ, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer line + EOS and the prompt length (loss is on the rest).

    Prompt, answer key and answer text are tokenised separately and concatenated, exactly as
    the evaluator scores options; an over-long prompt is cut from the left so the options and cue survive.
    """
    prompt = tokenizer(format_prompt(mcq), add_special_tokens=True)["input_ids"]
    key, text = completion_ids(tokenizer, mcq)
    completion = key + text
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    room = max_length - len(completion)
    if room < 1:
        completion = completion[: max_length - 1]
        room = 1
    prompt = prompt[-room:]
    return prompt + completion, len(prompt)


def _lora_config(config: TrainConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )


def _check_adapter_matches(adapter_dir: Path, config: TrainConfig) -> None:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file() or not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter directory ({', '.join(ADAPTER_FILES)})")
    cfg = json.loads(path.read_text())
    theirs = {
        "rank": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "target_modules": sorted(cfg.get("target_modules") or []),
    }
    ours = {"rank": config.rank, "alpha": config.alpha, "target_modules": sorted(config.target_modules)}
    diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k}: adapter {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise TrainConfigError(f"{adapter_dir}: starting adapter does not match the LoRA config ({detail})")


def attach_lora(model, config: TrainConfig, init_adapter: Path | None):
    """Wrap ``model`` with a trainable LoRA: fresh (seeded) or loaded from ``init_adapter``."""
    import torch
    from peft import PeftModel, get_peft_model

    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        # PEFT still calls a transformers method renamed in v5; nothing for us to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if init_adapter is None:
            peft_model = get_peft_model(model, _lora_config(config))
        else:
            _check_adapter_matches(init_adapter, config)
            peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        # The task's dropout governs training, whatever the adapter file says.
        for module in peft_model.modules():
            drop = getattr(module, "lora_dropout", None)
            if isinstance(drop, torch.nn.ModuleDict):
                for name in list(drop):
                    drop[name] = (
                        torch.nn.Dropout(config.dropout) if config.dropout > 0 else torch.nn.Identity()
                    )
    return peft_model


def save_adapter(peft_model, out_dir: Path, base_model_name: str | None = None) -> Path:
    """Write the PEFT adapter (config + safetensors only) atomically into ``out_dir``.

    ``base_model_name`` is what ``adapter_config.json`` records as ``base_model_name_or_path``
    in place of the local model path: adapters are published, and a host's directory layout
    should neither leak nor change their bytes (and so their CID).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # The base model's embeddings are never resized here, so they are never saved; "auto"
        # would look the recorded base-model name up on the Hub to decide.
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        # Rewritten canonically (sorted keys, target modules in sorted order rather than PEFT's
        # set order, which changes from one process to the next), so the same tensors always
        # give the same bytes and CID; the base-model name after saving, since PEFT would look
        # a non-local name up on the Hub while saving.
        conf_path = tmp / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        if base_model_name is not None:
            conf["base_model_name_or_path"] = base_model_name
        conf_path.write_bytes(canonical_config_json(conf))
        for extra in tmp.iterdir():
            if extra.name not in ADAPTER_FILES:
                if extra.is_dir():
                    shutil.rmtree(extra)
                else:
                    extra.unlink()
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def create_initial_adapter(
    base_model: Path, out_dir: Path, config: TrainConfig, base_model_name: str | None = None
) -> Path:
    """The untrained, seeded LoRA (B = 0): a round-0 global adapter every client starts from.
    ``base_model_name`` defaults to the model directory's name (see ``save_adapter``)."""
    device = resolve_device(config.device)
    _, model = load_base(base_model, device, use_bf16(config.bf16, device))
    with deterministic():
        peft_model = attach_lora(model, config, None)
    return save_adapter(peft_model, out_dir, base_model_name or Path(base_model).name)


def _schedule(total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def train_lora(
    base_model: Path,
    examples: list[MCQ],
    out_dir: Path,
    config: TrainConfig,
    init_adapter: Path | None = None,
    progress: bool = True,
    base_model_name: str | None = None,
    noise_seed: int | None = None,
) -> TrainResult:
    """Train LoRA on ``examples`` for ``config.epochs`` and write the adapter to ``out_dir``.

    Starts from ``init_adapter`` (the round's global adapter) when given, else from a fresh
    LoRA seeded by ``config.seed`` (so clients sharing a seed share the initial A matrices).
    AdamW with linear decay over all optimizer steps; loss on the answer tokens only, plus
    FedProx's proximal term towards the starting weights when ``config.prox_mu`` > 0. The
    adapter records ``base_model_name`` (default: the model directory's name) as its base model.

    With ``config.dp_noise_multiplier > 0`` the loop is DP-SGD (see ``_dp_sgd``); its noise
    comes from ``noise_seed``, which must then be given and kept secret by the caller: noise
    anyone can recompute is no noise.
    """
    import torch
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no training examples")
    device = resolve_device(config.device)
    bf16 = use_bf16(config.bf16, device)
    t_load = time.perf_counter()
    tokenizer, model = load_base(base_model, device, bf16)
    encoded = [encode_example(tokenizer, m, config.max_length) for m in examples]
    pad_id = tokenizer.pad_token_id

    if config.dp_noise_multiplier > 0:
        if noise_seed is None:
            raise TrainConfigError("DP-SGD needs a secret noise_seed from the caller")
        return _dp_sgd(model, tokenizer, encoded, out_dir, config, init_adapter, progress,
                       base_model_name or Path(base_model).name, noise_seed, device, bf16, t_load)

    with deterministic():
        peft_model = attach_lora(model, config, init_adapter)
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        # FedProx's proximal centre: the weights this round starts from (the global adapter).
        anchor = [p.detach().clone() for p in params] if config.prox_mu > 0 else None
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        micro_per_epoch = math.ceil(len(encoded) / config.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total_steps, config.warmup_steps))
        gen = torch.Generator().manual_seed(config.seed)
        autocast = (
            torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
            if bf16 else contextlib.nullcontext()
        )
        step_losses: list[float] = []
        epoch_losses: list[float] = []
        tokens = 0
        load_seconds = time.perf_counter() - t_load
        t0 = time.perf_counter()
        bar = tqdm(total=total_steps, desc="train LoRA", disable=not progress, leave=False)
        single = [_collate([e], pad_id, device) for e in encoded] if config.batch_size == 1 else None
        for _epoch in range(config.epochs):
            order = torch.randperm(len(encoded), generator=gen).tolist()
            window = torch.zeros((), device=device)
            epoch_sum = torch.zeros((), device=device)
            in_window = 0
            for micro in range(micro_per_epoch):
                if single is not None:
                    ids, mask, labels = single[order[micro]]
                else:
                    batch = [encoded[i] for i in order[micro * config.batch_size : (micro + 1) * config.batch_size]]
                    ids, mask, labels = _collate(batch, pad_id, device)
                tokens += ids.numel() if mask is None else int(mask.sum())
                with autocast:
                    loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
                (loss / config.grad_accum).backward()
                window += loss.detach()
                epoch_sum += loss.detach()
                in_window += 1
                if in_window == config.grad_accum or micro == micro_per_epoch - 1:
                    if anchor is not None:  # gradient of (mu/2)·||w − w0||², once per step
                        with torch.no_grad():
                            for p, p0 in zip(params, anchor, strict=True):
                                pull = (p.detach() - p0) * config.prox_mu
                                p.grad = pull if p.grad is None else p.grad.add_(pull)
                    if config.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step_losses.append(float(window) / in_window)
                    window = torch.zeros((), device=device)
                    in_window = 0
                    bar.update(1)
                    if progress:
                        bar.set_postfix(loss=f"{step_losses[-1]:.3f}", refresh=False)
            epoch_losses.append(float(epoch_sum) / micro_per_epoch)
        bar.close()
        seconds = time.perf_counter() - t0
        peft_model.eval()
        adapter_dir = save_adapter(peft_model, out_dir, base_model_name or Path(base_model).name)

    metrics = _run_metrics(step_losses, tokens, seconds, load_seconds, n_trainable, device, bf16, init_adapter)
    metrics["epoch_losses"] = [round(x, 4) for x in epoch_losses]
    metrics["tokens_per_s"] = round(tokens / seconds, 1) if seconds > 0 else None
    return TrainResult(adapter_dir=adapter_dir, num_samples=len(examples), metrics=metrics)


def _run_metrics(step_losses: list[float], tokens: int, seconds: float, load_seconds: float, n_trainable: int,
                 device: str, bf16: bool, init_adapter: object) -> dict[str, object]:
    """What every training run reports: losses at the start and end (means of up to 5 steps),
    a downsampled loss curve, tokens, time and where it started from."""
    k = min(5, len(step_losses))
    return {
        "first_loss": round(sum(step_losses[:k]) / k, 4),
        "final_loss": round(sum(step_losses[-k:]) / k, 4),
        "loss_curve": _downsample([round(x, 4) for x in step_losses], 50),
        "optimizer_steps": len(step_losses),
        "train_tokens": tokens,
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "trainable_parameters": n_trainable,
        "device": device,
        "bf16": bf16,
        "started_from": str(init_adapter) if init_adapter is not None else None,
    }


def _dp_sgd(model, tokenizer, encoded: list, out_dir: Path, config: TrainConfig, init_adapter: Path | None,
            progress: bool, base_model_name: str, noise_seed: int, device: str, bf16: bool,
            t_load: float) -> TrainResult:
    """DP-SGD on the LoRA parameters with Opacus (Abadi et al. 2016).

    Each step draws a Poisson sample of the examples at rate q = L / N (L = batch_size ·
    grad_accum, the logical batch), runs it in micro-batches of ``batch_size``, takes each
    example's gradient (Opacus' per-sample hooks on PEFT's LoRA ``Linear`` layers), clips it to
    ``dp_clip`` and adds Gaussian noise of std ``dp_noise_multiplier · dp_clip`` to the sum,
    divided by L; AdamW then steps on that (post-processing). ``epochs · ⌈N / L⌉`` steps, which
    is what ``prismesh.chain.privacy.dp_sgd_steps`` accounts for. Each example's loss is the
    mean over its own answer tokens, so no example's gradient depends on another's length.
    """
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    n = len(encoded)
    logical = config.batch_size * config.grad_accum
    rate = min(1.0, logical / n)
    steps_per_epoch = math.ceil(n / logical)
    total_steps = steps_per_epoch * config.epochs
    pad_id = tokenizer.pad_token_id
    with deterministic():
        peft_model = attach_lora(model, config, init_adapter)
        peft_model.train()
        gsm = GradSampleModule(peft_model, batch_first=True, loss_reduction="sum")
        params = [p for p in gsm.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        inner = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        noise_gen = torch.Generator(device=device).manual_seed(int(noise_seed) % (2**63))
        opt = DPOptimizer(inner, noise_multiplier=config.dp_noise_multiplier, max_grad_norm=config.dp_clip,
                          expected_batch_size=logical, loss_reduction="mean", generator=noise_gen)
        sched = torch.optim.lr_scheduler.LambdaLR(inner, _schedule(total_steps, config.warmup_steps))
        sample_gen = torch.Generator().manual_seed(int(noise_seed) % (2**63) ^ 0x5DEECE66D)
        step_losses: list[float] = []
        sizes: list[int] = []
        tokens = 0
        load_seconds = time.perf_counter() - t_load
        t0 = time.perf_counter()
        for _ in range(total_steps):
            chosen = torch.nonzero(torch.rand(n, generator=sample_gen) < rate).flatten().tolist()
            sizes.append(len(chosen))
            total = 0.0
            if not chosen:
                for p in params:  # an empty sample still takes its noisy step
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            for start in range(0, len(chosen), config.batch_size):
                batch = [encoded[i] for i in chosen[start : start + config.batch_size]]
                ids, mask, labels = _collate(batch, pad_id, device)
                tokens += ids.numel() if mask is None else int(mask.sum())
                logits = gsm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = labels[:, 1:]
                per_token = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
                ).view(target.shape)
                counted = (target != -100).sum(dim=1).clamp(min=1)
                per_example = per_token.sum(dim=1) / counted
                with warnings.catch_warnings():
                    # The frozen embeddings need no gradient; Opacus' hooks say so on every pass.
                    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
                    per_example.sum().backward()
                total += float(per_example.detach().sum())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_losses.append(total / max(1, len(chosen)))
        seconds = time.perf_counter() - t0
        peft_model.eval()
        gsm.remove_hooks()
        adapter_dir = save_adapter(peft_model, out_dir, base_model_name)
    metrics = _run_metrics(step_losses, tokens, seconds, load_seconds, n_trainable, device, bf16, init_adapter)
    metrics["dp_sgd"] = {"noise_multiplier": config.dp_noise_multiplier, "clip": config.dp_clip, "sample_rate": rate,
                         "steps": total_steps, "mean_batch": round(sum(sizes) / len(sizes), 3)}
    return TrainResult(adapter_dir=adapter_dir, num_samples=n, metrics=metrics)


def _collate(batch: list[tuple[list[int], int]], pad_id: int, device: str):
    """Pad a micro-batch; without padding no attention mask is passed (the model's fast path)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    if all(len(ids) == width for ids, _ in batch):
        ids = torch.tensor([seq for seq, _ in batch], dtype=torch.long)
        labels = ids.clone()
        for r, (_, n_prompt) in enumerate(batch):
            labels[r, :n_prompt] = -100
        return ids.to(device), None, labels.to(device)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, (seq, n_prompt) in enumerate(batch):
        t = torch.tensor(seq, dtype=torch.long)
        ids[r, : len(seq)] = t
        mask[r, : len(seq)] = 1
        labels[r, n_prompt : len(seq)] = t[n_prompt:]
    return ids.to(device), mask.to(device), labels.to(device)


def _downsample(values: list[float], n: int) -> list[float]:
    if len(values) <= n:
        return values
    step = len(values) / n
    return [values[int(i * step)] for i in range(n)]
