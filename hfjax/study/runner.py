"""`run_study(...)`: every row of the plan at every seed, evaluated, then the report.

::

    summary = run_study(fuse_cfg, {"movie": "data/movie_test.json"}, seeds=(0, 1, 2),
                        out_dir="study_out")
    # study_out/runs/<row>/<seed0|once>/unit.json   one finished (row, seed): skipped on rerun
    # study_out/runs/<row>/<seed>/eval/<task>/predictions.jsonl
    # study_out/study.md, study.json, study_<metric>.png, study_seeds.png

The report covers the rows of the call that wrote it: a rerun with ``rows=...`` reuses the
finished runs of those rows and rewrites the report for them only.

The fuse runs are `run_fusion` on a copy of ``fuse_cfg`` with the row's overrides and the
seed; the tuned target is `train_lora` initialised from the target adapter
(``init_adapter``) on the same replay files with the fuse config's batch size, accumulation,
epochs, step cap and learning rate, so it makes the same number of optimizer updates (checked
against the fused run of the same seed). Merges are `hfjax.merges` over the target and the
sources that share its base (same model type where known, same module shapes and rank).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hfjax.atomic import write_json_atomic
from hfjax.study.plan import Row, StudyError, Unit, field_exists, make_plan, select_rows

__all__ = ["EvalOptions", "StudyError", "parse_eval_data", "run_study"]

_UNIT_FILE = "unit.json"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How every row is evaluated (`hfjax.eval.run.evaluate`'s arguments)."""

    batch_size: int = 8  # prompts per generate call
    max_new_tokens: int = 64  # generation length limit
    limit: int = 0  # score the first N records of each test file (0: all)
    dtype: str = "float32"  # model dtype while generating
    task: str = "auto"  # "uie" | "classification" | "auto" (per file, from the references)


def parse_eval_data(text: str) -> dict[str, str]:
    """``"task=file,task=file"`` (the CLI's ``--eval_data``) as ``{task: file}``."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        task, eq, path = item.partition("=")
        if not eq or not task.strip() or not path.strip():
            raise StudyError(f"--eval_data: {item!r} is not task=file")
        out[task.strip()] = path.strip()
    if not out:
        raise StudyError("--eval_data: no test files given")
    return out


# ----------------------------------------------------------------------------- inputs
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_type(model_dir: str) -> str | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, TypeError):
        return None


def same_base(target: Any, source: Any, target_type: str | None) -> str | None:
    """Why ``source`` does not share the target's base (None when it does)."""
    src_type = _model_type(source.config.get("base_model_name_or_path") or "")
    if src_type is not None and target_type is not None and src_type != target_type:
        return f"model_type {src_type} (target: {target_type})"
    if {m.rank for m in source.modules.values()} != {m.rank for m in target.modules.values()}:
        return "another rank"
    for name, m in source.modules.items():
        t = target.modules.get(name)
        if t is None:
            return f"module {name} is not one of the target's"
        if (m.d_out, m.d_in) != (t.d_out, t.d_in):
            return (f"module {name} has shape ({m.d_out}, {m.d_in}), the target's "
                    f"({t.d_out}, {t.d_in})")
    return None


@dataclasses.dataclass
class _Study:
    cfg: Any
    eval_data: dict[str, str]
    out: Path
    opts: EvalOptions
    target: Any
    sources: dict[str, Any]  # name -> adapter
    homogeneous: list[str]  # source names sharing the target's base
    merge_weight: float
    density: float

    def digest(self) -> str:
        d = self.cfg.to_dict()
        d.pop("output_dir", None)
        d.pop("seed", None)
        d.pop("task_name", None)
        blob = json.dumps({"cfg": d, "eval": self.eval_data, "opts": dataclasses.asdict(self.opts),
                           "w": self.merge_weight, "density": self.density}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def skip_reason(row: Row, st: _Study, rows: Sequence[Row]) -> str | None:
    """Why ``row`` cannot run with this config (None when it can)."""
    for field in row.overrides:
        if not field_exists(st.cfg, field):
            return (f"the fuse config has no field {field} (not in this version); row declared, "
                    "not run")
    if row.kind in ("merge", "project") and not st.homogeneous:
        return "no source shares the target's base model: no homogeneous merge exists"
    if row.kind == "project" and row.source not in st.homogeneous:
        return f"source {row.source} does not share the target's base"
    if row.kind == "tune" and not any(r.name == "fused" for r in rows):
        return "needs the fused row (its step count and replay) in the same study"
    return None


# ----------------------------------------------------------------------------- configs
def fuse_config(st: _Study, unit: Unit) -> Any:
    """The fuse config of a ``fuse`` unit: the study's, with the row's overrides and seed."""
    cfg = copy.deepcopy(st.cfg)
    cfg.output_dir = str(st.out / "runs" / unit.key)
    cfg.task_name = "fuse"
    cfg.seed = int(unit.seed)
    for path, value in unit.row.overrides.items():
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def tune_config(st: _Study, unit: Unit) -> Any:
    """The train-lora config of the tuned-target row: the target adapter trained further on
    the fuse config's replay, with its batch, accumulation, epochs, step cap and lr."""
    from hfjax.configs.train_lora import get_config

    f = st.cfg
    cfg = get_config()
    cfg.model_path = str(f.target.model_path)
    cfg.template = str(f.target.template or "auto")
    cfg.data_root = str(f.data.data_root)
    cfg.datasets = tuple(f.data.datasets)
    cfg.cutoff_len = int(f.data.cutoff_len)
    cfg.min_bucket = int(f.data.min_bucket)
    cfg.output_dir = str(st.out / "runs" / unit.key)
    cfg.task_name = "tune"
    cfg.seed = int(unit.seed)
    cfg.init_adapter = str(f.target.adapter_path)
    for k in ("epochs", "lr", "warmup_ratio", "weight_decay", "batch_size", "grad_accum",
              "max_steps", "base_dtype", "remat", "checkpoint_every", "keep_checkpoints"):
        cfg.train[k] = f.train[k]
    return cfg


# ----------------------------------------------------------------------------- one unit
def _train(st: _Study, unit: Unit, done: Mapping[str, dict]) -> tuple[Path, dict[str, Any]]:
    """Produce the unit's adapter; returns (adapter dir, training record)."""
    from bridge import save_adapter

    row, work = unit.row, st.out / "runs" / unit.key
    if row.kind == "fuse":
        from hfjax.training.fuse_loop import run_fusion

        cfg = fuse_config(st, unit)
        res = run_fusion(cfg, progress=False)
        run = res.report.get("run", {})
        shutil.rmtree(res.output_dir / "checkpoints", ignore_errors=True)
        rec = {"steps": res.steps, "tokens": run.get("tokens_this_call"),
               "tokens_per_second": run.get("tokens_per_second"),
               "replay": {"data_root": str(cfg.data.data_root),
                          "datasets": list(cfg.data.datasets)},
               "overrides": dict(row.overrides)}
        if row.name == "fused":  # does the trained network read its sources? (study.md)
            from hfjax.study.probe import probe_fuse_run

            rows = probe_fuse_run(cfg, res.output_dir, res.report["alpha"], st.eval_data,
                                  batch_size=st.opts.batch_size, seed=int(unit.seed))
            rec["probe"] = json.loads(json.dumps(rows, default=float))
        return res.adapter_dir, rec
    if row.kind == "tune":
        from hfjax.training.lora_train import train_lora

        cfg = tune_config(st, unit)
        adapter_dir = train_lora(cfg, progress=False)
        report = json.loads((adapter_dir.parent / "train_report.json").read_text())
        shutil.rmtree(adapter_dir.parent / "checkpoints", ignore_errors=True)
        rec = {"steps": report["run"]["steps"], "tokens": report["run"]["tokens_this_call"],
               "tokens_per_second": report["run"]["tokens_per_second"],
               "replay": {"data_root": cfg.data_root, "datasets": list(cfg.datasets)},
               "init_adapter": cfg.init_adapter}
        fused = done.get(Unit(Row("fused", "", "fuse"), unit.seed).key)
        if fused is not None:
            rec["fused_steps"] = fused["train"]["steps"]
            if rec["steps"] != fused["train"]["steps"] or rec["replay"] != fused["train"]["replay"]:
                raise RuntimeError(f"{unit.key}: tuned target made {rec['steps']} updates on "
                                   f"{rec['replay']}, the fused run {fused['train']['steps']} on "
                                   f"{fused['train']['replay']}")
        return adapter_dir, rec
    if row.kind == "merge":
        import jax

        from hfjax.merges import merge_adapters

        adapters = [st.target, *(st.sources[s] for s in st.homogeneous)]
        key = jax.random.PRNGKey(unit.seed) if unit.seed is not None else None
        density = st.density if row.merge != "linear" else None
        merged = merge_adapters(adapters, [st.merge_weight] * len(adapters), row.merge,
                                density=density, key=key)
        return save_adapter(merged, work / "adapter"), {
            "merge": row.merge, "adapters": ["target", *st.homogeneous],
            "weights": [st.merge_weight] * len(adapters), "density": density}
    if row.kind == "project":
        from hfjax.merges import project_to_target

        proj = project_to_target(st.sources[row.source], st.target)
        summed = st.target.with_B({n: m.B + proj.modules[n].B
                                   for n, m in st.target.modules.items()})
        return save_adapter(summed, work / "adapter"), {"project": row.source}
    if row.kind == "target":
        return Path(st.cfg.target.adapter_path), {}
    raise AssertionError(row.kind)


def run_unit(st: _Study, unit: Unit, done: Mapping[str, dict]) -> dict[str, Any]:
    """Train (if the row trains), then evaluate on every test file; the unit's record."""
    from hfjax.eval.run import evaluate

    work = st.out / "runs" / unit.key
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    adapter, train = (None, {}) if unit.row.kind == "base" else _train(st, unit, done)
    t_eval = time.time()
    evals = {}
    for task, file in st.eval_data.items():
        m = evaluate(st.cfg.target.model_path, file, adapter_path=adapter,
                     template=st.cfg.target.template or "auto", task=st.opts.task,
                     batch_size=st.opts.batch_size, max_new_tokens=st.opts.max_new_tokens,
                     limit=st.opts.limit, dtype=st.opts.dtype, out_dir=work / "eval" / task,
                     progress=False)
        evals[task] = {"task": m["task"], "n": m["n"],
                       "predictions": _inside(st.out, work / "eval" / task / "predictions.jsonl"),
                       **{k: m[k] for k in ("f1", "exact_match", "accuracy") if k in m}}
    return {"row": unit.row.name, "seed": unit.seed, "spec": _spec(st, unit),
            "adapter": None if adapter is None else _inside(st.out, adapter), "train": train,
            "eval": evals, "seconds": {"train": round(t_eval - t0, 2),
                                       "eval": round(time.time() - t_eval, 2)}}


def _inside(root: Path, path: Path) -> str:
    """``path`` relative to the study folder when it lies inside it (so a study folder can be
    moved or renamed whole), else absolute; readers resolve it as ``root / value``."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _spec(st: _Study, unit: Unit) -> dict[str, Any]:
    r = unit.row
    return {"row": r.name, "kind": r.kind, "overrides": dict(r.overrides), "merge": r.merge,
            "source": r.source, "seed": unit.seed, "study": st.digest()}


def load_done(st: _Study, unit: Unit) -> dict[str, Any] | None:
    """The finished record of ``unit`` (None if it has not finished); refuses a record made
    with other settings."""
    path = st.out / "runs" / unit.key / _UNIT_FILE
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if rec.get("spec") != json.loads(json.dumps(_spec(st, unit), default=str)):
        raise StudyError(f"{path}: this run was made with other settings (config, test files or "
                         "row); use another --out or delete that folder")
    return rec


# ----------------------------------------------------------------------------- the study
def _setup(fuse_cfg: Any, eval_data: Mapping[str, str], out_dir: str | Path,
           opts: EvalOptions, merge_weight: float, density: float) -> _Study:
    from bridge import load_adapter
    from hfjax.config.sources import source_entries

    if not eval_data:
        raise StudyError("eval_data: no test files given (task=file)")
    for task, file in eval_data.items():
        if not Path(file).is_file():
            raise StudyError(f"{file}: no such test file (task {task})")
    target = load_adapter(fuse_cfg.target.adapter_path)
    sources = {n: load_adapter(p) for n, p in source_entries(fuse_cfg.sources)}
    ttype = _model_type(fuse_cfg.target.model_path)
    homog = [n for n, a in sources.items() if same_base(target, a, ttype) is None]
    return _Study(fuse_cfg, {k: str(v) for k, v in eval_data.items()}, Path(out_dir), opts,
                  target, sources, homog, merge_weight, density)


def run_study(fuse_cfg: Any, eval_data: Mapping[str, str], *, seeds: Sequence[int] = (0, 1, 2),
              out_dir: str | Path, rows: Sequence[str] | str | None = None,
              dry_run: bool = False, progress: bool = True,
              eval_options: EvalOptions | None = None, merge_weight: float = 0.5,
              density: float = 0.5) -> dict[str, Any]:
    """Run (or, with ``dry_run``, list) the study and write its report.

    Args:
        fuse_cfg: the fuse job's ConfigDict (`configs/fuse.py`); its seed is replaced by each
            of ``seeds`` and its output_dir by the study's folders.
        eval_data: task name -> Alpaca test file.
        seeds: training seeds of every trained row.
        out_dir: the study's folder (reruns skip every finished (row, seed)).
        rows: row names to run (default: all, see `hfjax.study.plan.DEFAULT_ROWS`).
        eval_options: generation settings of every evaluation.
        merge_weight / density: every adapter's weight and the pruning density of the merges.

    Returns:
        ``study.json``'s content (the dry run: ``{"plan": [...], "skipped": {...}}``).
    """
    from hfjax.study import report

    st = _setup(fuse_cfg, eval_data, out_dir, eval_options or EvalOptions(), merge_weight,
                density)
    chosen = select_rows(rows, list(st.sources))
    skipped = {r.name: why for r in chosen if (why := skip_reason(r, st, chosen)) is not None}
    runnable = [r for r in chosen if r.name not in skipped]
    plan = make_plan(runnable, seeds)
    if dry_run:
        from hfjax.study.report import dry_run_listing

        listing = dry_run_listing(st, plan, skipped)
        print(listing["text"])
        return listing
    if not plan:
        raise StudyError("nothing to run: every chosen row was skipped ("
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")")
    st.out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    done: dict[str, dict] = {}
    bar = tqdm(total=len(plan), disable=not progress, desc="study", unit="run", file=sys.stderr,
               dynamic_ncols=True)
    try:
        for unit in plan:
            bar.set_postfix_str(unit.key)
            rec = load_done(st, unit)
            if rec is None:
                rec = run_unit(st, unit, done)
                write_json_atomic(st.out / "runs" / unit.key / _UNIT_FILE, rec, indent=1,
                                  default=str)
            else:
                rec["resumed"] = True
            done[unit.key] = rec
            bar.update(1)
    finally:
        bar.close()
    return report.write_report(st, chosen, done, skipped)
