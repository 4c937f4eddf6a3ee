"""MedQA / MedMCQA loaders, prompt templates and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prismesh.node.data import (
    MCQ,
    DataFormatError,
    completion_parts,
    format_completion,
    format_prompt,
    load_jsonl,
    train_test_split,
    write_jsonl,
)

MEDQA_EN = {
    "question": "A 23-year-old woman presents with dysuria. Which is the best treatment?",
    "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Nitrofurantoin", "D": "Doxycycline"},
    "answer_idx": "C",
    "answer": "Nitrofurantoin",
}
MEDQA_ZH = {
    "question": "男，45岁。反复上腹痛3年，首选的检查是",
    "options": {"A": "胃镜", "B": "腹部B超", "C": "血常规", "D": "腹部CT", "E": "钡餐"},
    "answer_idx": "A",
}
MEDMCQA = {
    "id": "q-1",
    "question": "Drug of choice for absence seizures is:",
    "opa": "Phenytoin", "opb": "Ethosuximide", "opc": "Carbamazepine", "opd": "Phenobarbitone",
    "cop": 2,
}


def write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_medqa_english_and_chinese(tmp_path):
    items = load_jsonl(write(tmp_path / "c1.jsonl", [MEDQA_EN, "", MEDQA_ZH]))
    assert [m.fmt for m in items] == ["medqa", "medqa"]
    assert [m.language for m in items] == ["en", "zh"]
    en, zh = items
    assert en.answer == "C" and en.answer_text == "Nitrofurantoin"
    assert zh.options["A"] == "胃镜" and zh.answer_text == "胃镜"
    assert en.id == "c1:1" and zh.id == "c1:3"  # blank line 2 skipped, numbering kept


def test_medmcqa_one_based_cop_and_letters(tmp_path):
    row_letter = {**MEDMCQA, "id": "q-2", "cop": "d"}
    items = load_jsonl(write(tmp_path / "in.jsonl", [MEDMCQA, row_letter]), fmt="medmcqa")
    assert items[0].options == {"A": "Phenytoin", "B": "Ethosuximide", "C": "Carbamazepine", "D": "Phenobarbitone"}
    assert items[0].answer == "B" and items[0].answer_text == "Ethosuximide"
    assert items[1].answer == "D"
    assert items[0].id == "q-1" and items[0].language == "en"


@pytest.mark.parametrize(
    ("rows", "line", "reason"),
    [
        ([MEDQA_EN, "{not json"], 2, "invalid JSON"),
        ([{**MEDQA_EN, "answer_idx": "F"}], 1, "'answer_idx' 'F' is not one of the option keys"),
        ([{k: v for k, v in MEDQA_EN.items() if k != "answer_idx"}], 1, "missing 'answer_idx'"),
        ([{**MEDQA_EN, "answer": "Ampicillin"}], 1, "does not match options[C]"),
        ([{**MEDQA_ZH, "question": "  "}], 1, "'question' must be a non-empty string"),
        ([MEDMCQA, {**MEDMCQA, "cop": 0}], 2, "'cop' 0 must be 1-4"),
        ([{**MEDMCQA, "opc": None}], 1, "'opc' must be a non-empty string"),
        ([MEDQA_EN, MEDMCQA], 2, "row is medmcqa but the file is medqa"),
        ([{"question": "q", "answer": "x"}], 1, "neither MedQA"),
        ([[1, 2]], 1, "row must be a JSON object"),
        ([{**MEDQA_ZH, "language": "fr"}], 1, "'language' 'fr'"),
    ],
)
def test_malformed_rows_name_file_line_and_reason(tmp_path, rows, line, reason):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    err = info.value
    assert err.line == line and err.path == str(path)
    assert reason in err.reason
    assert f"bad.jsonl:{line}:" in str(err)


def test_chinese_malformed_row_and_missing_or_empty_file(tmp_path):
    path = write(tmp_path / "zh.jsonl", [MEDQA_ZH, {**MEDQA_ZH, "options": {"A": "胃镜"}}])
    with pytest.raises(DataFormatError, match=r"zh\.jsonl:2: 'options' must be an object with at least two"):
        load_jsonl(path)
    with pytest.raises(DataFormatError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataFormatError, match="holds no rows"):
        load_jsonl(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataFormatError, match="file is medmcqa"):
        load_jsonl(write(tmp_path / "q.jsonl", [MEDQA_EN]), fmt="medmcqa")


def test_prompt_templates_per_format_and_language(tmp_path):
    en, zh = load_jsonl(write(tmp_path / "c.jsonl", [MEDQA_EN, MEDQA_ZH]))
    (mc,) = load_jsonl(write(tmp_path / "m.jsonl", [MEDMCQA]))
    assert format_prompt(en) == (
        "Question: " + MEDQA_EN["question"] + "\nOptions:\nA. Ampicillin\nB. Ceftriaxone\n"
        "C. Nitrofurantoin\nD. Doxycycline\nAnswer:"
    )
    assert format_prompt(zh) == (
        "问题：" + MEDQA_ZH["question"] + "\n选项：\nA. 胃镜\nB. 腹部B超\nC. 血常规\nD. 腹部CT\nE. 钡餐\n答案："
    )
    assert format_prompt(mc) == (
        "Q: Drug of choice for absence seizures is:\n(a) Phenytoin\n(b) Ethosuximide\n"
        "(c) Carbamazepine\n(d) Phenobarbitone\nCorrect option:"
    )
    # The answer line: the option's key as the prompt writes it, then its text.
    assert format_completion(en) == " C. Nitrofurantoin"
    assert format_completion(zh, "B") == " B. 腹部B超"
    assert format_completion(mc) == " b. Ethosuximide"
    assert completion_parts(mc, "D") == (" d", ". Phenobarbitone")


def test_write_jsonl_round_trips_both_formats(tmp_path):
    src = load_jsonl(write(tmp_path / "a.jsonl", [MEDQA_EN, MEDQA_ZH]))
    src += load_jsonl(write(tmp_path / "b.jsonl", [MEDMCQA]))
    write_jsonl(tmp_path / "qa.jsonl", src[:2])
    write_jsonl(tmp_path / "mc.jsonl", src[2:])
    assert load_jsonl(tmp_path / "qa.jsonl") + load_jsonl(tmp_path / "mc.jsonl") == src
    assert not list(tmp_path.glob(".*.tmp"))


def _mcqs(n: int) -> list[MCQ]:
    return [MCQ(f"q{i}?", {"A": "x", "B": "y"}, "A", "medqa", "en", f"id{i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_stable_under_appends():
    items = _mcqs(400)
    train, test = train_test_split(items, 0.25, seed=7)
    assert (train, test) == train_test_split(items, 0.25, seed=7)
    assert len(train) + len(test) == 400 and not {m.id for m in train} & {m.id for m in test}
    assert 70 <= len(test) <= 130
    assert train_test_split(items, 0.25, seed=8)[1] != test
    # Order and extra rows do not move existing rows across the split.
    _, test2 = train_test_split(list(reversed(items)) + _mcqs(450)[400:], 0.25, seed=7)
    assert {m.id for m in test} <= {m.id for m in test2}
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(items, 1.5, seed=0)
