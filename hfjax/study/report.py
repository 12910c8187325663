"""The study's outputs: ``study.md`` (tables and verdicts), ``study.json`` (every figure and
prediction file), two PNGs per metric, and the dry run's listing of runs and their cost.

Every figure is read back from the finished units' prediction files, so the report can be
rebuilt from the study folder. Intervals are `hfjax.study.stats.bootstrap`'s hierarchical
bootstrap (seeds, then test examples within each seed).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfjax.study.plan import Row, Unit
from hfjax.study.stats import METRICS, N_BOOT, bootstrap, example_counts, metrics_for, verdict

__all__ = ["COMPARISONS", "METHOD", "dry_run_listing", "write_report"]

#: The comparisons that matter: (row a, row b, the question); "best_merge" is the merge or
#: projection row with the best average headline score.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("fused", "noise_sources", "did the content of the sources help (vs noise sources)?"),
    ("fused", "mismatch_sources", "does each source's own content matter (vs mismatched)?"),
    ("fused", "zero_sources", "do the sources help at all (vs zero sources)?"),
    ("fused", "tuned_target", "is it just more data (vs the target tuned on the same replay)?"),
    ("fused", "best_merge", "does fusion beat the best homogeneous merge?"),
    ("fused", "target", "does fusion improve on the target LoRA?"),
)

METHOD = (
    f"Intervals are 95% hierarchical-bootstrap intervals ({N_BOOT} replicates): each replicate "
    "draws the training seeds with replacement, then the test examples with replacement within "
    "each drawn seed, computes the metric per seed and averages over seeds (then over tasks). "
    "A difference uses the same example draw for both rows (paired by example) and, when both "
    "rows ran the same seeds, the same seed draw. Rows that are not retrained (base, target, "
    "non-random merges) have one run, so only examples vary for them. A verdict says \"no "
    "difference shown\" when the interval covers 0. The headline score is micro F1 for UIE "
    "tasks and accuracy (exact match of the answer) for the others. The tuned target starts "
    "from the target LoRA and trains it on the fused run's replay files with the fuse "
    "config's optimizer settings (lr, warmup, weight decay, batch, accumulation, epochs, step "
    "cap), so it makes the same number of updates; merges weight every adapter equally.")


# ----------------------------------------------------------------------------- dry run
def dry_run_listing(st: Any, plan: Sequence[Unit], skipped: Mapping[str, str]) -> dict[str, Any]:
    """Every run of the plan with its cost: optimizer updates, training tokens (the replay's
    tokens times the epochs run), generated tokens (at most), and seconds where a rate is
    known (from finished runs of this study folder)."""
    from hfjax.config import resolve_template
    from hfjax.loading import load_tokenizer
    from hfjax.models.config import ModelConfig
    from hfjax.training.data import ReplaySet, load_alpaca, num_batches
    from hfjax.training.optim import total_steps

    cfg = st.cfg
    model_cfg = ModelConfig.from_hf(cfg.target.model_path,
                                    source=str(Path(cfg.target.model_path) / "config.json"))
    tok = load_tokenizer(cfg.target.model_path)
    replay = ReplaySet.load(list(cfg.data.datasets), cfg.data.data_root, tok,
                            resolve_template(cfg.target.template, model_cfg.model_type),
                            cfg.data.cutoff_len,
                            roles=tuple(cfg.data.get("roles", ())), seed=cfg.seed)
    tr = cfg.train
    n_b = num_batches(len(replay), tr.batch_size)
    steps = total_steps(n_b, tr.epochs, tr.grad_accum, tr.max_steps)
    full = total_steps(n_b, tr.epochs, tr.grad_accum)
    train_tokens = int(replay.totals["tokens"] * tr.epochs * min(1.0, steps / full))
    n_eval = 0
    for file in st.eval_data.values():
        n = len(load_alpaca(file))
        n_eval += min(n, st.opts.limit) if st.opts.limit else n
    gen_tokens = n_eval * st.opts.max_new_tokens
    rates = []
    for unit_file in (st.out / "runs").glob("*/*/unit.json"):
        rate = json.loads(unit_file.read_text()).get("train", {}).get("tokens_per_second")
        if rate:
            rates.append(float(rate))
    rate = float(np.median(rates)) if rates else None
    items, lines = [], [f"study plan: {len(plan)} runs ({len(skipped)} rows skipped)",
                        f"{'run':<28} {'kind':<8} {'updates':>8} {'train tok':>10} "
                        f"{'gen tok<=':>10} {'est. s':>8}  state"]
    for u in plan:
        trains = u.row.kind in ("fuse", "tune")
        item = {"run": u.key, "row": u.row.name, "seed": u.seed, "kind": u.row.kind,
                "updates": steps if trains else 0, "train_tokens": train_tokens if trains else 0,
                "eval_tokens": gen_tokens,
                "seconds": round(train_tokens / rate, 1) if trains and rate else None,
                "done": (st.out / "runs" / u.key / "unit.json").exists()}
        items.append(item)
        secs = "?" if item["seconds"] is None and trains else (item["seconds"] or 0)
        lines.append(f"{u.key:<28} {u.row.kind:<8} {item['updates']:>8} "
                     f"{item['train_tokens']:>10} {gen_tokens:>10} {secs!s:>8}  "
                     f"{'done' if item['done'] else 'to run'}")
    total = sum(i["updates"] for i in items)
    lines.append(f"total: {total} optimizer updates, "
                 f"{sum(i['train_tokens'] for i in items)} training tokens, "
                 f"{sum(i['eval_tokens'] for i in items)} generated tokens at most"
                 + ("" if rate else "; seconds unknown (no finished training run to time)"))
    for name, why in skipped.items():
        lines.append(f"skipped {name}: {why}")
    return {"plan": items, "skipped": dict(skipped), "text": "\n".join(lines)}


# ----------------------------------------------------------------------------- figures
def _counts(root: Path, records: Sequence[dict], task: str, metric: str) -> np.ndarray:
    return np.stack([example_counts(root / r["eval"][task]["predictions"], metric)
                     for r in records])


def _cell(d: Mapping[str, float] | None) -> str:
    if d is None:
        return "–"
    return f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"


def write_report(st: Any, chosen: Sequence[Row], done: Mapping[str, dict],
                 skipped: Mapping[str, str]) -> dict[str, Any]:
    """Score every row, compare, and write study.md / study.json / PNGs; returns the JSON."""
    tasks = list(st.eval_data)
    by_row: dict[str, list[dict]] = {}
    for rec in done.values():
        by_row.setdefault(rec["row"], []).append(rec)
    for recs in by_row.values():
        recs.sort(key=lambda r: -1 if r["seed"] is None else r["seed"])
    first = next(iter(done.values()))
    kind = {t: first["eval"][t]["task"] for t in tasks}
    metrics = [m for m in METRICS if any(m in metrics_for(kind[t]) for t in tasks)]
    headline = {t: "f1" if kind[t] == "uie" else "accuracy" for t in tasks}
    labels = {r.name: r.label for r in chosen}

    counts: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # row -> metric -> task -> arr
    scores: dict[str, dict[str, Any]] = {}
    for row, recs in by_row.items():
        counts[row] = {m: {t: _counts(st.out, recs, t, m) for t in tasks
                           if m in metrics_for(kind[t])} for m in metrics}
        counts[row]["headline"] = {t: _counts(st.out, recs, t, headline[t]) for t in tasks}
        sc: dict[str, Any] = {}
        for m in [*metrics, "headline"]:
            cm = counts[row][m]
            mt = headline if m == "headline" else m
            sc[m] = {t: bootstrap({t: c}, None, mt) for t, c in cm.items()}
            if cm:
                sc[m]["avg"] = bootstrap(cm, None, mt)
        per_seed = {str(r["seed"]): {t: float(100 * _point(counts[row]["headline"][t][i],
                                                           headline[t])) for t in tasks}
                    for i, r in enumerate(recs)}
        scores[row] = {"label": labels.get(row, row), "seeds": [r["seed"] for r in recs],
                       "scores": sc, "per_seed_headline": per_seed,
                       "predictions": {str(r["seed"]): {t: r["eval"][t]["predictions"]
                                                        for t in tasks} for r in recs},
                       "adapters": {str(r["seed"]): r["adapter"] for r in recs},
                       "train": {str(r["seed"]): r["train"] for r in recs}}

    merges = [r for r in by_row if r.startswith(("merge_", "project_"))]
    best = max(merges, key=lambda r: scores[r]["scores"]["headline"]["avg"]["value"],
               default=None)
    comparisons = []
    for a, b, question in COMPARISONS:
        b_row = best if b == "best_merge" else b
        if a not in by_row or b_row is None or b_row not in by_row:
            continue
        pair = scores[a]["seeds"] == scores[b_row]["seeds"]
        avg = bootstrap(counts[a]["headline"], counts[b_row]["headline"], headline,
                        pair_seeds=pair)
        per_task = {t: bootstrap({t: counts[a]["headline"][t]}, {t: counts[b_row]["headline"][t]},
                                 headline[t], pair_seeds=pair) for t in tasks}
        comparisons.append({"a": a, "b": b_row, "question": question, "avg": avg,
                            "per_task": per_task, "paired_seeds": pair,
                            "verdict": verdict(avg, labels.get(a, a), labels.get(b_row, b_row)),
                            "best_of": merges if b == "best_merge" else None})

    st.out.mkdir(parents=True, exist_ok=True)
    plots = _plots(st.out, scores, metrics, tasks)
    summary = {"tasks": {t: {"file": st.eval_data[t], "kind": kind[t], "headline": headline[t]}
                         for t in tasks},
               "metrics": metrics, "rows": scores, "skipped": dict(skipped),
               "comparisons": comparisons, "method": METHOD, "plots": plots,
               "settings": {"merge_weight": st.merge_weight, "density": st.density,
                            "same_base_sources": list(st.homogeneous),
                            "eval": dataclasses.asdict(st.opts)},
               "runs": {k: {"row": r["row"], "seed": r["seed"],
                            "resumed": bool(r.get("resumed")), "seconds": r["seconds"]}
                        for k, r in done.items()}}
    (st.out / "study.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (st.out / "study.md").write_text(_markdown(summary, tasks))
    return summary


def _point(c: np.ndarray, metric: str) -> float:
    from hfjax.study.stats import metric_value

    return float(metric_value(c.sum(0), metric))


def _markdown(s: Mapping[str, Any], tasks: Sequence[str]) -> str:
    out = ["# Study: fused vs controls vs baselines", "",
           "Each cell: score x100 (mean over seeds) [95% interval]; seeds = training seeds "
           "the row ran.", ""]
    for m in s["metrics"]:
        cols = [t for t in tasks if m in metrics_for(s["tasks"][t]["kind"])]
        out += [f"## {METRICS[m][0]}", "",
                "| row | seeds | " + " | ".join(cols) + " | avg |",
                "|---|---:|" + "---:|" * (len(cols) + 1)]
        for r in s["rows"].values():
            sc = r["scores"][m]
            cells = [_cell(sc.get(t)) for t in cols] + [_cell(sc.get("avg"))]
            n_seeds = len([x for x in r["seeds"] if x is not None]) or "1 (fixed)"
            out.append(f"| {r['label']} | {n_seeds} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Verdicts", "", "Headline score: " + ", ".join(
        f"{t}: {s['tasks'][t]['headline']}" for t in tasks) + "; gains are points x100, "
        "averaged over tasks.", ""]
    if not s["comparisons"]:
        out.append("- no comparison could be made (a row of each pair is missing)")
    for c in s["comparisons"]:
        per = "; ".join(f"{t} {d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
                        for t, d in c["per_task"].items())
        extra = (f" (best of {', '.join(c['best_of'])}, chosen on these test scores, which "
                 "favours the merge)" if c["best_of"] else "")
        out.append(f"- **{c['question']}** {c['verdict']}{extra}. Per task: {per}.")
    probes = {seed: t["probe"] for seed, t in s["rows"].get("fused", {}).get("train", {}).items()
              if t.get("probe")}
    if probes:
        from hfjax.fusion.probe import probe_markdown

        out += ["", "## Does the fused network read its sources? (probe)", "",
                "Per perturbation of the source side of the trained network's contexts (target "
                "tokens untouched): the relative change of ΔB, ||ΔB' − ΔB||_F / ||ΔB||_F, per "
                "module group and over all fused modules, and the fused adapter's test NLL "
                "(mean over every test answer token). ~0 everywhere means the network ignores "
                "its sources.", ""]
        for seed, rows in probes.items():
            out += [f"Seed {seed}:", "", probe_markdown(rows), ""]
    if s["skipped"]:
        out += ["", "## Rows not run", ""]
        out += [f"- `{k}`: {v}" for k, v in s["skipped"].items()]
    out += ["", "## Method", "", s["method"], ""]
    if s["plots"]:
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in s["plots"]]
    else:
        out.append("Plots skipped: matplotlib is not installed.")
    out += ["", "Every prediction file is listed in study.json (rows.<row>.predictions; paths "
            "inside the study folder are relative to it).", ""]
    return "\n".join(out)


def _plots(out: Path, scores: Mapping[str, Any], metrics: Sequence[str],
           tasks: Sequence[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    rows = list(scores)
    for m in metrics:
        cols = [c for c in [*tasks, "avg"] if c in next(iter(scores.values()))["scores"][m]]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cols) * max(1, len(rows)) / 3), 4))
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            sc = scores[row]["scores"][m]
            vals = [sc[c]["value"] for c in cols]
            err = [[sc[c]["value"] - sc[c]["lo"] for c in cols],
                   [sc[c]["hi"] - sc[c]["value"] for c in cols]]
            ax.bar(np.arange(len(cols)) + i * width, vals, width, yerr=err, capsize=2,
                   label=scores[row]["label"])
        ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols)
        ax.set_ylabel(f"{METRICS[m][0]} x100")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
        fig.tight_layout()
        p = out / f"study_{m}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    for i, row in enumerate(rows):
        vals = [float(np.mean(list(v.values()))) for v in
                scores[row]["per_seed_headline"].values()]
        ax.plot([i] * len(vals), vals, "o", alpha=0.7)
    ax.set_xticks(range(len(rows)), rows, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("headline score x100 (task mean), one dot per seed")
    fig.tight_layout()
    p = out / "study_seeds.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths
