"""Small statistics for experiments over seeds: means with 95% t-intervals, paired differences.

Each seed is one independent replicate (its own benchmark facts, LoRA initialisation and data
order), so a figure's interval is the Student-t interval over its per-seed values, and two
methods run on the same seeds are compared through their per-seed differences (paired).
No SciPy here: the two-sided 97.5% t quantiles are tabulated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% critical values of Student's t (the 0.975 quantile) for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_critical(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    # Beyond 30: the Cornish-Fisher expansion around the normal quantile (error < 1e-3).
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation and 95% t-interval of ``values`` (one per seed).

    With a single value the interval is undefined (``None``), never a zero-width pretence.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci() needs at least one value")
    if any(not math.isfinite(x) for x in xs):
        raise ValueError(f"non-finite value in {xs}")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "sd": None, "lo": None, "hi": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": n}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """Method ``a`` minus method ``b`` on the same seeds: mean difference with its 95% interval,
    and on how many seeds ``a`` was higher, equal, lower."""
    if len(a) != len(b):
        raise ValueError(f"paired() needs values for the same seeds, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    out = mean_ci(diffs)
    out["wins"] = sum(d > 0 for d in diffs)
    out["ties"] = sum(d == 0 for d in diffs)
    out["losses"] = sum(d < 0 for d in diffs)
    return out


def proportion_ci(correct: int, n: int) -> dict[str, float]:
    """Wilson 95% interval of a proportion (one test set of one seed)."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct}/{n}")
    z = 1.959964
    p = correct / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return {"p": p, "lo": centre - half, "hi": centre + half, "n": n}


def fmt_ci(summary: dict, scale: float = 100.0, digits: int = 1) -> str:
    """``mean [lo, hi]`` in percent (by default); just the mean when the interval is undefined."""
    m = summary["mean"] * scale
    if summary.get("lo") is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{summary['lo'] * scale:.{digits}f}, {summary['hi'] * scale:.{digits}f}]"
