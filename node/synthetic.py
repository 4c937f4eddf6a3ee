"""The offline synthetic non-IID benchmark: three clients in miniature of the paper's setup.

It reproduces the three heterogeneity axes of the paper (3.1): language (a Chinese and an
English template set), exam format (MedQA vignettes with 5 or 4 options vs. MedMCQA short
stems with 4), size (27.4k : 10.2k : 33.5k scaled down) and knowledge area. Knowledge is a
set of *facts*, associations of a synthetic disease with its drug (held by ``medqa-cn``), its
causative organism (``medqa-en``) or its gene (``medmcqa-in``). A client's training file only
asks about its own facts, while its test file asks mostly (by default 2/3) about facts held by
the *other* clients, phrased in its own format and language. A single-client LoRA can therefore
only answer its own share well; the rest has to flow in through aggregation. All options of a
question are answers of the same area, so it takes the association to answer; a preference
for names seen in training neither helps nor hurts.

Entity names are Latin-script and appear unchanged (space-separated) inside the Chinese
templates, so an association learned from one client's format can transfer to another's.
The names come from a fixed lexicon (independent of the benchmark seed) that the offline base
model has seen as bare names with their type, never in a fact; its pretraining facts use a
disjoint *decoy* part of the lexicon (see :func:`pretraining_mcqs`).

Layout on disk (one directory per client, a fixed train/test split decided at generation)::

    out_dir/benchmark.json            manifest (seed, scale, clients, sizes, fact counts)
    out_dir/<client>/train.jsonl      MedQA or MedMCQA rows
    out_dir/<client>/test.jsonl

Test row ids are ``<client>/test/<n>/<fact owner>`` so that accuracy can be split into own
vs. others' facts.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from prismesh.node.data import MCQ, write_jsonl

BENCHMARK_VERSION = 1
LEXICON_SEED = 20240531  # fixed: the base model and every benchmark seed share one lexicon
RELATIONS = ("drug", "pathogen", "gene")
_ENTITY_TYPES = ("disease", *RELATIONS)


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_path"] = str(self.train_path)
        d["test_path"] = str(self.test_path)
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
TRAIN_PER_K = 6.0  # training questions per thousand at scale 1.0 -> 164 / 61 / 201
TEST_PER_CLIENT = 90  # at scale 1.0, equal for every client
FACTS_PER_TRAIN = 1 / 24  # facts per training question: each fact is asked ~12-25 times
DECOY_DISEASES = 40  # diseases (x 3 relations) in the base model's pretraining facts
OWN_TEST_FRACTION = 1 / 3
MIN_FACTS = 5  # per client: enough distinct answers for five options
# Training hyper-parameters for the stand-in base model on this benchmark (the rest are the
# paper's defaults in TrainConfig); a tiny model needs a larger learning rate than 1.7B.
BENCHMARK_TRAIN_CONFIG = {"lr": 1.5e-3, "rank": 16, "alpha": 64, "max_length": 128}

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


# -- question templates --------------------------------------------------------------------

_STEMS: dict[tuple[str, str], dict[str, list[str]]] = {
    ("medqa", "en"): {
        "drug": [
            "A {age}-year-old {sex} is diagnosed with {d} . Which of the following is the most appropriate drug?",
            "A {age}-year-old {sex} with {d} is admitted. Which drug is the first-line treatment?",
        ],
        "pathogen": [
            "A {age}-year-old {sex} develops {d} . Which organism is the most likely cause?",
            "Cultures from a {age}-year-old {sex} with {d} are taken. Which pathogen is expected?",
        ],
        "gene": [
            "A {age}-year-old {sex} has {d} . A mutation in which gene is most likely?",
            "Genetic testing of a {age}-year-old {sex} with {d} will most likely show which gene?",
        ],
    },
    ("medqa", "zh"): {
        "drug": [
            "患者，{sex}，{age}岁，诊断为 {d} 。首选的治疗药物是",
            "{sex}性患者，{age}岁，患 {d} 入院。应首先选用的药物是",
        ],
        "pathogen": [
            "患者，{sex}，{age}岁，诊断为 {d} 。最可能的病原体是",
            "{sex}性患者，{age}岁，患 {d} 。其致病微生物是",
        ],
        "gene": [
            "患者，{sex}，{age}岁，诊断为 {d} 。最可能突变的基因是",
            "{sex}性患者，{age}岁，患 {d} 。基因检测最可能发现哪个基因异常",
        ],
    },
    ("medmcqa", "en"): {
        "drug": ["Drug of choice for {d} is:", "{d} is treated with:"],
        "pathogen": ["Causative organism of {d} is:", "{d} is caused by:"],
        "gene": ["Gene mutated in {d} is:", "{d} is associated with mutation of:"],
    },
}
_SEX = {"en": ("man", "woman"), "zh": ("男", "女")}


def _question(rng: random.Random, fmt: str, language: str, relation: str, disease: str) -> str:
    stem = rng.choice(_STEMS[(fmt, language)][relation])
    return stem.format(d=disease, age=rng.randint(18, 80), sex=rng.choice(_SEX[language]))


def _mcq(
    rng: random.Random,
    fmt: str,
    language: str,
    n_options: int,
    relation: str,
    disease: str,
    answer: str,
    candidates: list[str],
    ident: str,
) -> MCQ:
    distractors = rng.sample([c for c in candidates if c != answer], n_options - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    letters = "ABCDE"[:n_options]
    options = dict(zip(letters, choices, strict=True))
    key = letters[choices.index(answer)]
    question = _question(rng, fmt, language, relation, disease)
    return MCQ(question, options, key, fmt, language, ident)


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


def make_benchmark(out_dir: Path, seed: int = 0, scale: float = 1.0) -> list[ClientSpec]:
    """Write the three clients' train/test JSONL files under ``out_dir``; deterministic in seed.

    ``scale`` multiplies every size (training questions, test questions, number of facts),
    keeping the 27.4 : 10.2 : 33.5 imbalance and the repetitions per fact.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    rng = random.Random(f"prismesh-benchmark-{seed}")
    n_train = {c.name: max(8, round(c.size_k * TRAIN_PER_K * scale)) for c in CLIENTS}
    n_test = max(6, round(TEST_PER_CLIENT * scale))
    total_train = sum(n_train.values())
    n_facts = max(3 * MIN_FACTS, round(total_train * FACTS_PER_TRAIN))
    pool = benchmark_pool()

    # Each client holds one area of knowledge (one relation), over as many diseases as its
    # share of the data, so every fact is asked about about equally often. All options of a
    # question come from one area, hence from one holder: answering needs the association,
    # a preference for names seen in training neither helps nor hurts.
    owned: dict[str, list[Fact]] = {}
    for c, relation in zip(CLIENTS, RELATIONS, strict=True):
        k = min(_DECOY_START, max(MIN_FACTS, round(n_facts * n_train[c.name] / total_train)))
        diseases = rng.sample(pool["disease"], k)
        answers = rng.sample(pool[relation], k)
        owned[c.name] = [Fact(d, relation, a) for d, a in zip(diseases, answers, strict=True)]
    facts = [f for fs in owned.values() for f in fs]
    owner = {f: name for name, fs in owned.items() for f in fs}

    specs: list[ClientSpec] = []
    for c in CLIENTS:
        crng = random.Random(f"prismesh-benchmark-{seed}-{c.name}")
        mine = owned[c.name]
        # Training: cycle through the client's own facts, each asked about equally often.
        order = [mine[i % len(mine)] for i in range(n_train[c.name])]
        crng.shuffle(order)
        train = [
            _mcq(crng, c.fmt, c.language, c.n_options, f.relation, f.disease, f.answer,
                 _answers(facts, f.relation),
                 f"{c.name}/train/{i:05d}/{c.name}")
            for i, f in enumerate(order)
        ]
        # Test: a third about own facts, the rest about the other clients' facts.
        n_own = round(n_test * OWN_TEST_FRACTION)
        others = [f for f in facts if owner[f] != c.name]
        test_facts = [crng.choice(mine) for _ in range(n_own)]
        test_facts += [crng.choice(others) for _ in range(n_test - n_own)]
        crng.shuffle(test_facts)
        test = [
            _mcq(crng, c.fmt, c.language, c.n_options, f.relation, f.disease, f.answer,
                 _answers(facts, f.relation), f"{c.name}/test/{i:05d}/{owner[f]}")
            for i, f in enumerate(test_facts)
        ]
        cdir = out_dir / c.name
        write_jsonl(cdir / "train.jsonl", train)
        write_jsonl(cdir / "test.jsonl", test)
        specs.append(ClientSpec(c.name, cdir / "train.jsonl", cdir / "test.jsonl", c.fmt,
                                c.language, len(train), len(test)))

    manifest = {
        "version": BENCHMARK_VERSION,
        "seed": seed,
        "scale": scale,
        "n_facts": len(facts),
        "facts_per_client": {k: len(v) for k, v in owned.items()},
        "own_test_fraction": OWN_TEST_FRACTION,
        "clients": [s.to_dict() for s in specs],
    }
    tmp = out_dir / ".benchmark.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "benchmark.json")
    return specs


def _answers(facts: list[Fact], relation: str) -> list[str]:
    """Candidate options for a relation: the answers of the benchmark's facts of that kind."""
    return sorted({f.answer for f in facts if f.relation == relation})


def fact_owner(mcq_id: str) -> str | None:
    """The client holding the fact a benchmark question asks about (from its id), if any."""
    parts = mcq_id.split("/")
    return parts[3] if len(parts) == 4 else None


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
    """``n`` questions about *decoy* facts in every client format and language.

    They teach the base model the exam formats and how to retrieve an association whatever
    the language (the multilingual prior the paper credits), without any benchmark fact.
    """
    rng = random.Random(f"prismesh-pretrain-{seed}")
    pool = decoy_pool()
    facts = _facts(rng, pool, DECOY_DISEASES)
    out: list[MCQ] = []
    for i in range(n):
        f = rng.choice(facts)
        c = rng.choice(CLIENTS)
        out.append(_mcq(rng, c.fmt, c.language, c.n_options, f.relation, f.disease, f.answer,
                        _answers(facts, f.relation), f"pretrain/{i:06d}"))
    return out
