"""Evaluation: multiple-choice accuracy under three scorings, fairness metrics, the
cross-dataset matrix.

No generation: every option is scored as a continuation of the prompt, so the result does not
depend on decoding settings. The answer line is ``" <key>. <option text>"`` (see
:func:`prismesh.node.data.completion_parts`) and a question can be scored three ways:

* ``letter`` (the default): the log-probability of the option's key right after the answer cue
  (``" C"`` after ``Answer:``). This is the standard for MedQA-style evaluation: it is how
  lm-evaluation-harness scores ``medqa_4options`` and ``medmcqa`` (the choices are the letters)
  and it is immune to option length, which the likelihood of the option text is not.
* ``sum``: the summed log-likelihood of the whole answer line; it favours short options.
* ``mean``: the same, divided by its number of tokens (length-normalised likelihood).

One forward pass per option gives all three (:meth:`Evaluator.all_scores`); letter scoring alone
needs one pass per question. The fairness metrics are the paper's (eq. 3-5): Macro-Acc (mean),
Min-Acc (minimum) and H-mean (harmonic mean) over clients. The cross-dataset matrix is paper
Table 2: one row per model (base, each adapter), one column per client test set.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from prismesh.node.data import MCQ, completion_ids, format_prompt

SCORINGS = ("letter", "sum", "mean")
DEFAULT_SCORING = "letter"


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
        scoring: str = DEFAULT_SCORING,
    ) -> None:
        from prismesh.node.trainer import load_base, resolve_device, use_bf16

        _check_scoring(scoring)
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
        self.scoring = scoring
        self._cache: dict[str, tuple[list[int], list[tuple[list[int], list[int]]]]] = {}

    # -- scoring -----------------------------------------------------------------------------

    def _encode(self, mcq: MCQ) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
        key = mcq.id + "\x00" + mcq.question + "\x00" + "\x00".join(mcq.options.values())
        hit = self._cache.get(key)
        if hit is None:
            prompt = self.tokenizer(format_prompt(mcq), add_special_tokens=True)["input_ids"]
            hit = (prompt, [completion_ids(self.tokenizer, mcq, k) for k in mcq.options])
            self._cache[key] = hit
        return hit

    def _forward(self, model, seqs: list[list[int]], batch_size: int, positions: list[list[int]],
                 targets: list[list[int]]) -> list[list[float]]:
        """Per-token log-probabilities of ``targets`` read at ``positions`` of each sequence."""
        import torch

        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        out: list[list[float]] = [[] for _ in seqs]
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, : len(seqs[i])] = 1
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for r, i in enumerate(idx):
                    pos = torch.tensor(positions[i], device=logits.device)
                    logp = torch.log_softmax(logits[r, pos].float(), dim=-1)
                    tgt = torch.tensor(targets[i], device=logits.device)
                    out[i] = logp.gather(1, tgt[:, None])[:, 0].tolist()
        return out

    def all_scores(self, model, examples: list[MCQ], batch_size: int = 64) -> dict[str, list[list[float]]]:
        """Every scoring of every option of every example. Each prompt is run once and its key /
        value cache is shared by its options' answer lines (the options differ only there), which
        costs a few tokens per option instead of a whole prompt per option."""
        lps = self._option_logprobs(model, examples, max(1, batch_size // 4))
        out: dict[str, list[list[float]]] = {s: [[] for _ in examples] for s in SCORINGS}
        for ei, mcq in enumerate(examples):
            _, options = self._encode(mcq)
            for (key, _text), lp in zip(options, lps[ei], strict=True):
                total = sum(lp)
                out["letter"][ei].append(sum(lp[: len(key)]))
                out["sum"][ei].append(total)
                out["mean"][ei].append(total / len(lp))
        return out

    def _option_logprobs(self, model, examples: list[MCQ], batch_size: int) -> list[list[list[float]]]:
        """Per-token log-probabilities of every option's answer line: ``[example][option][token]``.

        Prompts are left-padded and run once with the cache on; then, option by option, the answer
        lines (right-padded) continue from the cache, which is cropped back to the prompts after
        each. Rotary positions only see relative offsets, so the padding changes nothing.
        """
        import torch

        encoded = []
        for mcq in examples:
            prompt, options = self._encode(mcq)
            comps = [(key + text)[: self.max_length - 1] for key, text in options]
            room = self.max_length - max(len(c) for c in comps)
            encoded.append((prompt[-room:], comps))
        order = sorted(range(len(examples)), key=lambda i: len(encoded[i][0]))
        out: list[list[list[float]]] = [[] for _ in examples]
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    p = encoded[i][0]
                    ids[r, width - len(p) :] = torch.tensor(p)
                    mask[r, width - len(p) :] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                first = model(input_ids=ids, attention_mask=mask, use_cache=True)
                cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
                last = torch.log_softmax(first.logits[:, -1].float(), dim=-1)
                for r, i in enumerate(idx):
                    out[i] = [[float(last[r, c[0]])] for c in encoded[i][1]]
                n_opt = max(len(encoded[i][1]) for i in idx)
                for j in range(n_opt):
                    rows = [r for r, i in enumerate(idx) if j < len(encoded[i][1])]
                    clen = max(len(encoded[idx[r]][1][j]) for r in rows)
                    if clen < 2:
                        continue
                    cids = torch.full((len(idx), clen - 1), pad, dtype=torch.long)
                    cmask = torch.zeros((len(idx), clen - 1), dtype=torch.long)
                    for r in rows:
                        c = encoded[idx[r]][1][j]
                        cids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                        cmask[r, : len(c) - 1] = 1
                    nxt = model(input_ids=cids.to(self.device), attention_mask=torch.cat([mask, cmask.to(self.device)], 1),
                                use_cache=True, **{_cache_argument(model): cache})
                    cache.crop(-(clen - 1))
                    logp = torch.log_softmax(nxt.logits.float(), dim=-1)
                    for r in rows:
                        c = encoded[idx[r]][1][j]
                        tgt = torch.tensor(c[1:], device=logp.device)
                        out[idx[r]][j] += logp[r, : len(c) - 1].gather(1, tgt[:, None])[:, 0].tolist()
        return out

    def letter_scores(self, model, examples: list[MCQ], batch_size: int = 64) -> list[list[float]]:
        """Log-probability of each option's key after the answer cue; one pass per question when
        every key is one token (the usual case), else one per option."""
        encoded = [self._encode(m) for m in examples]
        if any(len(key) != 1 for _, options in encoded for key, _ in options):
            return self.all_scores(model, examples, batch_size)["letter"]
        seqs, positions, targets = [], [], []
        for prompt, options in encoded:
            p = prompt[-(self.max_length - 1) :]
            seqs.append(p)
            positions.append([len(p) - 1] * len(options))
            targets.append([key[0] for key, _ in options])
        return self._forward(model, seqs, batch_size, positions, targets)

    def option_scores(self, model, examples: list[MCQ], batch_size: int = 64,
                      scoring: str | None = None) -> list[list[float]]:
        """The score of every option of every example under ``model`` (default: this
        evaluator's scoring)."""
        scoring = _check_scoring(scoring or self.scoring)
        if scoring == "letter":
            return self.letter_scores(model, examples, batch_size)
        return self.all_scores(model, examples, batch_size)[scoring]

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

    def _release(self, wrapped) -> None:
        if wrapped is not None:
            self.model = wrapped.unload()
            self.model.eval()

    def predictions(self, adapter: Path | None, examples: list[MCQ], batch_size: int = 64,
                    scoring: str | None = None) -> list[str]:
        """The chosen option letter for each example."""
        model, wrapped = self._model_for(adapter)
        try:
            scores = self.option_scores(model, examples, batch_size, scoring)
        finally:
            self._release(wrapped)
        return _choices(examples, scores)

    def correct(self, adapter: Path | None, test_sets: dict[str, list[MCQ]], batch_size: int = 64,
                scorings: tuple[str, ...] | None = None) -> dict[str, dict[str, list[bool]]]:
        """Whether each question is answered correctly, per scoring and test set, loading the
        adapter once: ``{scoring: {test set: [bool, ...]}}`` (for per-part accuracies and
        question-level statistics)."""
        scorings = tuple(_check_scoring(s) for s in (scorings or (self.scoring,)))
        model, wrapped = self._model_for(adapter)
        try:
            out: dict[str, dict[str, list[bool]]] = {s: {} for s in scorings}
            for name, examples in test_sets.items():
                if not examples:
                    raise ValueError(f"test set {name!r} is empty")
                if scorings == ("letter",):
                    scores = {"letter": self.letter_scores(model, examples, batch_size)}
                else:
                    scores = self.all_scores(model, examples, batch_size)
                for s in scorings:
                    preds = _choices(examples, scores[s])
                    out[s][name] = [p == m.answer for p, m in zip(preds, examples, strict=True)]
        finally:
            self._release(wrapped)
        return out

    def accuracy(self, adapter: Path | None, examples: list[MCQ], batch_size: int = 64,
                 scoring: str | None = None) -> float:
        if not examples:
            raise ValueError("no examples to evaluate")
        preds = self.predictions(adapter, examples, batch_size, scoring)
        return sum(p == m.answer for p, m in zip(preds, examples, strict=True)) / len(examples)

    def accuracies(
        self, adapter: Path | None, test_sets: dict[str, list[MCQ]], batch_size: int = 64,
        scoring: str | None = None,
    ) -> dict[str, float]:
        """Per-client accuracy of one model, loading the adapter once for all test sets."""
        scoring = scoring or self.scoring
        flags = self.correct(adapter, test_sets, batch_size, (scoring,))[scoring]
        return {name: sum(f) / len(f) for name, f in flags.items()}


def _cache_argument(model) -> str:
    """The keyword a model's forward takes its key / value cache by (renamed in transformers 5)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return scoring


def _choices(examples: list[MCQ], scores: list[list[float]]) -> list[str]:
    return [list(m.options)[max(range(len(s)), key=s.__getitem__)] for m, s in zip(examples, scores, strict=True)]


def evaluate(
    base_model: Path, adapter: Path | None, examples: list[MCQ], batch_size: int = 64,
    scoring: str = DEFAULT_SCORING,
) -> float:
    """Accuracy (fraction) of the base model, with ``adapter`` when given, on ``examples``."""
    return Evaluator(base_model, scoring=scoring).accuracy(adapter, examples, batch_size)


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
