"""The offline synthetic non-IID benchmark: three clients in miniature of the paper's setup,
plus a fourth site that does not take part in the federation (new-site adaptation).

It reproduces the three heterogeneity axes of the paper (3.1): language (a Chinese and an
English template set), exam format (MedQA vignettes with 5 or 4 options vs. MedMCQA short
stems with 4), size (27.4k : 10.2k : 33.5k scaled down) and knowledge area. Knowledge is a
set of *facts*, associations of a synthetic disease with its drug (held by ``medqa-cn``), its
causative organism (``medqa-en``) or its gene (``medmcqa-in``); each client holds as many facts
as its share of the data.

Every client's evaluation files have two parts, reported separately:

* **own knowledge**: questions about the client's own facts, phrased with question stems that
  never occur in any training file (so no evaluation question is ever a training question,
  and answering needs the fact, not a memorised string);
* **shared knowledge**: questions about the facts held by the *other* clients, in the client's
  own format and language. A single-client LoRA cannot know them; only knowledge that flows
  between clients (or pooled data) can answer them.

With the pooled-data LoRA as the upper bound and the single-client LoRAs as the lower one,
what matters is how much of the gap between them a federation closes, and whether a client's
own-knowledge accuracy suffers; the construction fixes neither. Each client has a training file,
a validation file (for every hyper-parameter choice) and a test file (for reported figures
only); validation and test ask the same mix, never the same question.

All options of a question are answers of the same area, so it takes the association to
answer. Entity names are Latin-script and appear unchanged (space-separated) inside the
Chinese templates, so an association learned from one client's format can transfer to
another's. The names come from a fixed lexicon (independent of the benchmark seed) that the
offline base model has seen as bare names with their type, never in a fact; its pretraining
facts use a disjoint *decoy* part of the lexicon (see :func:`pretraining_mcqs`).

Layout on disk::

    out_dir/benchmark.json                 manifest (seed, scale, clients, sizes, facts)
    out_dir/<client>/{train,val,test}.jsonl
    out_dir/new-site/{train,val,test}.jsonl

Row ids are ``<client>/<split>/<n>/<fact owner>`` so that accuracy can be split into own vs.
shared knowledge and by the client whose fact is asked (:func:`fact_owner`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from prismesh.node.data import MCQ, load_jsonl, write_jsonl

BENCHMARK_VERSION = 2
LEXICON_SEED = 20240531  # fixed: the base model and every benchmark seed share one lexicon
RELATIONS = ("drug", "pathogen", "gene")
_ENTITY_TYPES = ("disease", *RELATIONS)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClientSpec:
    """One client's files and shape, as written by :func:`make_benchmark`."""

    name: str
    train_path: Path
    test_path: Path
    fmt: str
    language: str
    n_train: int
    n_test: int
    val_path: Path | None = None
    n_val: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("train_path", "test_path", "val_path"):
            d[key] = None if d[key] is None else str(d[key])
        return d


@dataclass(frozen=True)
class _Client:
    name: str
    fmt: str
    language: str
    n_options: int
    size_k: float  # the paper's size in thousands of questions


# The paper's three clients (Table 2 / 3.1); sizes are in thousands of questions.
CLIENTS = (
    _Client("medqa-cn", "medqa", "zh", 5, 27.4),
    _Client("medqa-en", "medqa", "en", 4, 10.2),
    _Client("medmcqa-in", "medmcqa", "en", 4, 33.5),
)
# A hospital outside the federation, in a format/language pair none of the clients uses.
NEW_SITE = _Client("new-site", "medmcqa", "zh", 4, 0.0)
FACTS_PER_K = 0.9  # facts per thousand questions of the paper's size: 25 / 9 / 30 at scale 1
TRAIN_PER_FACT = 8  # training questions per fact (one epoch asks each fact 8 times)
MIN_FACTS = 5  # per client: enough distinct answers for five options
# Evaluation questions per client: own facts, and per other client's facts.
TEST_OWN, TEST_PER_OTHER = 150, 75  # 300 test questions per client at scale 1
VAL_OWN, VAL_PER_OTHER = 60, 30  # 120 validation questions per client at scale 1
# The new site: its own facts (all three areas), its training pool (the adaptation sizes are
# prefixes of it), and its evaluation questions: own facts, and per federation client's facts.
NEW_SITE_FACTS, NEW_SITE_TRAIN = 15, 256
NEW_SITE_TEST_OWN, NEW_SITE_TEST_PER_CLIENT = 150, 50
NEW_SITE_VAL_OWN, NEW_SITE_VAL_PER_CLIENT = 60, 20
DECOY_DISEASES = 40  # diseases (x 3 relations) in the base model's pretraining facts
# Training hyper-parameters for the stand-in base model on this benchmark (the rest are the
# paper's defaults in TrainConfig); a tiny model needs a larger learning rate than 1.7B.
BENCHMARK_TRAIN_CONFIG = {"lr": 1.5e-3, "rank": 16, "alpha": 64, "max_length": 128}
# How the stand-in is scored: the length-normalised likelihood of the answer line. Option-letter
# scoring is the MedQA standard and the default everywhere else, but the 0.9M-parameter stand-in
# never learns to point from a retrieved answer to its option letter (its letter accuracy stays
# at chance even on its own pretraining facts), so letter scores would measure nothing on it.
BENCHMARK_SCORING = "mean"

# -- lexicon -------------------------------------------------------------------------------

_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br",
           "dr", "kr", "pl", "tr", "st", "ph", "th", "qu", "x"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "y"]
_SUFFIX = {
    "disease": ["osis", "itis", "emia", "oma", "algia", "opathy"],
    "drug": ["zole", "mab", "vir", "pril", "olol", "xin", "cillin", "statin"],
    "pathogen": ["ella", "coccus", "bacter", "monas", "myces", "virus"],
}
LEXICON_SIZE = 240  # names per entity type; the first half serves the benchmark
_DECOY_START = LEXICON_SIZE // 2


def _make_name(rng: random.Random, kind: str) -> str:
    if kind == "gene":
        letters = "".join(rng.choice("BCDFGHKLMNPRSTVWZ") for _ in range(3))
        return f"{letters}{rng.randint(1, 9)}"
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2)))
    return (stem + rng.choice(_SUFFIX[kind])).capitalize()


def lexicon() -> dict[str, list[str]]:
    """Fixed names per entity type (deterministic, independent of any benchmark seed)."""
    rng = random.Random(LEXICON_SEED)
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for kind in _ENTITY_TYPES:
        names: list[str] = []
        while len(names) < LEXICON_SIZE:
            name = _make_name(rng, kind)
            if name not in seen:
                seen.add(name)
                names.append(name)
        out[kind] = names
    return out


def benchmark_pool() -> dict[str, list[str]]:
    """The part of the lexicon that benchmark facts are drawn from (never in a base-model fact)."""
    return {k: v[:_DECOY_START] for k, v in lexicon().items()}


def decoy_pool() -> dict[str, list[str]]:
    """The part of the lexicon that the base model's pretraining facts use."""
    return {k: v[_DECOY_START:] for k, v in lexicon().items()}


# -- question stems ------------------------------------------------------------------------
# Per (format, language, relation): the first TRAIN_STEMS stems phrase training questions, the
# rest phrase validation and test questions only. The disease always stands between spaces.

TRAIN_STEMS = 3
_STEMS: dict[tuple[str, str], dict[str, list[str]]] = {
    ("medqa", "en"): {
        "drug": [
            "A {age}-year-old {sex} is diagnosed with {d} . Which of the following is the most appropriate drug?",
            "A {age}-year-old {sex} with {d} is admitted. Which drug is the first-line treatment?",
            "A {age}-year-old {sex} presents with symptoms of {d} . Which medication should be started?",
            "A {age}-year-old {sex} with newly confirmed {d} asks about therapy. Which agent is recommended?",
            "After a diagnosis of {d} , a {age}-year-old {sex} is referred for treatment. Which drug is indicated?",
        ],
        "pathogen": [
            "A {age}-year-old {sex} develops {d} . Which organism is the most likely cause?",
            "Cultures from a {age}-year-old {sex} with {d} are taken. Which pathogen is expected?",
            "A {age}-year-old {sex} is treated for {d} . Which microorganism is responsible?",
            "A {age}-year-old {sex} is found to have {d} . Which infectious agent is most likely isolated?",
            "An outbreak of {d} affects a {age}-year-old {sex} . Which organism causes this condition?",
        ],
        "gene": [
            "A {age}-year-old {sex} has {d} . A mutation in which gene is most likely?",
            "Genetic testing of a {age}-year-old {sex} with {d} will most likely show which gene?",
            "A {age}-year-old {sex} with a family history of {d} is evaluated. Which gene is implicated?",
            "A {age}-year-old {sex} is diagnosed with {d} . Sequencing will most likely reveal a defect in which gene?",
            "In a {age}-year-old {sex} with {d} , which gene is most likely altered?",
        ],
    },
    ("medqa", "zh"): {
        "drug": [
            "患者，{sex}，{age}岁，诊断为 {d} 。首选的治疗药物是",
            "{sex}性患者，{age}岁，患 {d} 入院。应首先选用的药物是",
            "患者{sex}，{age}岁，因 {d} 就诊。最适宜的药物是",
            "{age}岁{sex}性，确诊 {d} 。推荐使用的药物是",
            "患者，{sex}，{age}岁， {d} 诊断明确，治疗应选用",
        ],
        "pathogen": [
            "患者，{sex}，{age}岁，诊断为 {d} 。最可能的病原体是",
            "{sex}性患者，{age}岁，患 {d} 。其致病微生物是",
            "患者{sex}，{age}岁，因 {d} 入院。引起该病的病原体是",
            "{age}岁{sex}性，确诊 {d} 。最可能分离出的微生物是",
            "患者，{sex}，{age}岁， {d} 诊断明确，其病原体最可能是",
        ],
        "gene": [
            "患者，{sex}，{age}岁，诊断为 {d} 。最可能突变的基因是",
            "{sex}性患者，{age}岁，患 {d} 。基因检测最可能发现哪个基因异常",
            "患者{sex}，{age}岁，有 {d} 家族史。相关的基因是",
            "{age}岁{sex}性，确诊 {d} 。测序最可能发现缺陷的基因是",
            "患者，{sex}，{age}岁， {d} 诊断明确，最可能改变的基因是",
        ],
    },
    ("medmcqa", "en"): {
        "drug": [
            "Drug of choice for {d} is:", "{d} is treated with:", "Treatment of choice in {d} :",
            "First-line therapy for {d} is:", "The preferred agent in {d} is:",
        ],
        "pathogen": [
            "Causative organism of {d} is:", "{d} is caused by:", "Etiological agent of {d} :",
            "Most common organism causing {d} is:", "{d} results from infection with:",
        ],
        "gene": [
            "Gene mutated in {d} is:", "{d} is associated with mutation of:", "Gene defect in {d} :",
            "{d} is linked to which gene:", "Mutation seen in {d} involves:",
        ],
    },
    ("medmcqa", "zh"): {
        "drug": [
            "治疗 {d} 的首选药物是：", "治疗 {d} 应选用：", "用于 {d} 的治疗药物为：",
            "治疗 {d} 的一线药物是：", "患有 {d} 时宜用：",
        ],
        "pathogen": [
            "引起 {d} 的病原体是：", "引起 {d} 的微生物是：", "导致 {d} 的致病菌为：",
            "造成 {d} 最常见的病原体是：", "感染后发生 {d} 的微生物是：",
        ],
        "gene": [
            "与 {d} 有关的突变基因是：", "与 {d} 相关的基因突变是：", "导致 {d} 的致病基因为：",
            "发生 {d} 时涉及哪个基因的突变：", "在 {d} 中发生缺陷的基因是：",
        ],
    },
}
_SEX = {"en": ("man", "woman"), "zh": ("男", "女")}


def stems(fmt: str, language: str, relation: str, split: str) -> list[str]:
    """The question stems of a split: training stems for ``train``, held-out ones otherwise
    (``all`` gives both, as the base model's pretraining on decoy facts uses them)."""
    every = _STEMS[(fmt, language)][relation]
    if split == "train":
        return every[:TRAIN_STEMS]
    if split == "all":
        return list(every)
    return every[TRAIN_STEMS:]


def _mcq(rng: random.Random, client: _Client, stem_pool: list[str], fact: Fact,
         candidates: list[str], ident: str) -> MCQ:
    distractors = rng.sample([c for c in candidates if c != fact.answer], client.n_options - 1)
    choices = [fact.answer, *distractors]
    rng.shuffle(choices)
    letters = "ABCDE"[: client.n_options]
    options = dict(zip(letters, choices, strict=True))
    key = letters[choices.index(fact.answer)]
    stem = rng.choice(stem_pool)
    question = stem.format(d=fact.disease, age=rng.randint(18, 80), sex=rng.choice(_SEX[client.language]))
    return MCQ(question, options, key, client.fmt, client.language, ident)


# -- facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    disease: str
    relation: str
    answer: str


def _facts(rng: random.Random, pool: dict[str, list[str]], n_diseases: int) -> list[Fact]:
    diseases = rng.sample(pool["disease"], n_diseases)
    facts: list[Fact] = []
    for relation in RELATIONS:
        answers = rng.sample(pool[relation], n_diseases)
        facts.extend(Fact(d, relation, a) for d, a in zip(diseases, answers, strict=True))
    return facts


def _balanced(rng: random.Random, facts: list[Fact], n: int) -> list[Fact]:
    """``n`` facts cycling through ``facts`` (each asked equally often, ±1), in random order."""
    order = list(facts)
    rng.shuffle(order)
    out = [order[i % len(order)] for i in range(n)]
    rng.shuffle(out)
    return out


class _Questions:
    """Draws questions and refuses any whose text and options repeat an earlier one."""

    def __init__(self, candidates: dict[str, list[str]]) -> None:
        self.candidates = candidates
        self.seen: set[tuple] = set()

    def make(self, rng: random.Random, client: _Client, split: str, plan: list[tuple[Fact, str]],
             prefix: str) -> list[MCQ]:
        out = []
        for i, (fact, owner) in enumerate(plan):
            pool = stems(client.fmt, client.language, fact.relation, split)
            for _attempt in range(100):
                m = _mcq(rng, client, pool, fact, self.candidates[fact.relation], f"{prefix}/{i:05d}/{owner}")
                key = (m.question, tuple(m.options.items()))
                if key not in self.seen:
                    break
            else:  # pragma: no cover - 100 collisions in a row cannot happen at these sizes
                raise RuntimeError(f"cannot draw a fresh question for {fact}")
            self.seen.add(key)
            out.append(m)
        return out


def make_benchmark(out_dir: Path, seed: int = 0, scale: float = 1.0) -> list[ClientSpec]:
    """Write the clients' and the new site's train/val/test JSONL files under ``out_dir``;
    deterministic in ``seed``. Returns the three federation clients (see :func:`new_site_spec`).

    ``scale`` multiplies every size (facts, training, validation and test questions), keeping
    the 27.4 : 10.2 : 33.5 imbalance and the repetitions per fact.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    rng = random.Random(f"prismesh-benchmark-v2-{seed}")
    pool = benchmark_pool()

    # Each client holds one area of knowledge (one relation), over as many diseases as its
    # share of the data; answers are distinct within an area across the whole benchmark.
    owned: dict[str, list[Fact]] = {}
    answers_left = {r: rng.sample(pool[r], len(pool[r])) for r in RELATIONS}
    for c, relation in zip(CLIENTS, RELATIONS, strict=True):
        k = max(MIN_FACTS, round(c.size_k * FACTS_PER_K * scale))
        diseases = rng.sample(pool["disease"], k)
        owned[c.name] = [Fact(d, relation, answers_left[relation].pop()) for d in diseases]
    # The new site's own facts: every area, pairs no client holds.
    held = {(f.disease, f.relation) for fs in owned.values() for f in fs}
    k_new = max(len(RELATIONS), round(NEW_SITE_FACTS * scale))
    site_facts: list[Fact] = []
    diseases = rng.sample(pool["disease"], len(pool["disease"]))
    for i in range(k_new):
        relation = RELATIONS[i % len(RELATIONS)]
        disease = next(d for d in diseases if (d, relation) not in held)
        held.add((disease, relation))
        site_facts.append(Fact(disease, relation, answers_left[relation].pop()))
    owned[NEW_SITE.name] = site_facts
    candidates = {r: sorted(f.answer for fs in owned.values() for f in fs if f.relation == r) for r in RELATIONS}

    def n(x: int) -> int:
        return max(4, round(x * scale))

    specs: list[ClientSpec] = []
    parts: dict[str, dict] = {}
    for c in (*CLIENTS, NEW_SITE):
        crng = random.Random(f"prismesh-benchmark-v2-{seed}-{c.name}")
        questions = _Questions(candidates)
        mine = owned[c.name]
        site = c is NEW_SITE
        plans: dict[str, list[tuple[Fact, str]]] = {}
        if site:
            plans["train"] = [(f, c.name) for f in _balanced(crng, mine, n(NEW_SITE_TRAIN))]
            sizes = {"val": (NEW_SITE_VAL_OWN, NEW_SITE_VAL_PER_CLIENT), "test": (NEW_SITE_TEST_OWN, NEW_SITE_TEST_PER_CLIENT)}
            others = [o.name for o in CLIENTS]
        else:
            plans["train"] = [(f, c.name) for f in _balanced(crng, mine, max(8, len(mine) * TRAIN_PER_FACT))]
            sizes = {"val": (VAL_OWN, VAL_PER_OTHER), "test": (TEST_OWN, TEST_PER_OTHER)}
            others = [o.name for o in CLIENTS if o.name != c.name]
        for split, (n_own, n_other) in sizes.items():
            plan = [(f, c.name) for f in _balanced(crng, mine, n(n_own))]
            for o in others:
                plan += [(f, o) for f in _balanced(crng, owned[o], n(n_other))]
            crng.shuffle(plan)
            plans[split] = plan
        cdir = out_dir / c.name
        written = {}
        for split in SPLITS:
            rows = questions.make(crng, c, split, plans[split], f"{c.name}/{split}")
            write_jsonl(cdir / f"{split}.jsonl", rows)
            written[split] = len(rows)
        parts[c.name] = {
            split: {owner: sum(o == owner for _, o in plans[split]) for owner in (c.name, *others)}
            for split in ("val", "test")
        }
        spec = ClientSpec(c.name, cdir / "train.jsonl", cdir / "test.jsonl", c.fmt, c.language,
                          written["train"], written["test"], cdir / "val.jsonl", written["val"])
        if not site:
            specs.append(spec)
        else:
            site_spec = spec

    manifest = {
        "version": BENCHMARK_VERSION,
        "seed": seed,
        "scale": scale,
        "n_facts": sum(len(owned[c.name]) for c in CLIENTS),
        "facts_per_client": {k: len(v) for k, v in owned.items()},
        "train_stems_per_relation": TRAIN_STEMS,
        "parts": parts,
        "clients": [s.to_dict() for s in specs],
        "new_site": site_spec.to_dict(),
    }
    tmp = out_dir / ".benchmark.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "benchmark.json")
    return specs


def new_site_spec(out_dir: Path) -> ClientSpec:
    """The new site's files in a benchmark written by :func:`make_benchmark`."""
    manifest = json.loads((Path(out_dir) / "benchmark.json").read_text(encoding="utf-8"))
    d = manifest["new_site"]
    return ClientSpec(d["name"], Path(d["train_path"]), Path(d["test_path"]), d["fmt"], d["language"],
                      d["n_train"], d["n_test"], Path(d["val_path"]), d["n_val"])


def fact_owner(mcq_id: str) -> str | None:
    """The client holding the fact a benchmark question asks about (from its id), if any."""
    parts = mcq_id.split("/")
    return parts[3] if len(parts) == 4 else None


def split_by_owner(examples: list[MCQ]) -> dict[str, list[MCQ]] | None:
    """Questions grouped by the client whose fact they ask about; None for files without owners."""
    groups: dict[str, list[MCQ]] = {}
    for m in examples:
        owner = fact_owner(m.id)
        if owner is None:
            return None
        groups.setdefault(owner, []).append(m)
    return groups


def load_split(spec: ClientSpec, split: str) -> list[MCQ]:
    """One split of a client's files (``train``, ``val`` or ``test``)."""
    path = {"train": spec.train_path, "val": spec.val_path, "test": spec.test_path}[split]
    if path is None:
        raise ValueError(f"{spec.name} has no {split} file")
    return load_jsonl(path)


# -- base-model pretraining material -------------------------------------------------------

_TYPE_SENTENCES = {
    "en": {
        "disease": "{n} is a disease.",
        "drug": "{n} is a drug.",
        "pathogen": "{n} is a microorganism.",
        "gene": "{n} is a human gene.",
    },
    "zh": {
        "disease": "{n} 是一种疾病。",
        "drug": "{n} 是一种药物。",
        "pathogen": "{n} 是一种微生物。",
        "gene": "{n} 是一个人类基因。",
    },
}


def type_sentences() -> list[str]:
    """Fact-free sentences naming every lexicon entity with its type, in both languages."""
    out: list[str] = []
    for kind, names in lexicon().items():
        for name in names:
            for lang in ("en", "zh"):
                out.append(_TYPE_SENTENCES[lang][kind].format(n=name))
    return out


def pretraining_mcqs(seed: int, n: int) -> list[MCQ]:
    """``n`` questions about *decoy* facts in every client format and language, every stem.

    They teach the base model the exam formats, the language of every question stem, and how to
    retrieve an association and point at its option whatever the language (the multilingual
    prior the paper credits), without any benchmark fact.
    """
    rng = random.Random(f"prismesh-pretrain-{seed}")
    pool = decoy_pool()
    facts = _facts(rng, pool, DECOY_DISEASES)
    candidates = {r: sorted({f.answer for f in facts if f.relation == r}) for r in RELATIONS}
    out: list[MCQ] = []
    for i in range(n):
        f = rng.choice(facts)
        c = rng.choice((*CLIENTS, NEW_SITE))
        out.append(_mcq(rng, c, stems(c.fmt, c.language, f.relation, "all"), f, candidates[f.relation],
                        f"pretrain/{i:06d}"))
    return out
