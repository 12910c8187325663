"""`hfjax demo` end to end at fast sizes: every stage real (the study included), the report
built from real runs, and a second call served entirely from the stage cache."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge import load_adapter
from hfjax import machine
from hfjax.demo.pipeline import FAST, STAGES, run_demo
from hfjax.demo.report import HYPOTHESES


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, fast=True, progress=False)


def _report_table(report: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """The Markdown table whose header starts with ``| title``: its columns and rows' cells."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {title}"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    header, body = cells[0], cells[2:]
    return header[1:], {row[0]: row[1:] for row in body}


def test_every_stage_ran(demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    assert list(summary["stages"]) == list(STAGES)
    for stage in STAGES:
        assert not summary["stages"][stage]["skipped"], stage
        marker = json.loads((out / f"{stage}.done").read_text())
        assert marker["stage"] == stage and marker["seconds"] >= 0 and marker["peak_rss_mb"] > 0
        assert (out / stage).is_dir() and not (out / f".{stage}.partial").exists()
    for task in FAST.tasks:  # the val split exists and is disjoint from test
        val = json.loads((out / "data" / f"{task}_val.json").read_text())
        test = json.loads((out / "data" / f"{task}_test.json").read_text())
        assert len(val) == FAST.n_val and not {r["input"] for r in val} & {r["input"] for r in test}
    for fam in ("llama", "qwen2", "mistral"):  # HF checkpoint dirs with their tokenizers
        assert (out / "models" / fam / "config.json").exists()
        assert (out / "models" / fam / "tokenizer.json").exists()
    models = json.loads((out / "models.done").read_text())["info"]
    for fam, info in models.items():  # briefly pretrained, not random
        assert info["loss_last"] < info["loss_first"], fam
        assert info["copy_warmup_steps"] == FAST.copy_warmup_steps[fam]
        text_rows = info["corpus_tokens"] / FAST.pretrain.seq_len
        share = info["copy_rows"] / (info["copy_rows"] + text_rows)
        assert abs(share - FAST.copy_row_fraction) < 0.01, fam
        first, second = info["copy_nll"]  # the circuit check ran
        assert first > 0 and second > 0, fam
        # 10 warm-up steps never make a model copy, so every allowed round ran
        assert info["copy_warmup_rounds"] == (
            FAST.copy_warmup_rounds if FAST.copy_warmup_steps[fam] else 0), fam
        # 40 steps never form a circuit either: every allowed seed was tried, the last kept
        seeds = list(range(FAST.base_attempts))
        assert [t["base_seed"] for t in info["seeds_tried"]] == seeds, fam
        assert info["base_seed"] == seeds[-1] and info["seeds_tried"][-1]["copy_nll"] == [
            first, second], fam
        assert info["source"] == "pretrained here", fam
    for fam, task in FAST.experts:
        assert (out / "experts" / f"{fam}_{task}" / "adapter" / "adapter_config.json").exists()
        for split in ("val", "test"):  # scored on its own base, from real generations
            score = summary["experts"][f"{fam}_{task}"][split]
            assert 0.0 <= score["f1"] <= 1.0 and 0.0 <= score["type_f1"] <= 1.0
            preds = out / "experts" / f"{fam}_{task}" / "eval" / split / "predictions.jsonl"
            assert len(preds.read_text().splitlines()) == getattr(FAST, f"n_{split}")
    assert len(FAST.experts) - 1 >= 3 and len(FAST.tasks) >= 4


def test_the_study_ran_every_row_at_every_seed(demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    study = summary["study"]
    assert sorted(study["rows"]) == sorted(FAST.study_rows) and not study["skipped"]
    for name, row in study["rows"].items():
        seeded = name in ("fused", "noise_sources", "tuned_target")
        assert row["seeds"] == (list(FAST.seeds) if seeded else [None]), name
        for preds in row["predictions"].values():  # every task of every seed was generated
            assert sorted(preds) == sorted(FAST.tasks)
            for task, file in preds.items():
                lines = (out / "study" / file).read_text().splitlines()
                assert len(lines) == FAST.n_test, (name, task)
    adapters = {r: {s: load_adapter(out / "study" / p) for s, p in row["adapters"].items()}
                for r, row in study["rows"].items() if r in ("fused", "noise_sources")}
    fused = {s: adapters["fused"][str(s)] for s in FAST.seeds}
    noise = adapters["noise_sources"][str(FAST.seeds[0])]
    a, b = fused[FAST.seeds[0]], fused[FAST.seeds[1]]
    assert any(float(np.abs(a.modules[n].B - b.modules[n].B).max()) > 0 for n in a.modules)
    assert any(float(np.abs(a.modules[n].B - noise.modules[n].B).max()) > 0 for n in a.modules)
    tuned = study["rows"]["tuned_target"]["train"]
    for s in FAST.seeds:  # the tuned target made the fused run's updates on its replay
        assert tuned[str(s)]["steps"] == study["rows"]["fused"]["train"][str(s)]["steps"]
        assert tuned[str(s)]["replay"] == study["rows"]["fused"]["train"][str(s)]["replay"]


def test_report_states_hypotheses_then_verdicts_from_real_runs(
        demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    report = (out / "report" / "report.md").read_text()
    assert HYPOTHESES in report  # the pre-registered text, unchanged
    assert report.index("## Hypotheses") < report.index("## Study") < report.index("## Verdicts")
    sources = [t for t in FAST.tasks if t != FAST.target_task]
    columns, rows = _report_table(report, "exact micro F1 x100")
    assert columns == ["seeds", *FAST.tasks, "source avg"]
    assert list(rows) == [r["label"] for r in summary["study"]["rows"].values()]
    for label, cells in rows.items():
        row = next(r for r in summary["study"]["rows"].values() if r["label"] == label)
        for task, cell in zip(FAST.tasks, cells[1:], strict=False):
            assert float(cell.split()[0]) == pytest.approx(
                row["scores"]["f1"][task]["value"], abs=0.051)
    comps = summary["comparisons"]
    assert {(c["a"], c["b"]) for c in comps} == {
        ("fused", "target"), ("fused", "noise_sources"), ("fused", "tuned_target")}
    for c in comps:
        assert sorted(c["per_task"]) == sorted(sources) and c["verdict"] in report
        assert c["avg"]["lo"] <= c["avg"]["diff"] <= c["avg"]["hi"]
    _, experts = _report_table(report, "expert (own base, own task)")
    assert len(experts) == len(FAST.experts)
    assert "Peak RSS" in report and f"Machine: {machine.describe()}." in report


def test_plots_exist(demo: tuple[Path, dict[str, Any]]) -> None:
    out, _ = demo
    for name in ("training_curves.png", "source_attention.png"):
        data = (out / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_fused_adapter_loads_in_peft_and_differs(demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    fused = load_adapter(out / "study" / summary["study"]["rows"]["fused"]["adapters"][
        str(FAST.seeds[0])])
    target = load_adapter(out / "experts" / f"llama_{FAST.target_task}" / "adapter")
    assert list(fused.modules) == list(target.modules)
    assert max(float(np.abs(fused.modules[n].B - m.B).max())
               for n, m in target.modules.items()) > 0
    check = json.loads((out / "study" / "peft_check.json").read_text())
    if "skipped" not in check:
        assert check["max_abs_diff"] <= 1e-4 < check["adapter_effect"]


def test_second_call_skips_every_stage(demo: tuple[Path, dict[str, Any]]) -> None:
    out, first = demo
    t0 = time.time()
    second = run_demo(out, fast=True, progress=False)
    assert all(second["stages"][s]["skipped"] for s in STAGES)
    assert second["comparisons"] == first["comparisons"]
    assert time.time() - t0 < 30


def test_models_stage_copies_shipped_bases_on_a_key_match(
        demo: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Bases shipped for exactly this run's key are copied, not pretrained, and the marker
    says where they came from; any other key pretrains (the fixture's run did)."""
    from hfjax.demo import shipped

    out, _ = demo
    info = json.loads((out / "models.done").read_text())["info"]
    assert {i["source"] for i in info.values()} == {"pretrained here"}
    key = info["llama"]["bases_key"]
    root = tmp_path / "bases"
    for fam in info:
        shutil.copytree(out / "models" / fam, root / fam)
    (root / "manifest.json").write_text(json.dumps(
        {"key": key, "info": info, "built": {"finished_at": "then"}}))
    monkeypatch.setattr(shipped, "BASES_DIR", root)
    summary = run_demo(tmp_path / "run", fast=True, progress=False, until="models")
    assert list(summary["stages"]) == ["data", "models"]
    # copied, not pretrained: no per-family pretraining unit ran (the fixture's run has them)
    assert (out / "models" / ".units").is_dir()
    assert not (tmp_path / "run" / "models" / ".units").exists()
    got = json.loads((tmp_path / "run" / "models.done").read_text())["info"]
    assert all(got[f]["source"].startswith("shipped") for f in info)
    for fam in info:
        assert ((tmp_path / "run" / "models" / fam / "model.safetensors").read_bytes()
                == (out / "models" / fam / "model.safetensors").read_bytes())
    err = capsys.readouterr().err
    assert "shipped base (key" in err and "pretraining here" not in err
    (root / "manifest.json").write_text(json.dumps({"key": "0" * 16, "info": info}))
    assert shipped.copy_shipped(key, info, tmp_path / "other") is None


def test_interrupted_study_resumes_at_its_first_unfinished_run(
        demo: tuple[Path, dict[str, Any]]) -> None:
    out, first = demo
    marker = json.loads((out / "study.done").read_text())
    partial = out / ".study.partial"  # as an interruption during the study stage leaves it
    (out / "study").rename(partial)
    (partial / ".key.json").write_text(json.dumps(marker["key"]))
    (out / "study.done").unlink()
    last = partial / "runs" / "tuned_target" / f"seed{FAST.seeds[-1]}" / "unit.json"
    last.unlink()  # the run that was in progress
    again = run_demo(out, fast=True, progress=False)
    assert not again["stages"]["study"]["skipped"] and not again["stages"]["report"]["skipped"]
    assert all(again["stages"][s]["skipped"] for s in ("data", "models", "experts"))
    assert again["study"]["rows"]["fused"]["scores"] == first["study"]["rows"]["fused"]["scores"]
    runs = again["study"]["runs"]
    assert [k for k, r in runs.items() if not r["resumed"]] == [
        f"tuned_target/seed{FAST.seeds[-1]}"]


@pytest.mark.slow
def test_full_mode_adds_oracle_merges_and_replay_sweep(tmp_path: Path) -> None:
    """`--full` at fast sizes: a same-family (Llama) source makes the merges and the
    projection rows run, and each replay-sweep size gets its own study and a table line."""
    import dataclasses

    sizes = dataclasses.replace(
        FAST, name="fast-full", source_tasks={**FAST.source_tasks, "llama": ("news",)},
        replay_sweep=(4,), seeds=(0,),
        study_rows=("target", "fused", "noise_sources", "tuned_target", "merge_linear",
                    "project"), sweep_rows=("target", "fused", "noise_sources"))
    summary = run_demo(tmp_path, sizes=sizes, progress=False)
    study = summary["study"]
    assert {"merge_linear", "project_llama_news"} <= set(study["rows"]), study["skipped"]
    assert any(c.get("best_of") for c in study["comparisons"])  # fused vs the best merge
    sweep = json.loads((tmp_path / "study" / "replay4" / "study.json").read_text())
    assert sweep["rows"]["fused"]["train"]["0"]["replay"]["datasets"] == [
        f"{t}_replay4" for t in sizes.tasks]
    assert sweep["rows"]["fused"]["train"]["0"]["steps"] < study["rows"]["fused"]["train"][
        "0"]["steps"]
    report = Path(summary["report"]).read_text()
    assert "## Replay-size sweep (H6)" in report and "- H5: " in report
    assert "| 4 |" in report and f"| {sizes.n_replay} |" in report


def test_cli_pretrain_bases_turns_the_shipped_bases_off(
        demo: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hfjax import cli
    from hfjax.demo import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_demo", lambda out, **kw: seen.append(kw) or demo[1])
    assert cli.main(["demo", "--fast", "--quiet", "--out", str(demo[0])]) == 0
    assert cli.main(["demo", "--pretrain_bases", "--out", str(demo[0])]) == 0
    assert seen[0]["sizes"] == FAST and not seen[0]["progress"]
    assert seen[1]["sizes"].name == "default" and not seen[1]["sizes"].shipped_bases
    assert "## Experts on their own tasks" in capsys.readouterr().out
