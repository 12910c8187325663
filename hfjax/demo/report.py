"""The demo's report: a results table, the fusion α's, two plots, timings, and what it means.

Everything is read back from the files the earlier stages wrote, so the report can be rebuilt
from an output folder alone::

    <out>/eval/results.json                      {row: {task: {f1, precision, recall, ...}}}
    <out>/eval/<row>/<task>/predictions.jsonl    per-example answers (for the bootstrap)
    <out>/fusion/<variant>/metrics.jsonl         per-step loss / lm_loss / rdm / alpha
    <out>/fusion/fused/fusion_report.json        alpha and attention_by_source per group
    <out>/<stage>.done                           wall time and peak RSS of every stage

and written to ``<out>/report/``: ``report.md``, ``training_curves.png`` (loss, LM loss and
RDM per optimizer step of the fused run and both ablations) and ``source_attention.png`` (per
module group and target layer, the share of attention each source expert received).

The "what the numbers show" paragraph is generated from the numbers, whichever way they fall;
differences are judged with a paired bootstrap over test examples (95% interval of the
micro-F1 difference), so small test sets do not get over-read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfjax import machine

__all__ = ["METRICS", "ROW_LABELS", "markdown_table", "results_table", "type_f1",
           "write_report"]

#: Table rows in order: result key -> label.
ROW_LABELS: dict[str, str] = {
    "base": "Llama base, no LoRA",
    "target": "target only (Llama + its LoRA)",
    "experts": "each task's expert on its own base (ceiling)",
    "fused": "HeteroFusion (fused Llama LoRA)",
    "zero_sources": "ablation: zero sources",
    "no_denoise": "ablation: w/o denoising",
}
_FAMILY = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_VARIANT_COLORS = {"fused": "tab:blue", "zero_sources": "tab:orange", "no_denoise": "tab:green"}
_N_BOOT = 2000


# ----------------------------------------------------------------------------- scores
#: The two scores of the report: result key -> (name, what it measures).
METRICS: dict[str, tuple[str, str]] = {
    "f1": ("micro F1 (x100)", "exact tuples: type and span (or relation, head and tail)"),
    "type_f1": ("type-only micro F1 (x100)",
                "the predicted types / relations as a multiset, spans ignored"),
}


def example_counts(pred_file: Path, level: str = "tuple") -> np.ndarray:
    """``(n, 3)`` int counts per example: (correct, predicted, gold) items.

    ``level="tuple"``: distinct tuples, as `hfjax.eval.metrics.uie_scores` counts them;
    ``level="type"``: the tuples' first fields (entity type or relation) as a multiset, so an
    answer with the right labels and wrong spans still scores.
    """
    from collections import Counter

    from hfjax.eval.metrics import infer_uie_kind, parse_uie

    rows = [json.loads(line) for line in pred_file.read_text().splitlines() if line.strip()]
    kind = infer_uie_kind([r["reference"] for r in rows])
    counts = []
    for r in rows:
        pred, gold = parse_uie(r["prediction"], kind), parse_uie(r["reference"], kind)
        if level == "tuple":
            p, g = set(pred), set(gold)
            counts.append((len(p & g), len(p), len(g)))
        else:
            p, g = Counter(t[0] for t in pred), Counter(t[0] for t in gold)
            counts.append((sum((p & g).values()), sum(p.values()), sum(g.values())))
    return np.asarray(counts, np.int64).reshape(-1, 3)


def micro_f1(c: np.ndarray) -> np.ndarray:
    """Micro F1 of summed counts ``c[..., 3]`` (vectorised over leading axes)."""
    tp, n_pred, n_gold = c[..., 0], c[..., 1], c[..., 2]
    p = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
    r = np.where(n_gold > 0, tp / np.maximum(n_gold, 1), 0.0)
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def type_f1(pred_file: Path) -> float:
    """Type-only micro F1 (a fraction) of one predictions.jsonl."""
    return float(micro_f1(example_counts(pred_file, "type").sum(0)))


# ----------------------------------------------------------------------------- the table
def results_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                  sizes: Any, metric: str = "f1") -> dict[str, Any]:
    """A score table (x 100, one decimal): rows = variants, columns = tasks + ``avg``.

    Returns ``{"metric", "columns": [...], "rows": {label: {column: float | None}},
    "notes": {column: str}}``; ``avg`` is the mean of the row's task columns.
    """
    tasks = list(sizes.tasks)
    expert_of = {task: fam for fam, task in sizes.experts}
    rows: dict[str, dict[str, float | None]] = {}
    for key, label in ROW_LABELS.items():
        if key not in results:
            continue
        vals: dict[str, float | None] = {
            t: round(100 * results[key][t][metric], 1) if t in results[key] else None
            for t in tasks}
        present = [v for v in vals.values() if v is not None]
        vals["avg"] = round(float(np.mean(present)), 1) if present else None
        rows[label] = vals
    notes = {t: ("target task (Llama expert)" if t == sizes.target_task
                 else f"source: {_FAMILY[expert_of[t]]} expert") for t in tasks}
    notes["avg"] = "mean of the task columns"
    return {"metric": metric, "columns": [*tasks, "avg"], "rows": rows, "notes": notes}


def markdown_table(table: Mapping[str, Any]) -> str:
    """``table`` (from :func:`results_table`) as a Markdown table with a final notes row."""
    cols = table["columns"]
    lines = [f"| {METRICS[table['metric']][0]} | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, vals in table["rows"].items():
        cells = ["–" if vals[c] is None else f"{vals[c]:.1f}" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| *notes* | " + " | ".join(f"*{table['notes'][c]}*" for c in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- findings
def paired_bootstrap(eval_dir: Path, row_a: str, row_b: str, tasks: Sequence[str],
                     level: str = "tuple", seed: int = 0) -> dict[str, float]:
    """Mean over ``tasks`` of F1(a) − F1(b) (x100) and its 95% paired-bootstrap interval.

    Test examples are resampled within each task, the same resample for both rows.
    """
    rng = np.random.default_rng(seed)
    diffs, point = np.zeros(_N_BOOT), 0.0
    for task in tasks:
        a = example_counts(eval_dir / row_a / task / "predictions.jsonl", level)
        b = example_counts(eval_dir / row_b / task / "predictions.jsonl", level)
        point += float(micro_f1(a.sum(0)) - micro_f1(b.sum(0)))
        idx = rng.integers(0, len(a), size=(_N_BOOT, len(a)))
        diffs += micro_f1(a[idx].sum(1)) - micro_f1(b[idx].sum(1))
    k = max(len(tasks), 1)
    lo, hi = np.percentile(diffs / k, [2.5, 97.5])
    return {"diff": 100 * point / k, "lo": 100 * float(lo), "hi": 100 * float(hi)}


def _verdict(d: Mapping[str, float]) -> str:
    if d["lo"] > 0:
        return "a clear gain"
    if d["hi"] < 0:
        return "a clear loss"
    return "no clear difference"


def _fmt(d: Mapping[str, float]) -> str:
    return f"{d['diff']:+.1f} points, 95% CI [{d['lo']:+.1f}, {d['hi']:+.1f}]"


def _metric_findings(results: Mapping[str, Any], sizes: Any, eval_dir: Path, metric: str
                     ) -> tuple[list[str], dict[str, Any]]:
    """Sentences comparing the variants on one score, and the comparisons behind them."""
    level = "tuple" if metric == "f1" else "type"
    src = [t for t in sizes.tasks if t != sizes.target_task]
    tgt = [sizes.target_task]
    name = "F1" if metric == "f1" else "type-only F1"

    def avg(row: str, tasks: Sequence[str]) -> float:
        return 100 * float(np.mean([results[row][t][metric] for t in tasks]))

    def cmp(a: str, b: str, tasks: Sequence[str]) -> dict[str, float]:
        return paired_bootstrap(eval_dir, a, b, tasks, level)

    c = {"fused_vs_target_src": cmp("fused", "target", src),
         "fused_vs_target_tgt": cmp("fused", "target", tgt),
         "zero_vs_target_src": cmp("zero_sources", "target", src),
         "fused_vs_zero_src": cmp("fused", "zero_sources", src),
         "fused_vs_nodenoise_src": cmp("fused", "no_denoise", src)}
    gain, zv, nd = c["fused_vs_target_src"], c["fused_vs_zero_src"], c["fused_vs_nodenoise_src"]
    ceiling, alone = avg("experts", src), avg("target", src)
    out = [f"**{name}.** On the {len(src)} source tasks the fused Llama LoRA averages "
           f"{avg('fused', src):.1f} against {alone:.1f} for the target LoRA alone "
           f"({_fmt(gain)}: {_verdict(gain)}); the source experts on their own bases reach "
           f"{ceiling:.1f}."]
    if gain["lo"] > 0 and ceiling > alone:
        out.append(f"Fusion thus closes about {100 * gain['diff'] / (ceiling - alone):.0f}% of "
                   "the gap to the experts.")
    keep = c["fused_vs_target_tgt"]
    cost = (": fusing the other tasks in costs the target LoRA on its own task"
            if keep["hi"] < 0 else f": {_verdict(keep)}")
    out.append(f"On the target's own task ({sizes.target_task}) fused scores "
               f"{avg('fused', tgt):.1f} vs {avg('target', tgt):.1f} ({_fmt(keep)}{cost}).")
    zero_gain = c["zero_vs_target_src"]
    if zv["lo"] > 0:
        out.append(f"Fused beats the zero-source ablation on the source tasks ({_fmt(zv)}), "
                   "so the source experts' weights contribute beyond the replay set.")
    elif zero_gain["lo"] > 0:
        out.append(f"But the zero-source ablation — the same training on the same replay set "
                   f"with every source tensor zeroed — gains about as much over target only "
                   f"({_fmt(zero_gain)}; fused vs zero sources {_fmt(zv)}): the gain is "
                   "explained by training on the replay set, not by knowledge transferred from "
                   "the sources.")
    elif zv["hi"] < 0:
        out.append(f"The zero-source ablation does better than fused on the source tasks "
                   f"(fused vs zero sources {_fmt(zv)}): here the real sources hurt.")
    else:
        out.append(f"Fused and the zero-source ablation are not distinguishable ({_fmt(zv)}), "
                   "so this run shows no measurable contribution of the sources themselves.")
    out.append(f"Without denoising (open gate, no RDM) the source-task {name} is "
               f"{avg('no_denoise', src):.1f} (fused minus it: {_fmt(nd)}, i.e. "
               f"{_verdict(nd)} from denoising).")
    return out, c


def findings(results: Mapping[str, Any], sizes: Any, eval_dir: Path,
             fusion_info: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The "what the numbers show" paragraphs and the comparisons they rest on."""
    src = [t for t in sizes.tasks if t != sizes.target_task]

    def mean(row: str, metric: str, tasks: Sequence[str]) -> float:
        return 100 * float(np.mean([results[row][t][metric] for t in tasks]))

    best = max(100 * v[m] for row in results.values() for v in row.values() for m in METRICS)
    comparisons: dict[str, Any] = {}
    paragraphs: list[str] = []
    if best < 1.0:
        paragraphs.append(
            f"**Nothing was learned at these sizes.** Every score of every row is below 1 point "
            f"(the best is {best:.1f}), so there is nothing to compare: the "
            f"{sizes.name} sizes only exercise every stage. Run the default sizes for numbers "
            "that mean something.")
    experts, experts_type = (mean("experts", m, sizes.tasks) for m in METRICS)
    context = [f"**Context.** The experts on their own tasks reach {experts:.1f} exact F1 "
               f"and {experts_type:.1f} type-only F1 (all {len(sizes.tasks)} tasks)."]
    floor = experts < 20 and experts_type > experts + 20
    if floor:
        context.append("Models this small, trained for seconds, learn each task's output "
                       "format and label set but mostly fail to copy the right spans out of the "
                       "prompt (that needs induction heads, which take far longer to form), so "
                       "the exact scores sit near the floor and the type-only scores carry the "
                       "signal; the type-only comparison therefore comes first.")
    context.append(f"The Llama base without any LoRA scores {mean('base', 'type_f1', src):.1f} "
                   "type-only F1 on the source tasks (its pretraining text includes formatted "
                   "examples of every task, test inputs excluded).")
    alphas = fusion_info.get("fused", {}).get("alpha", {})
    if alphas:
        vals = list(alphas.values())
        context.append(f"The learned α's end between {min(vals):.3f} and {max(vals):.3f} "
                       "(initialised at 0.3).")
    context.append(f"Each number rests on {sizes.n_test} test examples per task (the intervals "
                   "are paired bootstraps over them); none of this predicts what happens with "
                   "8B models.")
    paragraphs.append(" ".join(context))
    if best >= 1.0:
        order = ("type_f1", "f1") if floor else ("f1", "type_f1")
        for metric in order:
            sentences, c = _metric_findings(results, sizes, eval_dir, metric)
            if floor and metric == "f1":
                sentences.insert(0, "*(Near the floor; for completeness.)*")
            paragraphs.append(" ".join(sentences))
            comparisons[metric] = c
    return "\n\n".join(paragraphs), comparisons


# ----------------------------------------------------------------------------- plots
def _read_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(fusion_dir: Path, out_png: Path, labels: Mapping[str, str]) -> Path:
    """Loss, LM loss and RDM per optimizer step, one line per fusion variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for variant, label in labels.items():
        hist = _read_history(fusion_dir / variant / "metrics.jsonl")
        steps = [h["step"] for h in hist]
        for ax, key in zip(axes, ("loss", "lm_loss", "rdm"), strict=True):
            ax.plot(steps, [h[key] for h in hist], label=label, lw=1.6,
                    color=_VARIANT_COLORS.get(variant))
    titles = ("total loss (LM + λ·RDM)", "LM loss on the replay set",
              "RDM (sliced-Wasserstein; not in the loss when λ = 0)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fusion training curves", fontsize=11)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_source_attention(report: Mapping[str, Any], out_png: Path) -> Path:
    """Per module group (panel) and target layer (bar): attention share of each source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = report["attention_by_source"]
    sources = [s["name"] for s in report["sources"]]
    groups = list(att)
    n_layers = 1 + max(int(layer) for g in groups for layer in att[g]["per_layer"])
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.3 * cols, 8.0), 2.9 * rows + 0.6),
                             squeeze=False,
                             sharey=True, constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    for ax, g in zip(axes.flat, groups, strict=False):
        per_layer = att[g]["per_layer"]
        bottom = np.zeros(n_layers)
        for i, s in enumerate(sources):
            vals = np.array([per_layer.get(str(layer), {}).get(s, 0.0)
                             for layer in range(n_layers)])
            ax.bar(range(n_layers), vals, bottom=bottom, color=cmap(i), label=s, width=0.7)
            bottom += vals
        ax.set_title(f"{g}  (α {report['alpha'].get(g, float('nan')):.3f})", fontsize=9)
        ax.set_xticks(range(n_layers))
        ax.set_xlabel("target layer", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("attention share", fontsize=8)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(sources), fontsize=8)
    fig.suptitle("Fused run: share of each target layer's attention on each source expert\n"
                 "(per module group; α = the group's learned scale)", fontsize=10)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- the report
def _alpha_table(fusion_info: Mapping[str, Any]) -> str:
    variants = [v for v in fusion_info if isinstance(fusion_info[v], dict)
                and "alpha" in fusion_info[v]]
    groups = list(fusion_info[variants[0]]["alpha"])
    lines = ["| group | " + " | ".join(fusion_info[v]["label"] for v in variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f"{fusion_info[v]['alpha'][g]:.4f}"
                                             for v in variants) + " |")
    return "\n".join(lines)


def _stage_table(markers: Mapping[str, Mapping[str, Any]], report_seconds: float) -> str:
    lines = ["| stage | wall time (s) | CPU time (s) | load average at its end | "
             "peak RSS after it (MiB) |", "|---|---:|---:|---:|---:|"]
    wall, cpu = 0.0, None
    for stage, m in markers.items():
        c, load = m.get("cpu_seconds"), m.get("load_average")
        lines.append(f"| {stage} | {m['seconds']:.1f} | "
                     f"{'–' if c is None else f'{c:.1f}'} | "
                     f"{'–' if load is None else f'{load:.1f}'} | {m['peak_rss_mb']:.0f} |")
        wall += m["seconds"]
        cpu = cpu if c is None else (cpu or 0.0) + c
    total_cpu = "–" if cpu is None else f"**{cpu:.1f}**"
    lines.append(f"| report | {report_seconds:.1f} | – | – | – |")
    lines.append(f"| **total** | **{wall + report_seconds:.1f}** | {total_cpu} | | |")
    return "\n".join(lines)


def write_report(out: Path, work: Path, sizes: Any,
                 markers: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``report.md`` and the two PNGs into ``work``; return the report's path."""
    import time

    t0 = time.time()
    eval_dir = out / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    fusion_info = markers["fusion"]["info"]
    labels = {v: fusion_info[v]["label"] for v in ("fused", "zero_sources", "no_denoise")}
    plot_training_curves(out / "fusion", work / "training_curves.png", labels)
    fused_report = json.loads((out / "fusion" / "fused" / "fusion_report.json").read_text())
    plot_source_attention(fused_report, work / "source_attention.png")
    table = results_table(results, sizes)
    text, comparisons = findings(results, sizes, eval_dir, fusion_info)
    (work / "comparisons.json").write_text(json.dumps(comparisons, indent=1) + "\n")

    models = markers["models"]["info"]
    experts = markers["experts"]["info"]
    check = fusion_info.get("peft_check", {})
    expert_lines = [f"- `{name}`: {e['steps']} steps, loss {e['loss_first']:.3f} → "
                    f"{e['loss_last']:.3f}" for name, e in experts.items()]
    model_lines = []
    for fam, m in models.items():
        s = m["shape"]
        model_lines.append(
            f"- {_FAMILY[fam]}: {s['layers']} layers × hidden {s['hidden']}, {s['heads']} query "
            f"/ {s['kv_heads']} kv heads, MLP {s['intermediate']}, vocab {m['vocab']}"
            + (f", sliding window {s['sliding_window']}" if s.get("sliding_window") else "")
            + f"; {m['params'] / 1e3:.0f}k params; pretrained {m['steps']} steps, loss "
              f"{m['loss_first']:.2f} → {m['loss_last']:.2f}")
    fusion_lines = [f"- {info['label']} (`{v}`): {info['steps']} steps, LM loss "
                    f"{info['lm_loss_first']:.3f} → {info['lm_loss_last']:.3f}"
                    for v, info in fusion_info.items() if v in labels]
    if "skipped" in check:
        peft_line = f"PEFT check skipped: {check['skipped']}."
    else:
        peft_line = (f"PEFT check: the fused adapter loaded with `peft.PeftModel` on the Llama "
                     f"base gives logits within **{check['max_abs_diff']:.2e}** (max abs diff, "
                     f"{check['tokens']} tokens) of ours; the adapter itself moves logits by up "
                     f"to {check['adapter_effect']:.2f}, so it did load.")
    src_desc = "; ".join(f"{_FAMILY[f]}: {', '.join(ts)}" for f, ts in sizes.source_tasks.items())
    peak = max(m["peak_rss_mb"] for m in markers.values())
    rss_note = ("peak RSS is the whole process's high-water mark (`VmHWM`) as it stood "
                "at the end of each stage; the demo runs in one process")

    md = [
        f"# hfjax demo report ({sizes.name} sizes)",
        "",
        "HeteroFusion end to end on a synthetic heterogeneous zoo: a Llama target LoRA "
        f"(task `{sizes.target_task}`) fused with LoRA experts from two other families "
        f"({src_desc}), then evaluated by greedy generation on held-out test splits "
        f"({sizes.n_test} examples per task). Replay set: {sizes.n_replay} examples from "
        "each task's replay split.",
        "",
        "## Results",
        "",
        markdown_table(table),
        "",
        f"Score: {METRICS['f1'][1]} (InstructUIE-style micro F1, the paper's metric).",
        "",
        markdown_table(results_table(results, sizes, "type_f1")),
        "",
        f"Score: {METRICS['type_f1'][1]}. Precision, recall and exact match are in "
        "`eval/results.json`, every prediction in `eval/<row>/<task>/predictions.jsonl`.",
        "",
        "### What the numbers show",
        "",
        text,
        "",
        "## Fusion",
        "",
        *fusion_lines,
        "",
        "Learned α per module group (init 0.3):",
        "",
        _alpha_table(fusion_info),
        "",
        peft_line,
        "",
        "![training curves](training_curves.png)",
        "",
        "![source attention](source_attention.png)",
        "",
        "Attention shares are the mean over a module's target B tokens of the attention mass "
        "on each source's tokens; they are not normalised by how many tokens a source has. "
        "Target layers that a source does not reach (tail alignment) get nothing from it.",
        "",
        "## Models and experts",
        "",
        *model_lines,
        "",
        f"LoRA experts (r {sizes.lora_r}, all linear projections, {sizes.lora_epochs} epochs "
        f"over {sizes.n_train} examples, lr {sizes.lora_lr}):",
        "",
        *expert_lines,
        "",
        "## Time and memory",
        "",
        _stage_table(markers, round(time.time() - t0, 1)),
        "",
        f"Peak RSS: **{peak:.0f} MiB** ({rss_note}). CPU time counts every thread of the "
        "process; the load average (1 minute, whole machine) shows how much else was running: "
        "on a 2-core machine anything above 2 means the demo shared its cores and its wall "
        "times are inflated.",
        "",
        f"Machine: {machine.describe()}. Reruns on one machine gave the same scores here; "
        "another CPU can give somewhat different ones (most likely because XLA:CPU compiles for "
        "the host's vector units, which changes float rounding, and training amplifies it).",
        "",
    ]
    path = work / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path
