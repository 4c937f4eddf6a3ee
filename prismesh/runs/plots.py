"""The demo's figures: accuracy per client per round, and a PCA of the client updates per round
(paper Fig. 3: how far apart the hospitals' updates are, and how aggregation pulls them together)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Per-client accuracy after each round, with the base and single-client levels dashed."""
    plt = _pyplot()
    names = [c["name"] for c in report["clients"]]
    rounds = [r["round"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base = report.get("baselines", {})
    for i, name in enumerate(names):
        c = colors[i % len(colors)]
        ys = [r["accuracy"].get(name) for r in report["rounds"]]
        ax.plot(rounds, ys, marker="o", color=c, label=f"{name} (federated)")
        if "single" in base:
            ax.axhline(base["single"][name], color=c, linestyle="--", linewidth=1, alpha=0.7)
        if "base" in base:
            ax.axhline(base["base"][name], color=c, linestyle=":", linewidth=1, alpha=0.6)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on the client's own test set")
    ax.set_xticks(rounds)
    ax.set_ylim(0, 1)
    ax.set_title("Per-client accuracy (dashed: single-client LoRA, dotted: base model)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def update_vectors(fed: Any, task_id: int) -> list[tuple[int, str, np.ndarray]]:
    """(round, client name, flattened update = client adapter − round's global adapter)."""
    from prismesh.aggregator.adapters import load_adapter
    from prismesh.chain.sealing import fetch_any_adapter

    key = fed.auditor[1] if getattr(fed, "auditor", None) else None  # sealed tasks: the auditor reads
    coord = fed.coordinator()
    start = fed.manifest.deploy_block
    by_addr = {h.daemon.address: h.name for h in fed.hospitals}
    opened = {ev.round: ev.global_adapter_cid for ev in coord.get_events("RoundOpened", start, taskId=task_id)}
    tmp = fed.root / "report-tmp"
    out = []
    cache: dict[str, Any] = {}

    def tensors(cid: str) -> dict[str, np.ndarray]:
        if cid not in cache:
            cache[cid] = load_adapter(fetch_any_adapter(fed.store, cid, tmp / cid, key)).tensors
        return cache[cid]

    for ev in coord.get_events("UpdateRevealed", start, taskId=task_id):
        client = tensors(ev.cid)
        glob = tensors(opened[ev.round]) if opened.get(ev.round) else None
        keys = sorted(client)
        vec = np.concatenate([
            (np.asarray(client[k], dtype=np.float64) - (np.asarray(glob[k], dtype=np.float64) if glob else 0.0)).ravel()
            for k in keys
        ])
        out.append((ev.round, by_addr.get(ev.client, ev.client), vec))
    return out


def plot_update_pca(fed: Any, task_id: int, path: Path) -> Path:
    """One panel per round: the clients' updates projected on the first two principal axes."""
    plt = _pyplot()
    items = update_vectors(fed, task_id)
    rounds = sorted({r for r, _, _ in items})
    # Client order (and so colour) as in plot_accuracy: the federation's hospital order.
    names = [h.name for h in fed.hospitals]
    names += sorted({n for _, n, _ in items} - set(names))
    fig, axes = plt.subplots(1, max(1, len(rounds)), figsize=(4 * max(1, len(rounds)), 3.8), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, r in zip(axes[0], rounds, strict=False):
        vecs = [(n, v) for rr, n, v in items if rr == r]
        x = np.stack([v for _, v in vecs])
        x = x - x.mean(axis=0, keepdims=True)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        pts = u[:, :2] * s[:2] if x.shape[0] > 1 else np.zeros((1, 2))
        if pts.shape[1] < 2:
            pts = np.pad(pts, ((0, 0), (0, 2 - pts.shape[1])))
        for (n, _), p in zip(vecs, pts, strict=True):
            ax.scatter(p[0], p[1], s=80, color=colors[names.index(n) % len(colors)], label=n)
        ax.scatter(0, 0, marker="*", s=160, color="black", label="mean update (origin)")
        ax.set_title(f"round {r}: client updates (PCA)")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_experiment_curves(summary: dict[str, Any], path: Path, metric: str = "h_mean") -> Path:
    """The experiment's curves: ``metric`` after each round, mean over seeds with its 95% band,
    for the pooled upper bound, the single-client LoRAs and every federated strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label, row in summary["models"].items():
        curve = row.get("curve") or []
        if not curve or label.startswith("personal:"):  # its points are local epochs, not rounds
            continue
        xs = list(range(1, len(curve) + 1))
        mean = [p[metric]["mean"] for p in curve]
        style = {"linestyle": "--", "linewidth": 1} if label.startswith("single:") else {"linewidth": 2 if label == summary.get("headline") else 1.3}
        if label == "pooled":
            style = {"color": "black", "linewidth": 2}
        line = ax.plot(xs, mean, marker="o", markersize=3, label=label.replace("fed:", "federated: ").replace("single:", "single: "), **style)[0]
        lo = [p[metric]["lo"] for p in curve]
        hi = [p[metric]["hi"] for p in curve]
        if all(v is not None for v in lo + hi):
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("round (one local epoch each)")
    ax.set_ylabel({"h_mean": "H-mean", "min_acc": "Min-Acc", "macro_acc": "Macro-Acc"}[metric])
    ax.set_ylim(0, 1)
    ax.set_title(f"{ax.get_ylabel()} over rounds (mean over seeds, 95% band)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_new_site(summary: dict[str, Any], path: Path) -> Path:
    """New-site accuracy against its number of examples, from the global adapter and from base."""
    plt = _pyplot()
    sizes = sorted(summary["new_site"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, name in (("from_global", "from the global adapter"), ("from_base", "from the base model")):
        pts = [(int(k), summary["new_site"][k].get(key)) for k in sizes if summary["new_site"][k].get(key)]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        line = ax.plot(xs, [p["mean"] for _, p in pts], marker="o", label=name)[0]
        if all(p["lo"] is not None for _, p in pts):
            ax.fill_between(xs, [p["lo"] for _, p in pts], [p["hi"] for _, p in pts], color=line.get_color(), alpha=0.15)
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xticks([int(k) for k in sizes])
    ax.set_xticklabels(sizes)
    ax.set_xlabel("the new site's training examples")
    ax.set_ylabel("accuracy on its test set")
    ax.set_ylim(0, 1)
    ax.set_title("New-site adaptation (mean over seeds, 95% band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
