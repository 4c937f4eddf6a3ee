"""Multiple-choice medical QA data: MedQA / MedMCQA JSONL loaders, prompt templates, splits.

Each client node holds one JSONL file in either format. Rows are normalised into :class:`MCQ`
so that the trainer and the evaluator never look at the source format again, except to pick
the prompt template (the exam's own style and language are part of what a client learns).

Formats (detected per row, and a file must not mix them):

* MedQA: ``{"question": str, "options": {"A": str, ...}, "answer_idx": "C"}`` (``answer``, the
  answer text, is optional and checked against ``options[answer_idx]`` when present).
* MedMCQA: ``{"question": str, "opa": str, "opb": str, "opc": str, "opd": str, "cop": 1..4}``
  where ``cop`` is 1-based as in the MedMCQA release (a letter ``a``-``d`` is accepted too;
  0-based exports must be converted, ``cop: 0`` is rejected rather than guessed).

An optional ``language`` field (``en``/``zh``) overrides detection from the text (any CJK
character means ``zh``); an optional ``id`` field is kept, otherwise ``<file stem>:<line>``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

FORMATS = ("medqa", "medmcqa")
LANGUAGES = ("en", "zh")
_MEDMCQA_KEYS = ("opa", "opb", "opc", "opd")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class DataFormatError(ValueError):
    """A row (or file) that is not valid MedQA / MedMCQA; names the file, line and reason."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question; ``answer`` is the letter key into ``options``."""

    question: str
    options: dict[str, str]
    answer: str
    fmt: str
    language: str
    id: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]


def detect_language(text: str) -> str:
    """``zh`` when the text holds any CJK ideograph, else ``en``."""
    return "zh" if _CJK.search(text) else "en"


def _detect_format(row: dict) -> str | None:
    if "options" in row:
        return "medqa"
    if any(k in row for k in _MEDMCQA_KEYS) or "cop" in row:
        return "medmcqa"
    return None


def _nonempty_str(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _parse_medqa(row: dict) -> tuple[str, dict[str, str], str]:
    question = row.get("question")
    if not _nonempty_str(question):
        raise ValueError("'question' must be a non-empty string")
    options = row.get("options")
    if not isinstance(options, dict) or len(options) < 2:
        raise ValueError("'options' must be an object with at least two entries")
    clean: dict[str, str] = {}
    for key, text in options.items():
        if not (isinstance(key, str) and re.fullmatch(r"[A-Z]", key)):
            raise ValueError(f"option key {key!r} is not a single capital letter")
        if not _nonempty_str(text):
            raise ValueError(f"option {key} must be a non-empty string")
        clean[key] = str(text).strip()
    if "answer_idx" not in row:
        raise ValueError("missing 'answer_idx'")
    answer = row["answer_idx"]
    if not isinstance(answer, str) or answer.strip().upper() not in clean:
        raise ValueError(f"'answer_idx' {answer!r} is not one of the option keys {sorted(clean)}")
    answer = answer.strip().upper()
    text = row.get("answer")
    if text is not None and isinstance(text, str) and text.strip() != clean[answer]:
        raise ValueError(
            f"'answer' {text!r} does not match options[{answer}] {clean[answer]!r}"
        )
    return question.strip(), clean, answer


def _parse_medmcqa(row: dict) -> tuple[str, dict[str, str], str]:
    question = row.get("question")
    if not _nonempty_str(question):
        raise ValueError("'question' must be a non-empty string")
    options: dict[str, str] = {}
    for letter, key in zip("ABCD", _MEDMCQA_KEYS, strict=True):
        if not _nonempty_str(row.get(key)):
            raise ValueError(f"'{key}' must be a non-empty string")
        options[letter] = row[key].strip()
    if "cop" not in row:
        raise ValueError("missing 'cop' (correct option)")
    cop = row["cop"]
    if isinstance(cop, str) and cop.strip().lower() in ("a", "b", "c", "d"):
        answer = cop.strip().upper()
    elif isinstance(cop, int) and not isinstance(cop, bool) and 1 <= cop <= 4:
        answer = "ABCD"[cop - 1]
    else:
        raise ValueError(f"'cop' {cop!r} must be 1-4 (1-based, as released) or a letter a-d")
    return question.strip(), options, answer


def parse_row(row: object, fmt: str | None, default_id: str) -> MCQ:
    """Normalise one decoded JSON row; raises ``ValueError`` with the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    detected = _detect_format(row)
    if detected is None:
        raise ValueError("neither MedQA ('options') nor MedMCQA ('opa'..'opd', 'cop') fields")
    if fmt is not None and detected != fmt:
        raise ValueError(f"row is {detected} but the file is {fmt}")
    if detected == "medqa":
        question, options, answer = _parse_medqa(row)
    else:
        question, options, answer = _parse_medmcqa(row)
    language = row.get("language")
    if language is None:
        language = detect_language(question + " ".join(options.values()))
    elif language not in LANGUAGES:
        raise ValueError(f"'language' {language!r} must be one of {LANGUAGES}")
    ident = row.get("id", default_id)
    return MCQ(question, options, answer, detected, language, str(ident))


def load_jsonl(path: Path, fmt: str | None = None) -> list[MCQ]:
    """Load one client's JSONL file (MedQA or MedMCQA, detected when ``fmt`` is None).

    Blank lines are skipped; the first bad row raises :class:`DataFormatError` with the file,
    the 1-based line number and the reason, because silently dropping rows would change a
    client's ``numSamples`` without anyone noticing.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataFormatError(path, None, f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not path.is_file():
        raise DataFormatError(path, None, "no such file")
    out: list[MCQ] = []
    file_fmt = fmt
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, lineno, f"invalid JSON: {exc.msg}") from None
            try:
                mcq = parse_row(row, file_fmt, f"{path.stem}:{lineno}")
            except ValueError as exc:
                raise DataFormatError(path, lineno, str(exc)) from None
            file_fmt = mcq.fmt
            out.append(mcq)
    if not out:
        raise DataFormatError(path, None, "file holds no rows")
    return out


def write_jsonl(path: Path, examples: list[MCQ]) -> None:
    """Write examples back in their own source format (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for mcq in examples:
            fh.write(json.dumps(to_row(mcq), ensure_ascii=False) + "\n")
    tmp.replace(path)


def to_row(mcq: MCQ) -> dict:
    """The JSON row of ``mcq`` in its own format (inverse of :func:`parse_row`)."""
    if mcq.fmt == "medqa":
        return {
            "id": mcq.id,
            "question": mcq.question,
            "options": dict(mcq.options),
            "answer_idx": mcq.answer,
            "answer": mcq.answer_text,
            "language": mcq.language,
        }
    if mcq.fmt == "medmcqa":
        if list(mcq.options) != list("ABCD"):
            raise ValueError(f"{mcq.id}: MedMCQA rows need exactly options A-D")
        row = {"id": mcq.id, "question": mcq.question}
        row.update({k: mcq.options[letter] for k, letter in zip(_MEDMCQA_KEYS, "ABCD", strict=True)})
        row["cop"] = "ABCD".index(mcq.answer) + 1
        row["language"] = mcq.language
        return row
    raise ValueError(f"{mcq.id}: unknown format {mcq.fmt!r}")


def train_test_split(
    examples: list[MCQ], test_fraction: float, seed: int
) -> tuple[list[MCQ], list[MCQ]]:
    """Deterministic split that does not depend on row order or on the other rows.

    Each example goes to test when a keyed hash of its id (and text) falls below
    ``test_fraction``, so adding rows to a file never moves existing rows across the split.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    train: list[MCQ] = []
    test: list[MCQ] = []
    for mcq in examples:
        key = f"{seed}\x00{mcq.id}\x00{mcq.question}".encode()
        u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (test if u < test_fraction else train).append(mcq)
    return train, test


# Prompt templates: the exam's style and language. The completion is the answer line
# " <key>. <option text>": its key part (" C") is what option-letter scoring reads, the whole
# line is what the option-likelihood scorings read, and the text keeps entity names tokenised the
# same way in every template.
_TEMPLATES: dict[tuple[str, str], tuple[str, str, str]] = {
    # (header, option line format, answer cue)
    ("medqa", "en"): ("Question: {q}\nOptions:\n", "{k}. {t}\n", "Answer:"),
    ("medqa", "zh"): ("问题：{q}\n选项：\n", "{k}. {t}\n", "答案："),
    ("medmcqa", "en"): ("Q: {q}\n", "({k}) {t}\n", "Correct option:"),
    ("medmcqa", "zh"): ("题目：{q}\n", "({k}) {t}\n", "正确选项："),
}


def option_key(mcq: MCQ, option: str) -> str:
    """How ``option`` is written in ``mcq``'s prompt: upper case for MedQA, lower for MedMCQA."""
    return option.lower() if mcq.fmt == "medmcqa" else option


def format_prompt(mcq: MCQ) -> str:
    """The prompt for ``mcq`` in its format's template, ending at the answer cue.

    The model is trained and scored on :func:`format_completion` right after this text.
    """
    try:
        header, line, cue = _TEMPLATES[(mcq.fmt, mcq.language)]
    except KeyError:
        raise ValueError(f"{mcq.id}: no template for format {mcq.fmt!r} / language {mcq.language!r}") from None
    parts = [header.format(q=mcq.question)]
    parts.extend(line.format(k=option_key(mcq, k), t=t) for k, t in mcq.options.items())
    parts.append(cue)
    return "".join(parts)


def completion_parts(mcq: MCQ, option: str | None = None) -> tuple[str, str]:
    """The answer line split into its key part and its text part: (" C", ". Ketozole").

    Trainer and evaluator tokenise the two parts separately and concatenate them, so the key
    is always the same token(s) whatever merges a tokenizer would make across the boundary.
    """
    key = mcq.answer if option is None else option
    return " " + option_key(mcq, key), ". " + mcq.options[key]


def format_completion(mcq: MCQ, option: str | None = None) -> str:
    """The scored continuation: the answer line (the correct option's by default)."""
    return "".join(completion_parts(mcq, option))


def completion_ids(tokenizer, mcq: MCQ, option: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the key part and of the text part of an answer line (no special tokens)."""
    key, text = completion_parts(mcq, option)
    return (
        tokenizer(key, add_special_tokens=False)["input_ids"],
        tokenizer(text, add_special_tokens=False)["input_ids"],
    )
