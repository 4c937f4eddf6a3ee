"""Evaluation: option log-likelihood accuracy, fairness metrics, the cross-dataset matrix.

A question is answered by scoring every option's text as a continuation of the prompt
(sum of token log-probabilities, optionally the per-token mean) and picking the highest; no
generation, so the result does not depend on decoding settings. The fairness metrics are the
paper's (eq. 3-5): Macro-Acc (mean), Min-Acc (minimum) and H-mean (harmonic mean) over
clients. The cross-dataset matrix is paper Table 2: one row per model (base, each adapter),
one column per client test set.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from prismesh.node.data import MCQ, format_completion, format_prompt


def fairness(acc: dict[str, float]) -> dict[str, float]:
    """Macro-Acc, Min-Acc and H-mean of per-client accuracies (fractions in [0, 1]).

    H-mean = n / sum(1 / acc_i); it is defined as 0 when any client's accuracy is 0 (the limit
    of the formula), so one failed client cannot be hidden by the others.
    """
    if not acc:
        raise ValueError("fairness() needs at least one client accuracy")
    values = list(acc.values())
    for name, a in acc.items():
        if not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0 and math.isfinite(a)):
            raise ValueError(f"accuracy of {name!r} must be a fraction in [0, 1], got {a!r}")
    h_mean = 0.0 if any(a == 0 for a in values) else len(values) / sum(1.0 / a for a in values)
    return {
        "macro_acc": sum(values) / len(values),
        "min_acc": min(values),
        "h_mean": h_mean,
    }


class Evaluator:
    """Holds one loaded base model and swaps adapters on it (loading the base once)."""

    def __init__(
        self,
        base_model,
        tokenizer=None,
        device: str = "auto",
        bf16: str | bool = "auto",
        max_length: int = 512,
        normalize: str = "sum",
    ) -> None:
        from prismesh.node.trainer import load_base, resolve_device, use_bf16

        if normalize not in ("sum", "mean"):
            raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
        if isinstance(base_model, (str, Path)):
            self.device = resolve_device(device)
            self.tokenizer, self.model = load_base(Path(base_model), self.device, use_bf16(bf16, self.device))
            self.base_path: Path | None = Path(base_model)
        else:
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer")
            self.model, self.tokenizer = base_model, tokenizer
            self.device = str(next(base_model.parameters()).device)
            self.base_path = None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.max_length = max_length
        self.normalize = normalize
        self._cache: dict[str, tuple[list[int], list[list[int]]]] = {}

    # -- scoring -----------------------------------------------------------------------------

    def _encode(self, mcq: MCQ) -> tuple[list[int], list[list[int]]]:
        key = mcq.id + "\x00" + mcq.question
        hit = self._cache.get(key)
        if hit is None:
            prompt = self.tokenizer(format_prompt(mcq), add_special_tokens=True)["input_ids"]
            options = [
                self.tokenizer(format_completion(mcq, k), add_special_tokens=False)["input_ids"]
                for k in mcq.options
            ]
            hit = (prompt, options)
            self._cache[key] = hit
        return hit

    def option_scores(self, model, examples: list[MCQ], batch_size: int = 64) -> list[list[float]]:
        """Log-likelihood of every option of every example under ``model``."""
        import torch

        rows: list[tuple[int, list[int], int, int]] = []  # (example, ids, start, n_completion)
        for ei, mcq in enumerate(examples):
            prompt, options = self._encode(mcq)
            for opt in options:
                opt = opt[: self.max_length - 1]
                p = prompt[-(self.max_length - len(opt)) :]
                rows.append((ei, p + opt, len(p), len(opt)))
        # Length-sorted batches waste little padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))
        scores = [0.0] * len(rows)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                width = max(len(rows[i][1]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    seq = rows[i][1]
                    ids[r, : len(seq)] = torch.tensor(seq)
                    mask[r, : len(seq)] = 1
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for r, i in enumerate(idx):
                    _, seq, start, n = rows[i]
                    pos = torch.arange(start - 1, start - 1 + n, device=logits.device)
                    logp = torch.log_softmax(logits[r, pos].float(), dim=-1)
                    target = torch.tensor(seq[start : start + n], device=logits.device)
                    s = float(logp.gather(1, target[:, None]).sum())
                    scores[i] = s / n if self.normalize == "mean" else s
        out: list[list[float]] = [[] for _ in examples]
        for i, (ei, _, _, _) in enumerate(rows):
            out[ei].append(scores[i])
        return out

    def _model_for(self, adapter: Path | None):
        """The base model, or a PEFT wrapper with ``adapter`` loaded (caller must unload)."""
        if adapter is None:
            return self.model, None
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=False)
        wrapped.eval()
        return wrapped, wrapped

    def predictions(self, adapter: Path | None, examples: list[MCQ], batch_size: int = 64) -> list[str]:
        """The chosen option letter for each example."""
        model, wrapped = self._model_for(adapter)
        try:
            scores = self.option_scores(model, examples, batch_size)
        finally:
            if wrapped is not None:
                self.model = wrapped.unload()
                self.model.eval()
        return [list(m.options)[max(range(len(s)), key=s.__getitem__)] for m, s in zip(examples, scores, strict=True)]

    def accuracy(self, adapter: Path | None, examples: list[MCQ], batch_size: int = 64) -> float:
        if not examples:
            raise ValueError("no examples to evaluate")
        preds = self.predictions(adapter, examples, batch_size)
        return sum(p == m.answer for p, m in zip(preds, examples, strict=True)) / len(examples)

    def accuracies(
        self, adapter: Path | None, test_sets: dict[str, list[MCQ]], batch_size: int = 64
    ) -> dict[str, float]:
        """Per-client accuracy of one model, loading the adapter once for all test sets."""
        model, wrapped = self._model_for(adapter)
        try:
            out = {}
            for name, examples in test_sets.items():
                if not examples:
                    raise ValueError(f"test set {name!r} is empty")
                scores = self.option_scores(model, examples, batch_size)
                correct = sum(
                    list(m.options)[max(range(len(s)), key=s.__getitem__)] == m.answer
                    for m, s in zip(examples, scores, strict=True)
                )
                out[name] = correct / len(examples)
        finally:
            if wrapped is not None:
                self.model = wrapped.unload()
                self.model.eval()
        return out


def evaluate(
    base_model: Path, adapter: Path | None, examples: list[MCQ], batch_size: int = 64
) -> float:
    """Accuracy (fraction) of the base model, with ``adapter`` when given, on ``examples``."""
    return Evaluator(base_model).accuracy(adapter, examples, batch_size)


def cross_dataset_matrix(
    base_model,
    rows: dict[str, Path | None],
    test_sets: dict[str, list[MCQ]],
    batch_size: int = 64,
    evaluator: Evaluator | None = None,
) -> dict:
    """Paper Table 2 (+ Table 3's metrics): accuracy of every row model on every test set.

    ``rows`` maps a row label to an adapter directory (``None`` is the base model);
    ``base_model`` is a directory or an :class:`Evaluator` already holding it.
    """
    ev = evaluator or (base_model if isinstance(base_model, Evaluator) else Evaluator(base_model))
    out_rows = {}
    for label, adapter in rows.items():
        acc = ev.accuracies(adapter, test_sets, batch_size)
        out_rows[label] = {"adapter": str(adapter) if adapter is not None else None, "acc": acc, **fairness(acc)}
    return {
        "columns": list(test_sets),
        "n_test": {k: len(v) for k, v in test_sets.items()},
        "rows": out_rows,
    }


def render_markdown(matrix: dict, title: str | None = None) -> str:
    """The matrix as a Markdown table in percent, with Macro-Acc / Min-Acc / H-mean columns."""
    cols = matrix["columns"]
    head = ["Model", *cols, "Macro-Acc", "Min-Acc", "H-mean"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
    for label, row in matrix["rows"].items():
        cells = [f"{100 * row['acc'][c]:.2f}" for c in cols]
        cells += [f"{100 * row[k]:.2f}" for k in ("macro_acc", "min_acc", "h_mean")]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"
