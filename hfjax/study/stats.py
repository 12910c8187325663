"""Per-example scores and a hierarchical bootstrap over training seeds and test examples.

Every metric is a function of per-example count vectors summed over the test set::

    f1 / type_f1   (correct, predicted, gold) tuples -> micro F1   (UIE tasks)
    exact_match    (answer set equals the reference's, 1)          (UIE tasks)
    accuracy       (normalized answer equals the reference, 1)     (classification, free-form)

A row's scores are an array ``(seeds, examples, k)`` per task (one seed for a row that is not
retrained). The interval of a score (or of a difference of two rows) is a **hierarchical
bootstrap**: each replicate draws the seeds with replacement, then, within each drawn seed,
the test examples with replacement; the metric is computed per drawn seed and averaged over
seeds, then over tasks. Differences are **paired by example** (both rows see the same example
draw) and, when both rows ran the same seeds, by seed. So an interval is wide when the seeds
disagree, not only when the test set is small::

    a = {"movie": counts_a}          # (3, 50, 3): 3 seeds, 50 examples, (tp, pred, gold)
    d = bootstrap(a, b, "f1")        # {"diff": +4.1, "lo": -0.7, "hi": +8.8}  (x100)
    verdict(d, "fused", "tuned target")   # "no difference shown: ..."
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hfjax.eval.metrics import exact_match, infer_uie_kind, parse_uie

__all__ = ["METRICS", "bootstrap", "example_counts", "metric_value", "metrics_for", "verdict"]

#: metric -> (label, kind of reduction).
METRICS: dict[str, tuple[str, str]] = {
    "f1": ("micro F1", "f1"),
    "type_f1": ("type-only micro F1", "f1"),
    "exact_match": ("exact match", "ratio"),
    "accuracy": ("accuracy", "ratio"),
}
N_BOOT = 2000


def metrics_for(task_kind: str) -> tuple[str, ...]:
    """The metrics reported for an evaluation's ``task`` (``uie`` or ``classification``)."""
    return ("f1", "type_f1", "exact_match") if task_kind == "uie" else ("accuracy",)


def _read(pred_file: Path) -> list[dict]:
    return [json.loads(line) for line in Path(pred_file).read_text().splitlines()
            if line.strip()]


def example_counts(pred_file: str | Path, metric: str) -> np.ndarray:
    """``(n, k)`` integer counts per example of ``predictions.jsonl`` for ``metric``."""
    rows = _read(Path(pred_file))
    if metric == "accuracy":
        return np.asarray([(exact_match([r["prediction"]], [r["reference"]]) == 1.0, 1)
                           for r in rows], np.int64).reshape(-1, 2)
    kind = infer_uie_kind([r["reference"] for r in rows])
    out = []
    for r in rows:
        pred, gold = parse_uie(r["prediction"], kind), parse_uie(r["reference"], kind)
        if metric == "f1":
            p, g = set(pred), set(gold)
            out.append((len(p & g), len(p), len(g)))
        elif metric == "type_f1":
            pc, gc = Counter(t[0] for t in pred), Counter(t[0] for t in gold)
            out.append((sum((pc & gc).values()), sum(pc.values()), sum(gc.values())))
        elif metric == "exact_match":
            out.append((int(set(pred) == set(gold)), 1))
        else:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return np.asarray(out, np.int64).reshape(-1, 3 if metric.endswith("f1") else 2)


def metric_value(sums: np.ndarray, metric: str) -> np.ndarray:
    """The metric (a fraction) of summed counts ``sums[..., k]``, vectorised over the rest."""
    sums = np.asarray(sums, np.float64)
    if METRICS[metric][1] == "ratio":
        return np.where(sums[..., 1] > 0, sums[..., 0] / np.maximum(sums[..., 1], 1), 0.0)
    tp, n_pred, n_gold = sums[..., 0], sums[..., 1], sums[..., 2]
    p = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
    r = np.where(n_gold > 0, tp / np.maximum(n_gold, 1), 0.0)
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray] | None,
              metric: str | Mapping[str, str], *,
              n_boot: int = N_BOOT, seed: int = 0, pair_seeds: bool = False,
              level: float = 0.95) -> dict[str, float]:
    """Mean over tasks of the score of ``a`` (or of ``a − b``), x100, and its interval.

    Args:
        a, b: task -> counts ``(seeds, examples, k)``; ``b`` None scores ``a`` alone.
            Both must hold the same tasks with the same examples (paired by example).
        metric: one metric for every task, or task -> metric (e.g. F1 for UIE tasks and
            accuracy for the others).
        pair_seeds: draw the same seed indices for both rows (both ran the same seeds).

    Returns:
        ``{"value" or "diff", "lo", "hi", "seeds_a", "seeds_b"}`` (points x 100).
    """
    rng = np.random.default_rng(seed)
    tasks = sorted(a)
    if not tasks:
        raise ValueError("bootstrap: no tasks")
    if b is not None and sorted(b) != tasks:
        raise ValueError(f"bootstrap: tasks differ ({tasks} vs {sorted(b)})")
    sa = a[tasks[0]].shape[0]
    sb = b[tasks[0]].shape[0] if b is not None else sa
    if pair_seeds and sa != sb:
        raise ValueError(f"pair_seeds needs the same number of seeds, got {sa} and {sb}")
    m = max(sa, sb)  # seed draws per replicate
    ia = rng.integers(0, sa, (n_boot, m))
    ib = ia if pair_seeds else rng.integers(0, sb, (n_boot, m))
    point = np.zeros(())
    reps = np.zeros(n_boot)
    for t in tasks:
        mt = metric if isinstance(metric, str) else metric[t]
        ca = np.asarray(a[t])
        n = ca.shape[1]
        if b is not None and np.asarray(b[t]).shape[1] != n:
            raise ValueError(f"bootstrap: task {t}: {n} vs {np.asarray(b[t]).shape[1]} examples")
        idx = rng.integers(0, n, (n_boot, m, n))
        va = metric_value(ca[ia[..., None], idx].sum(2), mt).mean(1)
        pa = metric_value(ca.sum(1), mt).mean()
        if b is None:
            reps += va
            point = point + pa
            continue
        cb = np.asarray(b[t])
        vb = metric_value(cb[ib[..., None], idx].sum(2), mt).mean(1)
        reps += va - vb
        point = point + pa - metric_value(cb.sum(1), mt).mean()
    k = len(tasks)
    q = (1 - level) / 2
    lo, hi = np.quantile(reps / k, [q, 1 - q])
    key = "value" if b is None else "diff"
    return {key: 100 * float(point) / k, "lo": 100 * float(lo), "hi": 100 * float(hi),
            "seeds_a": int(sa), "seeds_b": int(sb)}


def verdict(d: Mapping[str, float], a_label: str, b_label: str) -> str:
    """One sentence: the gain of ``a`` over ``b`` with its interval, or no difference shown."""
    span = f"{d['diff']:+.1f} points, 95% interval [{d['lo']:+.1f}, {d['hi']:+.1f}]"
    if d["lo"] > 0:
        return f"gain: {a_label} beats {b_label} by {span}"
    if d["hi"] < 0:
        return f"loss: {a_label} trails {b_label} by {span}"
    return f"no difference shown between {a_label} and {b_label} ({span}; the interval covers 0)"
