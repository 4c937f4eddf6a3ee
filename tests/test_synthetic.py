"""The synthetic non-IID benchmark: deterministic, imbalanced, facts partitioned across clients,
own and shared knowledge separated, evaluation questions held out from training."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from prismesh.node.data import format_prompt, load_jsonl
from prismesh.node.synthetic import (
    CLIENTS,
    NEW_SITE,
    TEST_OWN,
    TEST_PER_OTHER,
    benchmark_pool,
    decoy_pool,
    fact_owner,
    make_benchmark,
    new_site_spec,
    pretraining_mcqs,
    split_by_owner,
    stems,
    type_sentences,
)


def _read_all(specs):
    return {s.name: tuple(p.read_bytes() for p in (s.train_path, s.val_path, s.test_path)) for s in specs}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root, make_benchmark(root, seed=1)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_benchmark(tmp_path / "a", seed=3, scale=0.3)
    b = make_benchmark(tmp_path / "b", seed=3, scale=0.3)
    c = make_benchmark(tmp_path / "c", seed=4, scale=0.3)
    assert _read_all(a) == _read_all(b)
    assert _read_all(a) != _read_all(c)
    site_a, site_b = new_site_spec(tmp_path / "a"), new_site_spec(tmp_path / "b")
    assert site_a.train_path.read_bytes() == site_b.train_path.read_bytes()
    assert not list((tmp_path / "a").rglob(".*.tmp"))


def test_clients_differ_in_language_format_and_size(bench):
    root, specs = bench
    by = {s.name: s for s in specs}
    assert [(s.fmt, s.language) for s in specs] == [("medqa", "zh"), ("medqa", "en"), ("medmcqa", "en")]
    sizes = [by[c.name].n_train for c in CLIENTS]
    paper = [c.size_k for c in CLIENTS]
    for n, k in zip(sizes, paper, strict=True):  # the paper's 27.4 : 10.2 : 33.5 imbalance
        assert n / sum(sizes) == pytest.approx(k / sum(paper), abs=0.02)
    for s in specs:
        train, val, test = load_jsonl(s.train_path), load_jsonl(s.val_path), load_jsonl(s.test_path)
        assert (len(train), len(val), len(test)) == (s.n_train, s.n_val, s.n_test)
        assert {m.language for m in train + val + test} == {s.language}
        assert {m.fmt for m in train + val + test} == {s.fmt}
        assert {len(m.options) for m in train} == {5 if s.language == "zh" else 4}
        for rows in (train, test):  # the answer letter is spread over positions
            letters = Counter(m.answer for m in rows)
            assert max(letters.values()) < 0.4 * len(rows)
    manifest = json.loads((root / "benchmark.json").read_text())
    assert manifest["seed"] == 1 and [c["name"] for c in manifest["clients"]] == [s.name for s in specs]


_DISEASES = set(benchmark_pool()["disease"])


def _fact_key(mcq):
    disease = next(w for w in mcq.question.split() if w in _DISEASES)
    return disease, mcq.answer_text


def test_test_sets_are_large_own_and_shared_parts_over_many_facts(bench):
    root, specs = bench
    held = {s.name: {_fact_key(m) for m in load_jsonl(s.train_path)} for s in specs}
    names = list(held)
    for i, a in enumerate(names):  # no fact is held by two clients
        for b in names[i + 1 :]:
            assert not held[a] & held[b]
    manifest = json.loads((root / "benchmark.json").read_text())
    for s in specs:
        test = load_jsonl(s.test_path)
        assert len(test) >= 300
        parts = split_by_owner(test)
        assert set(parts) == set(names)
        assert len(parts[s.name]) == TEST_OWN
        assert all(len(parts[o]) == TEST_PER_OTHER for o in names if o != s.name)
        assert manifest["parts"][s.name]["test"] == {k: len(v) for k, v in parts.items()}
        for owner, rows in parts.items():  # the id names the true holder; many facts per part
            keys = {_fact_key(m) for m in rows}
            assert keys <= held[owner]
            assert len(keys) == len(held[owner]) >= 9
        assert fact_owner(test[0].id) in names and fact_owner("row-without-owner") is None


def test_no_evaluation_question_repeats_or_rephrases_a_training_one(bench):
    """Own-knowledge questions ask about trained facts in stems never used in training, and no
    question (text and options) appears twice anywhere in a client's files."""
    _, specs = bench
    for s in specs:
        train, val, test = (load_jsonl(p) for p in (s.train_path, s.val_path, s.test_path))
        seen = [(m.question, tuple(m.options.items())) for m in train + val + test]
        assert len(seen) == len(set(seen))
        train_q = {m.question for m in train}
        assert not train_q & {m.question for m in val + test}

        def stem_of(m, pool):
            disease, _ = _fact_key(m)
            return next(i for i, st in enumerate(pool) if re.fullmatch(
                re.escape(st).replace(re.escape("{d}"), re.escape(disease))
                .replace(re.escape("{age}"), r"\d+").replace(re.escape("{sex}"), r"\w+"), m.question))

        for m in train + val + test:
            relation = {"medqa-cn": "drug", "medqa-en": "pathogen", "medmcqa-in": "gene"}[fact_owner(m.id)]
            every = stems(s.fmt, s.language, relation, "all")
            idx = stem_of(m, every)
            split = m.id.split("/")[1]
            assert (every[idx] in stems(s.fmt, s.language, relation, "train")) == (split == "train"), m.id


def test_new_site_is_outside_the_federation(bench):
    root, specs = bench
    site = new_site_spec(root)
    assert (site.name, site.fmt, site.language) == (NEW_SITE.name, "medmcqa", "zh")
    assert (site.fmt, site.language) not in {(s.fmt, s.language) for s in specs}
    train, test = load_jsonl(site.train_path), load_jsonl(site.test_path)
    assert site.n_train == len(train) >= 256
    own = {_fact_key(m) for m in train}
    client_facts = set().union(*({_fact_key(m) for m in load_jsonl(s.train_path)} for s in specs))
    assert not own & client_facts
    parts = split_by_owner(test)
    assert set(parts) == {site.name, *(s.name for s in specs)}
    assert {_fact_key(m) for m in parts[site.name]} <= own
    for s in specs:
        assert {_fact_key(m) for m in parts[s.name]} <= {_fact_key(m) for m in load_jsonl(s.train_path)}


def test_entity_names_shared_across_languages_and_disjoint_from_decoys(tmp_path):
    specs = make_benchmark(tmp_path, seed=0, scale=0.3)
    pool = benchmark_pool()
    for s in [*specs, new_site_spec(tmp_path)]:
        for m in load_jsonl(s.train_path)[:20] + load_jsonl(s.test_path)[:20]:
            prompt = format_prompt(m)
            # Names stand unchanged and space-separated in every template, Chinese ones too.
            assert any(f" {d} " in prompt for d in pool["disease"]), prompt
    decoys = decoy_pool()
    for kind, names in pool.items():
        assert not set(names) & set(decoys[kind])
    pre = pretraining_mcqs(0, 400)
    used = {w for m in pre for w in re.findall(r"[A-Za-z]+\d?", m.question + " ".join(m.options.values()))}
    assert not used & set(pool["disease"]) and not used & set(pool["drug"])
    assert {(m.fmt, m.language) for m in pre} == {(c.fmt, c.language) for c in (*CLIENTS, NEW_SITE)}
    assert any(pool["drug"][0] in s for s in type_sentences())


def test_scale_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        make_benchmark(tmp_path, scale=0)
