"""`evaluate(...)`: greedy generation over an Alpaca test file, then UIE or GLUE-style metrics.

::

    metrics = evaluate("models/llama", "data/mit-movie_test.json", adapter_path="out/adapter",
                       out_dir="eval_out")
    # eval_out/predictions.jsonl  one {"instruction", "input", "reference", "prediction"} a line
    # eval_out/metrics.json       {"task": "uie", "f1": ..., "precision": ..., ..., "run": {...}}

``task="auto"`` scores as classification when every reference is a short single label (no
``:`` or ``;``, at most three words, at most 20 distinct labels, not all "None"), and as UIE
extraction otherwise. Inputs are checked (data file, template, task, dtype, adapter against
the model) before the model's weights are loaded; both output files are written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bridge import load_adapter
from hfjax.atomic import write_json_atomic, write_text_atomic
from hfjax.eval.generation import generate_answers
from hfjax.eval.metrics import EMPTY_ANSWERS, classification_scores, strip_generation, uie_scores
from hfjax.loading import from_pretrained, load_tokenizer, resolve_dtype
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import check_adapter
from hfjax.models.families import template_for
from hfjax.training.data import load_alpaca
from hfjax.training.templates import TEMPLATES as _TEMPLATE_REGISTRY
from hfjax.training.templates import get_template

TASKS = ("auto", "uie", "classification")
MAX_LABEL_WORDS = 3
MAX_LABELS = 20


def infer_task(references: list[str]) -> str:
    """``"classification"`` when every reference is a short single label, else ``"uie"``."""
    labels = [" ".join(strip_generation(r).split()) for r in references]
    if not labels:
        return "uie"
    single = all(lab and ":" not in lab and ";" not in lab
                 and len(lab.split()) <= MAX_LABEL_WORDS for lab in labels)
    if not single or len(set(labels)) > MAX_LABELS:
        return "uie"
    if all(lab.lower() in EMPTY_ANSWERS for lab in labels):
        return "uie"
    return "classification"


def evaluate(model_path: str | Path, data_file: str | Path, *,
             adapter_path: str | Path | None = None, template: str = "auto",
             task: str = "auto", batch_size: int = 8, max_new_tokens: int = 64, limit: int = 0,
             dtype: str = "float32", out_dir: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Generate answers for ``data_file``'s records and score them against their ``output``.

    Args:
        model_path: HF checkpoint directory (config.json, safetensors, tokenizer).
        data_file: Alpaca JSON file (a list of ``{instruction, input, output}``).
        adapter_path: PEFT LoRA directory applied to the model (``None``: the base model).
        template: ``"llama3"`` | ``"qwen"`` | ``"mistral"`` | ``"auto"`` (from model_type).
        task: ``"uie"`` | ``"classification"`` | ``"auto"`` (see `infer_task`).
        batch_size: prompts per generate call.
        max_new_tokens: generation length limit.
        limit: score the first ``limit`` records only (0: all).
        dtype: model dtype, ``"float32"`` or ``"bfloat16"``.
        out_dir: where ``predictions.jsonl`` and ``metrics.json`` go (``None``: not written).
        progress: progress bar over generation batches.

    Returns:
        The metrics: the scores (`uie_scores` or `classification_scores`), ``task``, and a
        ``run`` dict (paths, template, counts, seconds).

    Raises:
        ValueError (DataError, ModelConfigError, AdapterError, ...): bad input, one line
        naming the file or argument, before the weights are loaded.
    """
    t0 = time.time()
    if task not in TASKS:
        raise ValueError(f"task {task!r}: must be one of {', '.join(TASKS)}")
    if template != "auto" and template not in _TEMPLATE_REGISTRY:
        raise ValueError(f"template {template!r}: must be one of "
                         f"{', '.join([*sorted(_TEMPLATE_REGISTRY), 'auto'])}")
    if batch_size < 1 or max_new_tokens < 1 or limit < 0:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens}, "
                         f"limit={limit}: need batch_size >= 1, max_new_tokens >= 1, limit >= 0")
    jdtype = resolve_dtype(dtype)
    records = load_alpaca(data_file)
    if limit:
        records = records[:limit]
    model_path = Path(model_path)
    model_cfg = ModelConfig.from_hf(model_path, source=str(model_path / "config.json"))
    if template == "auto":  # from_hf accepted the model_type: the family table has its row
        template = template_for(model_cfg.model_type)
    tokenizer = load_tokenizer(model_path)
    get_template(template).check_tokenizer(tokenizer)
    adapter = None
    if adapter_path is not None:
        adapter = load_adapter(adapter_path).to_jax()
        check_adapter(adapter, model_cfg, where=str(adapter_path))
    references = [r["output"] for r in records]
    if task == "auto":
        task = infer_task(references)

    model = from_pretrained(model_path, dtype=jdtype)
    t_gen = time.time()
    predictions = generate_answers(model, tokenizer, records, template=template,
                                   adapter=adapter, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress)
    gen_seconds = time.time() - t_gen
    scores = (classification_scores(predictions, references) if task == "classification"
              else uie_scores(predictions, references))
    metrics: dict[str, Any] = {"task": task, **scores, "run": {
        "model_path": str(model_path), "adapter_path": None if adapter_path is None
        else str(adapter_path), "data_file": str(data_file), "template": template,
        "dtype": dtype, "n_records": len(records), "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "generate_seconds": round(gen_seconds, 3),
        "wall_seconds": round(time.time() - t0, 3)}}

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = []
        for rec, pred in zip(records, predictions, strict=True):
            row = {"instruction": rec["instruction"]} if rec.get("instruction") else {}
            row.update(input=rec.get("input", ""), reference=rec["output"], prediction=pred)
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        write_text_atomic(out / "predictions.jsonl", "".join(lines))
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: the task, the scores, the counts."""
    keys = (("precision", "recall", "f1", "exact_match") if metrics["task"] == "uie"
            else ("accuracy", "f1", "mcc"))
    scores = "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in keys)
    run = metrics["run"]
    return (f"{metrics['task']}: {scores}  (n {metrics['n']}, "
            f"{run['generate_seconds']} s generating)")
