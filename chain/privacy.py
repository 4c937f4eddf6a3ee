"""A task's privacy settings and its privacy accountant.

The task spec's ``privacy`` section says who an update is sealed to and which differential
privacy (DP) a task applies; ``train.dp_noise_multiplier`` / ``train.dp_clip`` ask for
sample-level DP in local training (DP-SGD). This module validates the section and turns the
settings into ε at the task's δ with a standard accountant (Rényi DP, or the PRV accountant,
both from Opacus), per round and in total, so the aggregator, the nodes, the audit, the demo
report and the dashboard all read one number from one place.

Two units of privacy, reported separately:

* **client level** (a hospital's whole dataset): each update's change of the model ΔW is
  clipped to Frobenius norm ``clip`` and Gaussian noise of standard deviation
  ``noise_multiplier · clip`` is added, to the sum of the round's clipped updates at the
  aggregator (``where = "aggregator"``: trusted with the updates, which are sealed to it) or to
  each update by its own client (``where = "client"``: nobody is trusted). Every client takes
  part in every round (sampling rate 1), so k rounds compose k Gaussian mechanisms.
* **sample level** (one patient record): DP-SGD in local training with Poisson sampling at rate
  ``batch_size · grad_accum / N`` and ``epochs · N / (batch_size · grad_accum)`` steps a round.
  It depends on each hospital's own N, so each node accounts for itself; client-level DP of a
  hospital's whole dataset implies the same ε for any one of its records.

The accountant needs Opacus (installed with the node and aggregator extras); validation does
not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

DP_WHERE = ("aggregator", "client")
ACCOUNTANTS = ("rdp", "prv")
ON_BUDGET = ("stop", "warn")
AGGREGATE_MODES = ("clear", "members")
PRIVACY_FIELDS = ("recipients", "aggregate", "client_dp", "delta", "epsilon_budget", "on_budget", "accountant")
CLIENT_DP_FIELDS = ("clip", "noise_multiplier", "where")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class PrivacySpecError(ValueError):
    """A privacy setting that is malformed; the message names the field."""


class BudgetExceeded(RuntimeError):
    """Going on would spend more privacy than the task's ε budget allows."""


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP: clip each update's ΔW to ``clip``, Gaussian noise σ·clip, where."""

    clip: float
    noise_multiplier: float
    where: str = "aggregator"

    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier, "where": self.where}


@dataclass(frozen=True)
class PrivacySpec:
    """The validated ``privacy`` section of a task spec (empty: clear updates, no DP)."""

    recipients: tuple[str, ...] = ()
    aggregate: str = "clear"
    client_dp: ClientDP | None = None
    delta: float = 1e-5
    epsilon_budget: float | None = None
    on_budget: str = "stop"
    accountant: str = "rdp"

    @property
    def sealed(self) -> bool:
        """Updates are encrypted to ``recipients`` before they are stored."""
        return bool(self.recipients)

    @property
    def central_dp(self) -> bool:
        return self.client_dp is not None and self.client_dp.where == "aggregator"

    @property
    def local_dp(self) -> bool:
        return self.client_dp is not None and self.client_dp.where == "client"

    @classmethod
    def from_dict(cls, data: Any, where: str = "privacy") -> PrivacySpec:
        if data is None or data == {}:
            return cls()
        if not isinstance(data, dict):
            raise PrivacySpecError(f"field '{where}' must be an object")
        unknown = sorted(set(data) - set(PRIVACY_FIELDS))
        if unknown:
            raise PrivacySpecError(f"{where}: unknown field(s) {unknown}; known: {sorted(PRIVACY_FIELDS)}")
        recipients = data.get("recipients", [])
        if not isinstance(recipients, list) or not all(isinstance(a, str) and _ADDRESS.match(a) for a in recipients):
            raise PrivacySpecError(f"field '{where}.recipients' must be a list of 0x addresses, got {recipients!r}")
        lowered = [a.lower() for a in recipients]
        if len(set(lowered)) != len(lowered):
            raise PrivacySpecError(f"field '{where}.recipients' lists an address twice")
        aggregate = data.get("aggregate", "clear")
        if aggregate not in AGGREGATE_MODES:
            raise PrivacySpecError(f"field '{where}.aggregate' must be one of {AGGREGATE_MODES}, got {aggregate!r}")
        if aggregate == "members" and not recipients:
            raise PrivacySpecError(f"field '{where}.aggregate' = 'members' needs '{where}.recipients' (sealed updates)")
        client_dp = _client_dp(data.get("client_dp"), f"{where}.client_dp")
        if client_dp is not None and client_dp.where == "aggregator" and not recipients:
            raise PrivacySpecError(
                f"field '{where}.client_dp.where' = 'aggregator' protects only the aggregate: the updates would be "
                f"stored in the clear; set '{where}.recipients' (seal updates to the aggregator and auditors) "
                "or add the noise at each client (where = 'client')")
        delta = data.get("delta", 1e-5)
        if not (_num(delta) and 0 < delta < 1):
            raise PrivacySpecError(f"field '{where}.delta' must be a number in (0, 1), got {delta!r}")
        budget = data.get("epsilon_budget")
        if budget is not None and not (_num(budget) and budget > 0):
            raise PrivacySpecError(f"field '{where}.epsilon_budget' must be a number > 0, got {budget!r}")
        on_budget = data.get("on_budget", "stop")
        if on_budget not in ON_BUDGET:
            raise PrivacySpecError(f"field '{where}.on_budget' must be one of {ON_BUDGET}, got {on_budget!r}")
        accountant = data.get("accountant", "rdp")
        if accountant not in ACCOUNTANTS:
            raise PrivacySpecError(f"field '{where}.accountant' must be one of {ACCOUNTANTS}, got {accountant!r}")
        return cls(tuple(recipients), aggregate, client_dp, float(delta),
                   None if budget is None else float(budget), on_budget, accountant)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.recipients:
            out["recipients"] = list(self.recipients)
        if self.aggregate != "clear":
            out["aggregate"] = self.aggregate
        if self.client_dp is not None:
            out["client_dp"] = self.client_dp.to_dict()
        if self.client_dp is not None or self.epsilon_budget is not None or self.delta != 1e-5:
            out["delta"] = self.delta
        if self.epsilon_budget is not None:
            out["epsilon_budget"] = self.epsilon_budget
            out["on_budget"] = self.on_budget
        if self.accountant != "rdp":
            out["accountant"] = self.accountant
        return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _client_dp(data: Any, where: str) -> ClientDP | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise PrivacySpecError(f"field '{where}' must be an object")
    unknown = sorted(set(data) - set(CLIENT_DP_FIELDS))
    if unknown:
        raise PrivacySpecError(f"{where}: unknown field(s) {unknown}; known: {sorted(CLIENT_DP_FIELDS)}")
    clip, sigma, place = data.get("clip"), data.get("noise_multiplier"), data.get("where", "aggregator")
    if not (_num(clip) and clip > 0):
        raise PrivacySpecError(f"field '{where}.clip' must be a number > 0 (a Frobenius norm in ΔW space), got {clip!r}")
    if not (_num(sigma) and sigma > 0):
        raise PrivacySpecError(f"field '{where}.noise_multiplier' must be a number > 0, got {sigma!r}")
    if place not in DP_WHERE:
        raise PrivacySpecError(f"field '{where}.where' must be one of {DP_WHERE}, got {place!r}")
    return ClientDP(float(clip), float(sigma), place)


# ----------------------------------------------------------------------------- accountant


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after ``steps`` compositions of the (Poisson-subsampled) Gaussian mechanism
    with this noise multiplier (noise std / sensitivity) and sampling rate, by Opacus' RDP or PRV
    accountant. Zero steps spend nothing; a zero noise multiplier is no privacy (∞)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        acc = RDPAccountant()
    elif accountant == "prv":
        acc = PRVAccountant()
    else:
        raise ValueError(f"unknown accountant {accountant!r}; known: {ACCOUNTANTS}")
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta), **_orders(accountant)))


def _orders(accountant: str) -> dict[str, Any]:
    """Rényi orders for the RDP accountant: Opacus' defaults (1.1 .. 63) and larger ones, which a
    large noise multiplier over few steps (client-level DP) needs for a tight bound."""
    if accountant != "rdp":
        return {}
    from opacus.accountants import RDPAccountant

    return {"alphas": list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 192, 256, 384, 512, 1024]}


def noise_for_epsilon(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to 0.01 relative) whose ε after ``steps`` is at most
    ``target_epsilon`` (Opacus' calibration)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.005,
                                      **_orders(accountant)))


def dp_sgd_steps(num_samples: int, train: dict[str, Any]) -> tuple[float, int]:
    """(sampling rate, steps) of one round of DP-SGD on ``num_samples`` examples with the task's
    training settings (logical batch = batch_size · grad_accum, Poisson-sampled)."""
    batch = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 4))
    n = max(1, int(num_samples))
    rate = min(1.0, batch / n)
    return rate, int(train.get("epochs", 1)) * math.ceil(n / batch)


def client_epsilon(privacy: PrivacySpec, rounds: int) -> float:
    """Client-level ε after ``rounds`` rounds (0 without client-level DP)."""
    if privacy.client_dp is None:
        return 0.0
    return epsilon(privacy.client_dp.noise_multiplier, 1.0, rounds, privacy.delta, privacy.accountant)


def sample_epsilon(privacy: PrivacySpec, train: dict[str, Any], num_samples: int, rounds: int) -> float | None:
    """Sample-level ε of DP-SGD after ``rounds`` rounds on ``num_samples`` local examples, or
    None when the task does not ask for DP-SGD."""
    sigma = float(train.get("dp_noise_multiplier", 0.0) or 0.0)
    if sigma <= 0:
        return None
    rate, steps = dp_sgd_steps(num_samples, train)
    return epsilon(sigma, rate, steps * rounds, privacy.delta, privacy.accountant)


def privacy_report(privacy: PrivacySpec, train: dict[str, Any], rounds: int,
                   samples: dict[str, int] | None = None) -> dict[str, Any]:
    """What a report or a dashboard shows: the settings, client-level ε per round and in total
    after ``rounds`` rounds, and sample-level ε per hospital (by its sample count)."""
    out: dict[str, Any] = {
        "sealed": privacy.sealed,
        "recipients": list(privacy.recipients),
        "aggregate": privacy.aggregate,
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "epsilon_budget": privacy.epsilon_budget,
        "rounds": rounds,
    }
    if privacy.client_dp is not None:
        out["client_dp"] = privacy.client_dp.to_dict()
        out["client_epsilon_per_round"] = [round(client_epsilon(privacy, k), 6) for k in range(1, rounds + 1)]
        out["client_epsilon"] = out["client_epsilon_per_round"][-1] if rounds else 0.0
    if float(train.get("dp_noise_multiplier", 0.0) or 0.0) > 0:
        out["sample_dp"] = {"noise_multiplier": float(train["dp_noise_multiplier"]),
                            "clip": float(train.get("dp_clip", 1.0))}
        out["sample_epsilon"] = {c: round(sample_epsilon(privacy, train, n, rounds) or 0.0, 6)
                                 for c, n in sorted((samples or {}).items())}
    return out


def check_budget(privacy: PrivacySpec, spent: float, what: str) -> str | None:
    """None when ``spent`` is within the task's budget; otherwise a message, after raising
    ``BudgetExceeded`` when the task says ``on_budget = "stop"``."""
    budget = privacy.epsilon_budget
    if budget is None or spent <= budget:
        return None
    msg = f"{what}: ε = {spent:.4g} at δ = {privacy.delta:g} exceeds the task's budget ε = {budget:g}"
    if privacy.on_budget == "stop":
        raise BudgetExceeded(msg)
    return msg


def plan_budget(privacy: PrivacySpec, num_rounds: int, max_failed_rounds: int) -> float:
    """The client-level ε a task can spend at most: its accepted rounds with noise at the
    aggregator (a failed round releases nothing), every attempt with noise at each client (each
    revealed update is a release). Checked against the budget before the task exists."""
    import logging

    if privacy.client_dp is None:
        return 0.0
    releases = num_rounds if privacy.central_dp else num_rounds + max_failed_rounds
    spent = client_epsilon(privacy, releases)
    warning = check_budget(privacy, spent, f"{releases} release(s) of client-level DP")
    if warning:
        logging.getLogger("prismesh.privacy").warning("%s; creating the task anyway (on_budget = warn)", warning)
    return spent


def describe(privacy: PrivacySpec, train: dict[str, Any], rounds: int) -> str | None:
    """One line for a page or a report: who can read the updates, which DP, and the client-level
    ε spent after ``rounds`` accepted rounds (None for a task with no privacy settings)."""
    parts = []
    if privacy.sealed:
        parts.append(f"updates sealed to {len(privacy.recipients)} recipient(s)"
                     + ("; aggregates sealed to the members" if privacy.aggregate == "members" else ""))
    cdp = privacy.client_dp
    if cdp is not None:
        where = "at the aggregator" if cdp.where == "aggregator" else "at each hospital"
        text = f"client-level DP {where} (clip {cdp.clip:g}, σ {cdp.noise_multiplier:g})"
        try:
            text += f": ε = {client_epsilon(privacy, rounds):.3g} after {rounds} round(s) at δ = {privacy.delta:g}"
        except ImportError:
            text += " (ε needs the accountant: pip install opacus)"
        parts.append(text)
    sigma = float(train.get("dp_noise_multiplier", 0.0) or 0.0)
    if sigma > 0:
        parts.append(f"DP-SGD (σ {sigma:g}, clip {float(train.get('dp_clip', 1.0)):g}; ε per hospital by its data size)")
    if privacy.epsilon_budget is not None:
        parts.append(f"budget ε = {privacy.epsilon_budget:g} ({privacy.on_budget})")
    return "; ".join(parts) or None
