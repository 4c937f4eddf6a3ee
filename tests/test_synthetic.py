"""The synthetic non-IID benchmark: deterministic, imbalanced, facts partitioned across clients."""

from __future__ import annotations

import json
import re

import pytest

from prismesh.node.data import format_prompt, load_jsonl
from prismesh.node.synthetic import (
    CLIENTS,
    benchmark_pool,
    decoy_pool,
    fact_owner,
    make_benchmark,
    pretraining_mcqs,
    type_sentences,
)


def _read_all(specs):
    return {s.name: (s.train_path.read_bytes(), s.test_path.read_bytes()) for s in specs}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_benchmark(tmp_path / "a", seed=3, scale=0.5)
    b = make_benchmark(tmp_path / "b", seed=3, scale=0.5)
    c = make_benchmark(tmp_path / "c", seed=4, scale=0.5)
    assert _read_all(a) == _read_all(b)
    assert _read_all(a) != _read_all(c)
    assert not list((tmp_path / "a").rglob(".*.tmp"))


def test_clients_differ_in_language_format_and_size(tmp_path):
    specs = make_benchmark(tmp_path, seed=0)
    by = {s.name: s for s in specs}
    assert [(s.fmt, s.language) for s in specs] == [("medqa", "zh"), ("medqa", "en"), ("medmcqa", "en")]
    sizes = [by[c.name].n_train for c in CLIENTS]
    paper = [c.size_k for c in CLIENTS]
    for n, k in zip(sizes, paper, strict=True):  # the paper's 27.4 : 10.2 : 33.5 imbalance
        assert n / sum(sizes) == pytest.approx(k / sum(paper), abs=0.01)
    for s in specs:
        train, test = load_jsonl(s.train_path), load_jsonl(s.test_path)
        assert len(train) == s.n_train and len(test) == s.n_test
        assert {m.language for m in train + test} == {s.language}
        assert {m.fmt for m in train + test} == {s.fmt}
        assert {len(m.options) for m in train} == {5 if s.language == "zh" else 4}
        # The answer letter is spread over positions, so position alone predicts nothing.
        letters = [m.answer for m in train]
        assert max(letters.count(k) for k in set(letters)) < 0.5 * len(letters)
    manifest = json.loads((tmp_path / "benchmark.json").read_text())
    assert manifest["seed"] == 0 and [c["name"] for c in manifest["clients"]] == [s.name for s in specs]


def _fact_key(mcq):
    disease = next(n for n in benchmark_pool()["disease"] if re.search(rf"\b{n}\b", mcq.question))
    return disease, mcq.answer_text


def test_facts_partitioned_and_tests_ask_mostly_about_others(tmp_path):
    specs = make_benchmark(tmp_path, seed=1)
    held = {s.name: {_fact_key(m) for m in load_jsonl(s.train_path)} for s in specs}
    names = list(held)
    for i, a in enumerate(names):  # no fact is held by two clients
        for b in names[i + 1 :]:
            assert not held[a] & held[b]
    for s in specs:
        test = load_jsonl(s.test_path)
        owners = [fact_owner(m.id) for m in test]
        assert set(owners) <= set(names)
        others = sum(o != s.name for o in owners) / len(owners)
        assert 0.55 <= others <= 0.75
        for m, owner in zip(test, owners, strict=True):  # the id names the true holder
            assert _fact_key(m) in held[owner]


def test_entity_names_shared_across_languages_and_disjoint_from_decoys(tmp_path):
    specs = make_benchmark(tmp_path, seed=0, scale=0.3)
    zh = load_jsonl(next(s for s in specs if s.language == "zh").train_path)
    pool = benchmark_pool()
    for m in zh[:20]:
        prompt = format_prompt(m)
        # Latin-script names stand unchanged, space-separated, inside the Chinese template.
        assert any(f" {d} " in m.question for d in pool["disease"])
        assert f" {m.answer_text}\n" in prompt
    decoys = decoy_pool()
    for kind, names in pool.items():
        assert not set(names) & set(decoys[kind])
    pre = pretraining_mcqs(0, 200)
    used = {w for m in pre for w in re.findall(r"[A-Za-z]+\d?", m.question + " ".join(m.options.values()))}
    assert not used & set(pool["disease"]) and not used & set(pool["drug"])
    assert {(m.fmt, m.language) for m in pre} == {(c.fmt, c.language) for c in CLIENTS}
    assert any(pool["drug"][0] in s for s in type_sentences())


def test_scale_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        make_benchmark(tmp_path, scale=0)
