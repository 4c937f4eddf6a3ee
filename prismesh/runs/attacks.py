"""The attack harness: malicious hospitals, for measuring and testing robust aggregation.

Each behaviour is what a hospital that joined the federation can actually do: choose its
training data, rewrite the adapter it publishes (within the task's format: same rank, same
modules, values that pass every per-update check) and claim any sample count. The attacker is
strong: it knows the task (its questions come from the honest hospitals' own distribution), the
round's global adapter, the task's norm bound and the number of clients.

The same behaviours run in the in-process loops (:func:`craft` on a trained adapter, used by
``prismesh experiment --attack KIND --malicious N`` and the robustness benchmark) and through
the real daemons (:class:`MaliciousNode`, a node daemon whose training step is replaced, used by
``Federation.add_hospital(..., attack=...)``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from prismesh.aggregator.adapters import LORA_A_SUFFIX, LORA_B_SUFFIX, Adapter
from prismesh.aggregator.lowrank import lowrank_svd, single_threaded_blas
from prismesh.aggregator.updates import module_update_norms
from prismesh.node.daemon import NodeDaemon

# kind -> what the malicious hospital publishes
ATTACKS: dict[str, str] = {
    "sign-flip": "its own trained update negated and scaled up, every module just under the task's norm bound",
    "noise": "Gaussian noise on the global adapter's B factors, every module just under the norm bound",
    "wrong-answers": "an adapter honestly trained on questions whose answers were changed to wrong options",
    "boosted-replacement": "the wrong-answer update boosted by the number of clients (model replacement), under the norm bound",
    "inflated-count": "the boosted wrong-answer update, claiming 2^64 - 1 training samples",
    "free-rider": "the global adapter returned without training, perturbed by 0.1 % so it is not byte-identical",
    "collude": "two hospitals publishing the same negated update at its natural size (they back each other up)",
}
POISONED = ("wrong-answers", "boosted-replacement", "inflated-count")  # trained on wrong answers
MAX_SAMPLES = 2**64 - 1  # the largest count the coordinator accepts (uint64)
BOUND_MARGIN = 0.99  # crafted modules sit this fraction under the norm bound


@dataclass(frozen=True)
class Attack:
    """One malicious behaviour. ``norm_bound`` is the task's per-module bound on an update (the
    attacker reads it from the task spec); ``boost`` is the replacement factor (default: the
    number of clients in the round); ``seed`` seeds the attacker's data and noise."""

    kind: str
    norm_bound: float = 1.0e4
    boost: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; known: {', '.join(ATTACKS)}")
        if not (self.norm_bound > 0 and np.isfinite(self.norm_bound)):
            raise ValueError(f"norm_bound must be a positive number, got {self.norm_bound!r}")

    @property
    def clients(self) -> int:
        """How many hospitals one instance of the attack takes (a colluding pair takes two)."""
        return 2 if self.kind == "collude" else 1

    @property
    def poisoned(self) -> bool:
        """Whether the attacker trains on wrong answers rather than on correct ones."""
        return self.kind in POISONED


def attacker_data(
    train: dict[str, list[Any]], attack: Attack, size: int | None = None, fmt: str | None = None
) -> list[Any]:
    """The attacker's training questions: a seeded sample of the honest hospitals' questions
    (``size`` of them, by default the median honest set size; only questions in format ``fmt``
    when given, since a node's data file holds one format), with every answer moved to another
    option when the attack is a poisoning one."""
    pool = [m for name in sorted(train) for m in train[name] if fmt is None or m.fmt == fmt]
    if not pool:
        raise ValueError("no honest training questions to draw the attacker's data from")
    sizes = sorted(len(v) for v in train.values())
    n = min(len(pool), size if size is not None else sizes[len(sizes) // 2])
    rng = random.Random(f"attacker-data/{attack.seed}")  # the same questions for every kind
    chosen = rng.sample(pool, n)
    if not attack.poisoned:
        return chosen
    return [replace(m, answer=rng.choice(sorted(k for k in m.options if k != m.answer))) for m in chosen]


def _data_key(attack: Attack) -> tuple[bool, int]:
    """Attackers with the same data train the same adapter: clean kinds share one, poisoned one."""
    return attack.poisoned, attack.seed


def craft(
    attack: Attack, trained: Adapter, global_adapter: Adapter | None, num_samples: int, n_clients: int
) -> tuple[Adapter, int]:
    """The adapter and sample count the attacker publishes, from the adapter it ``trained`` this
    round (on :func:`attacker_data`) and the round's ``global_adapter``. Deterministic."""
    trained = trained.as_numpy()
    base = global_adapter.as_numpy() if global_adapter is not None and global_adapter.tensors else None
    kind = attack.kind
    if kind == "wrong-answers":
        return trained, num_samples
    if kind == "noise":
        return _noise(trained, base, attack), num_samples
    if kind == "free-rider":
        return _free_ride(trained, base, attack), num_samples
    if kind in ("sign-flip", "collude"):
        to_bound = kind == "sign-flip"
        return _scaled(trained, base, -1.0, attack.norm_bound if to_bound else None), num_samples
    boost = float(attack.boost if attack.boost is not None else n_clients)
    out = _scaled(trained, base, boost, attack.norm_bound, cap=True)
    return out, (MAX_SAMPLES if kind == "inflated-count" else num_samples)


def _factors(adapter: Adapter, m: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(adapter.tensors[m + LORA_B_SUFFIX], np.float64),
        np.asarray(adapter.tensors[m + LORA_A_SUFFIX], np.float64),
    )


def _module_adapter(like: Adapter, tensors: dict[str, np.ndarray]) -> Adapter:
    return Adapter(dict(like.config), {k: tensors.get(k, v) for k, v in like.tensors.items()})


def _scaled(
    trained: Adapter, base: Adapter | None, factor: float, bound: float | None, cap: bool = False
) -> Adapter:
    """Per module, the rank-r adapter closest to G + λ·Δ (Δ = trained − G): λ = ``factor`` when
    ``bound`` is None; otherwise λ = ``factor`` scaled so the module's update sits just under
    ``bound`` (``cap``: never above ``factor``). Rank r is all the format allows, so G + λΔ (rank
    up to 2r) is truncated and λ refined until the truncated update meets the bound."""
    sizes = module_update_norms(trained, base)
    tensors: dict[str, np.ndarray] = {}
    with single_threaded_blas():
        for m in trained.lora_modules():
            b, a = _factors(trained, m)
            s = trained.scaling(m)
            gb, ga = _factors(base, m) if base is not None else (np.zeros_like(b), a)
            target = None if bound is None else BOUND_MARGIN * bound
            lam = factor
            if target is not None and sizes[m] > 0:
                lam = np.sign(factor) * target / sizes[m]
                if cap:
                    lam = np.sign(factor) * min(abs(factor), abs(lam))
            for _ in range(6):
                b_cat = np.concatenate([(1.0 - lam) * s * gb, lam * s * b], axis=1)
                a_cat = np.concatenate([ga, a], axis=0)
                u, sv, v = lowrank_svd(b_cat, a_cat, b.shape[1])
                k = u.shape[1]
                root = np.sqrt(sv[:k] / s)
                nb = np.pad(u * root, ((0, 0), (0, b.shape[1] - k)))
                na = np.pad(root[:, None] * v.T, ((0, a.shape[0] - k), (0, 0)))
                probe = Adapter(dict(trained.config), {m + LORA_B_SUFFIX: nb, m + LORA_A_SUFFIX: na})
                ref = None if base is None else Adapter(
                    dict(base.config), {m + LORA_B_SUFFIX: gb, m + LORA_A_SUFFIX: ga}
                )
                got = module_update_norms(probe, ref)[m]
                if target is None or got <= bound * (1 - 1e-6) or got == 0:
                    break
                lam *= target / got
            tensors[m + LORA_B_SUFFIX] = nb.astype(trained.tensors[m + LORA_B_SUFFIX].dtype)
            tensors[m + LORA_A_SUFFIX] = na.astype(trained.tensors[m + LORA_A_SUFFIX].dtype)
    return _module_adapter(trained, tensors)


def _noise(trained: Adapter, base: Adapter | None, attack: Attack) -> Adapter:
    """G with Gaussian noise on B (A kept), each module's update just under the norm bound; the
    update s·ξ·A is linear in the noise, so the bound is met exactly."""
    rng = np.random.default_rng([attack.seed, 7])
    tensors: dict[str, np.ndarray] = {}
    for m in trained.lora_modules():
        b, a = _factors(trained, m)
        gb, ga = _factors(base, m) if base is not None else (np.zeros_like(b), a)
        xi = rng.standard_normal(b.shape)
        size = trained.scaling(m) * float(np.linalg.norm(xi @ ga))
        t = BOUND_MARGIN * attack.norm_bound / size if size > 0 else 0.0
        tensors[m + LORA_B_SUFFIX] = (gb + t * xi).astype(trained.tensors[m + LORA_B_SUFFIX].dtype)
        tensors[m + LORA_A_SUFFIX] = ga.astype(trained.tensors[m + LORA_A_SUFFIX].dtype)
    return _module_adapter(trained, tensors)


def _free_ride(trained: Adapter, base: Adapter | None, attack: Attack) -> Adapter:
    """The global adapter again, each module's update 0.1 % of the global's own ΔW (so in round 1,
    from an untrained adapter, exactly the global)."""
    if base is None:
        zero = {m + LORA_B_SUFFIX: np.zeros_like(trained.tensors[m + LORA_B_SUFFIX]) for m in trained.lora_modules()}
        return _module_adapter(trained, zero)
    rng = np.random.default_rng([attack.seed, 11])
    sizes = module_update_norms(base, None)
    tensors: dict[str, np.ndarray] = {}
    for m in trained.lora_modules():
        gb, ga = _factors(base, m)
        xi = rng.standard_normal(gb.shape)
        size = trained.scaling(m) * float(np.linalg.norm(xi @ ga))
        t = 1e-3 * sizes[m] / size if size > 0 else 0.0
        tensors[m + LORA_B_SUFFIX] = (gb + t * xi).astype(trained.tensors[m + LORA_B_SUFFIX].dtype)
        tensors[m + LORA_A_SUFFIX] = ga.astype(trained.tensors[m + LORA_A_SUFFIX].dtype)
    return _module_adapter(trained, tensors)


class MaliciousNode(NodeDaemon):
    """A node daemon that trains on the attacker's data file (its configured ``train_data``) and
    publishes :func:`craft`'s adapter; commit, reveal and everything else is the honest node's."""

    def __init__(self, *args: Any, attack: Attack, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack

    def train_round(self, task: int, rnd: int, spec: Any, init: Path | None, out: Path) -> Any:
        from prismesh.aggregator.adapters import load_adapter, save_adapter
        from prismesh.node.trainer import TrainResult

        honest = super().train_round(task, rnd, spec, init, out.with_name(out.name + "-trained"))
        glob = load_adapter(init) if init is not None else None
        n_clients = int(self.coordinator.get_task(task).participant_count)
        attack = replace(self.attack, norm_bound=float(spec.norm_bound))
        adapter, count = craft(attack, load_adapter(honest.adapter_dir), glob, int(honest.num_samples), n_clients)
        save_adapter(adapter, out)
        return TrainResult(out, count, {"attack": attack.kind})


Trainer = Callable[[str, list, "Path | None"], tuple[Path, int]]


def malicious_updates(
    attack: Attack, malicious: int, train: dict[str, list], glob_dir: Path | None, n_honest: int, trainer: Trainer,
    data: dict[tuple[bool, int], list] | None = None,
) -> list[Any]:
    """The ``malicious`` attackers' updates for a round starting from ``glob_dir`` (ids
    ``malicious-1``, ...). ``trainer(label, examples, init_dir) -> (adapter_dir, num_samples)``
    trains an attacker on its data; a colluding group shares one attacker, independent attackers
    each draw their own data (seed + j). ``data`` caches the drawn sets across rounds."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.aggregator.strategies import ClientUpdate

    data = {} if data is None else data
    glob = load_adapter(glob_dir) if glob_dir is not None else None
    out = []
    for j in range(malicious):
        me = attack if attack.kind == "collude" else replace(attack, seed=attack.seed + j)
        key = _data_key(me)
        if key not in data:
            data[key] = attacker_data(train, me)
        label = f"attacker-{'poisoned' if me.poisoned else 'clean'}-{me.seed}"
        path, n = trainer(label, data[key], glob_dir)
        adapter, count = craft(me, load_adapter(path), glob, n, n_honest + malicious)
        out.append(ClientUpdate(f"malicious-{j + 1}", count, adapter))
    return out


def checked(
    updates: list[Any], expected: dict[str, Any], lora: dict[str, Any], norm_bound: float | None, glob_dir: Path | None
) -> tuple[list[Any], dict[str, str]]:
    """The updates that pass the aggregator daemon's per-update checks against the round's global
    adapter, and the reasons the others fail (what ``fetch_and_verify`` does, without the fetch)."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.aggregator.verify import verify_adapter

    glob = load_adapter(glob_dir) if glob_dir is not None else None
    kept, rejected = [], {}
    for u in updates:
        reasons = verify_adapter(u.adapter, expected, lora, norm_bound, glob)
        if reasons:
            rejected[u.client] = "; ".join(reasons)
        else:
            kept.append(u)
    return kept, rejected


def task_checks(base_model: Path, config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The expected adapter shapes and the LoRA config a task spec would give for ``config`` (a
    ``TrainConfig``) on ``base_model``: what the in-process loops verify updates against."""
    import json

    from prismesh.aggregator.verify import expected_lora_shapes

    lora = {"r": config.rank, "lora_alpha": config.alpha, "target_modules": list(config.target_modules)}
    model_config = json.loads((Path(base_model) / "config.json").read_text())
    return expected_lora_shapes(model_config, lora), lora
