"""`hfjax demo` end to end at fast sizes: every stage real, the report built from real runs,
and a second call served entirely from the stage cache."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge import load_adapter
from hfjax import machine
from hfjax.demo.pipeline import FAST, FUSION_VARIANTS, STAGES, run_demo
from hfjax.demo.report import ROW_LABELS


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, fast=True, progress=False)


def _report_table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first Markdown table after '## Results': its columns and its rows' cells."""
    table: list[str] = []
    for line in report.split("## Results", 1)[1].splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
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
    for fam in ("llama", "qwen2", "mistral"):  # HF checkpoint dirs with their tokenizers
        assert (out / "models" / fam / "config.json").exists()
        assert (out / "models" / fam / "tokenizer.json").exists()
    models = json.loads((out / "models.done").read_text())["info"]
    for fam, info in models.items():  # briefly pretrained, not random
        assert info["loss_last"] < info["loss_first"], fam
    for fam, task in FAST.experts:
        assert (out / "experts" / f"{fam}_{task}" / "adapter" / "adapter_config.json").exists()
    assert len(FAST.experts) - 1 >= 3 and len(FAST.tasks) >= 4


def test_report_table_is_populated_from_real_runs(demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    report = (out / "report" / "report.md").read_text()
    columns, rows = _report_table(report)
    assert columns == [*FAST.tasks, "avg"]
    variants = [r for r in rows if not r.startswith("*")]
    assert variants == list(ROW_LABELS.values())  # one row per variant, in order
    assert any(r.startswith("*notes") for r in rows)
    results = json.loads((out / "eval" / "results.json").read_text())
    for key, label in ROW_LABELS.items():
        for col, cell in zip(columns, rows[label], strict=True):
            value = float(cell)
            assert 0.0 <= value <= 100.0, (label, col, cell)
            if col != "avg":
                assert value == pytest.approx(100 * results[key][col]["f1"], abs=0.051)
                assert 0.0 <= results[key][col]["exact_match"] <= 1.0
        assert rows[label] == [f"{summary['table']['rows'][label][c]:.1f}" for c in columns]
    for variant in ("target", *FUSION_VARIANTS):  # predictions come from real generation
        for task in FAST.tasks:
            preds = (out / "eval" / variant / task / "predictions.jsonl").read_text().splitlines()
            assert len(preds) == FAST.n_test
    assert "### What the numbers show" in report and "Peak RSS" in report
    assert f"Machine: {machine.describe()}." in report  # the figures name their machine


def test_plots_exist(demo: tuple[Path, dict[str, Any]]) -> None:
    out, _ = demo
    for name in ("training_curves.png", "source_attention.png"):
        data = (out / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_fused_adapter_loads_and_differs(demo: tuple[Path, dict[str, Any]]) -> None:
    out, _ = demo
    fused = load_adapter(out / "fusion" / "fused" / "merged_lora")
    target = load_adapter(out / "experts" / f"llama_{FAST.target_task}" / "adapter")
    assert list(fused.modules) == list(target.modules)
    assert max(float(np.abs(fused.modules[n].B - m.B).max())
               for n, m in target.modules.items()) > 0
    check = json.loads((out / "fusion.done").read_text())["info"]["peft_check"]
    if "skipped" not in check:
        assert check["max_abs_diff"] <= 1e-4 < check["adapter_effect"]


def test_second_call_skips_every_stage(demo: tuple[Path, dict[str, Any]]) -> None:
    out, first = demo
    t0 = time.time()
    second = run_demo(out, fast=True, progress=False)
    assert all(second["stages"][s]["skipped"] for s in STAGES)
    assert second["table"] == first["table"]
    assert time.time() - t0 < 30


def test_interrupted_stage_resumes_at_its_first_unfinished_unit(
        demo: tuple[Path, dict[str, Any]]) -> None:
    out, first = demo
    marker = json.loads((out / "eval.done").read_text())
    partial = out / ".eval.partial"  # as an interruption during the eval stage leaves it
    (out / "eval").rename(partial)
    (partial / ".key.json").write_text(json.dumps(marker["key"]))
    (out / "eval.done").unlink()
    (partial / "results.json").unlink()
    units = sorted((partial / ".units").glob("*.json"))
    units[-1].unlink()  # the evaluation that was running
    again = run_demo(out, fast=True, progress=False)
    assert not again["stages"]["eval"]["skipped"] and not again["stages"]["report"]["skipped"]
    assert all(again["stages"][s]["skipped"] for s in ("data", "models", "experts", "fusion"))
    assert again["table"] == first["table"]
    assert len(list((out / "eval" / ".units").glob("*.json"))) == len(units)
