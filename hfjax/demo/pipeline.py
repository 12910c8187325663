"""`hfjax demo`: the whole HeteroFusion job on a synthetic heterogeneous zoo, and the study that
says whether fusion transferred anything, in minutes on a CPU.

No 8B checkpoints needed: everything is built here, each stage for real::

    data     5 synthetic UIE-style tasks (train / val / replay / test)   hfjax.testing.tasks
    models   3 tokenizers + 3 pretrained base models                   hfjax.demo.pretrain
             Llama (target) 4x64 GQA 4/2, Qwen2 4x64 GQA 4/2 + biases,
             Mistral 5x40 MHA + sliding window, each its own whole-word
             vocabulary; half the packed rows are repeated random strings,
             so each base forms a copy circuit (and the experts can copy
             spans); built once and shipped (hfjax.demo.shipped), copied
             when the settings match, else pretrained here (~15 min)
    experts  LoRA experts: Llama on movie (the target); Qwen2 on news    hfjax.training.lora_train
             and relation, Mistral on typing and vehicle (the sources);
             each scored on its own base, on its task's val and test split
    study    `hfjax study` on the fused config: the target base, the     hfjax.study
             target LoRA, HeteroFusion, its controls (zero / noise /
             mismatched sources) and the target LoRA tuned on the same
             replay with the same updates, at every training seed; the
             fused adapter is checked against PEFT when torch is there
    report   report.md: the pre-registered hypotheses, the study's table  hfjax.demo.report
             and verdicts on the source tasks, training curves, alphas

``run_demo(out_dir)`` runs the stages in order. Each stage works in a hidden
``.<stage>.partial/`` folder, renames it to ``<stage>/`` when done and then writes
``<stage>.done`` (JSON: its key parameters, a digest chained over the earlier stages' keys,
wall and CPU time, the machine's load average, peak RSS). A rerun skips every stage whose
marker matches and says so; a stage whose parameters changed (or whose output is missing)
reruns, and so does everything after it. An interrupted stage resumes at its first
unfinished unit (a base model, an expert, a study run).

Settings were chosen on the val split (the experts' exact F1); the test split is what the
study scores. ``fast=True`` shrinks every size so the whole job takes a few minutes; every
stage still runs for real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hfjax.atomic import write_json_atomic
from hfjax.demo.pretrain import PretrainConfig
from hfjax.demo.shipped import bases_key, copy_shipped
from hfjax.machine import peak_rss_mb
from hfjax.testing.models import ALL_LINEAR, DEFAULT_SHAPES, FamilyShape

__all__ = ["DEFAULT", "FAMILIES", "FAST", "FULL", "STAGES", "DemoSizes", "default_models_key",
           "models_key", "run_demo"]

STAGES: tuple[str, ...] = ("data", "models", "experts", "study", "report")
#: The zoo's model families, in the order their bases are built (and seeded).
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral")
#: Bumped when a stage's outputs change meaning, so old caches are not reused.
_VERSION = 2


@dataclasses.dataclass(frozen=True)
class DemoSizes:
    """Every size and hyper-parameter of one demo run.

    Attributes:
        name: ``"default"`` or ``"fast"`` (shown in the report).
        target_task: The Llama target expert's task.
        source_tasks: Source family -> its experts' tasks (config order = source order).
        n_train / n_val / n_replay / n_test: Records per task and split (val: where settings
            are chosen; test: scored by the study).
        data_seed: Seed of the synthetic tasks.
        corpus_docs: Documents of pretraining text (also trains the tokenizers).
        copy_fraction: Share of copy-heavy pretraining documents (`pretraining_corpus`).
        copy_warmup_steps / copy_warmup_lr: Steps (per family) and lr of a first pretraining
            phase on repeated random token strings (`copy_rows`), before the corpus; 0: none.
        copy_warmup_rounds: At most this many warm-up phases; the next one runs only while
            the model does not copy fresh random strings (second-half NLL above half the
            first half's): the circuit forms after a plateau of uneven length.
        copy_row_fraction: Share of the corpus phase's packed rows that are repeated random
            token strings (`mix_copy_rows`), mixed in with the text; 0: none.
        shapes: Model shape per family (depth, width, GQA layout; `hfjax.testing.models`).
        vocab_sizes: Tokenizer vocabulary size per family (at most: from ~2200 on, every
            corpus word is one token; docs/demo.md).
        pretrain_steps: Pretraining steps per family.
        base_seeds: Seed offset per family of its base's initialisation, batch order and copy
            rows (0: the seeds of earlier versions); the shipped bases record theirs.
        base_attempts: Pretrain a family's base from at most this many consecutive seeds
            (from ``base_seeds``), stopping at the first that copies fresh random strings
            (`copy_nll`: second half below half the first); the last one is kept.
        shipped_bases: Copy the prebuilt bases shipped in ``hfjax/demo/bases`` when their
            key equals this run's (`hfjax.demo.shipped`); False: always pretrain here.
        pretrain: Batch, length, learning rate of pretraining (``steps`` is per family).
        cutoff_len / min_bucket: Token limit and smallest padded length of training batches.
        lora_r: LoRA rank of every expert (all sources must share the target's rank).
        lora_targets: The projections every expert adapts (one fusion group each).
        lora_epochs / lora_batch / lora_lr: Expert training.
        fuse_epochs / fuse_batch / fuse_accum / fuse_lr: Fusion training over the replay set.
        block_size / embed_dim / num_heads / num_projections / max_pos: Transfer networks.
        eval_batch: Prompts per generate call (>= n_test: one call per task).
        max_new_tokens: Generation limit (the longest answers are about 30 tokens).
        seeds: Training seeds of every trained study row (fused, controls, tuned target).
        study_rows: The study's rows (`hfjax.study.plan.DEFAULT_ROWS` names; ``merge_*`` and
            ``project`` apply when a source shares the target's base, i.e. a Llama expert).
        replay_sweep: Extra replay sizes per task (< n_replay: the first records of the
            replay split), each its own study of ``sweep_rows``; () for none.
        sweep_rows: The rows of each replay-sweep study.
        peft_check: Compare the fused adapter's logits in PEFT with ours (needs torch + peft).
    """

    name: str
    target_task: str = "movie"
    source_tasks: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: {
        "qwen2": ("news", "relation"), "mistral": ("typing", "vehicle")})
    n_train: int = 320
    n_val: int = 40
    n_replay: int = 32
    n_test: int = 50
    data_seed: int = 0
    corpus_docs: int = 3000
    copy_fraction: float = 0.0
    copy_warmup_steps: Mapping[str, int] = dataclasses.field(default_factory=lambda: {
        "llama": 0, "qwen2": 0, "mistral": 0})
    copy_warmup_lr: float = 1.5e-3
    copy_warmup_rounds: int = 1
    copy_row_fraction: float = 0.5
    shapes: Mapping[str, FamilyShape] = dataclasses.field(default_factory=lambda: {
        **DEFAULT_SHAPES, "qwen2": FamilyShape("qwen2", 4, 64, 4, 2, 192, 640)})
    vocab_sizes: Mapping[str, int] = dataclasses.field(default_factory=lambda: {
        "llama": 3072, "qwen2": 3072, "mistral": 3072})
    pretrain_steps: Mapping[str, int] = dataclasses.field(default_factory=lambda: {
        "llama": 2500, "qwen2": 2500, "mistral": 2500})
    base_seeds: Mapping[str, int] = dataclasses.field(default_factory=lambda: {
        "llama": 2, "qwen2": 0, "mistral": 0})
    base_attempts: int = 3
    shipped_bases: bool = True
    pretrain: PretrainConfig = PretrainConfig(steps=0, batch_size=8, seq_len=128, lr=1.5e-3)
    cutoff_len: int = 176
    min_bucket: int = 176
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_epochs: int = 10
    lora_batch: int = 8
    lora_lr: float = 3e-3
    fuse_epochs: int = 3
    fuse_batch: int = 8
    fuse_accum: int = 1
    fuse_lr: float = 3e-3
    block_size: int = 64
    embed_dim: int = 64
    num_heads: int = 4
    num_projections: int = 64
    max_pos: int = 64
    eval_batch: int = 50
    max_new_tokens: int = 48
    seeds: tuple[int, ...] = (0, 1)
    study_rows: tuple[str, ...] = ("base", "target", "fused", "zero_sources", "noise_sources",
                                   "mismatch_sources", "tuned_target")
    replay_sweep: tuple[int, ...] = ()
    sweep_rows: tuple[str, ...] = ("target", "fused", "noise_sources", "tuned_target")
    peft_check: bool = True

    @property
    def tasks(self) -> list[str]:
        """The target task, then the source tasks in source order (each once)."""
        return list(dict.fromkeys(
            [self.target_task] + [t for ts in self.source_tasks.values() for t in ts]))

    @property
    def experts(self) -> list[tuple[str, str]]:
        """``(family, task)`` of every expert: the Llama target first, then the sources."""
        return [("llama", self.target_task)] + [
            (fam, t) for fam, ts in self.source_tasks.items() for t in ts]

    def stage_params(self, stage: str) -> dict[str, Any]:
        """The parameters a stage's output depends on (besides the earlier stages)."""
        d = dataclasses.asdict(self)
        keys = {
            "data": ("tasks", "n_train", "n_val", "n_replay", "n_test", "data_seed",
                     "replay_sweep"),
            "models": ("corpus_docs", "copy_fraction", "copy_warmup_steps", "copy_warmup_lr",
                       "copy_warmup_rounds", "copy_row_fraction", "shapes", "vocab_sizes",
                       "pretrain_steps", "base_seeds", "base_attempts", "pretrain",
                       "shipped_bases"),
            "experts": ("experts", "cutoff_len", "min_bucket", "lora_r", "lora_targets",
                        "lora_epochs", "lora_batch", "lora_lr", "eval_batch", "max_new_tokens"),
            "study": ("fuse_epochs", "fuse_batch", "fuse_accum", "fuse_lr", "block_size",
                      "embed_dim", "num_heads", "num_projections", "max_pos", "seeds",
                      "study_rows", "replay_sweep", "sweep_rows", "eval_batch",
                      "max_new_tokens", "peft_check"),
            "report": ("name",),
        }[stage]
        extra = {"tasks": self.tasks, "experts": [list(e) for e in self.experts],
                 "lora_targets": list(self.lora_targets), "seeds": list(self.seeds),
                 "study_rows": list(self.study_rows), "replay_sweep": list(self.replay_sweep),
                 "sweep_rows": list(self.sweep_rows)}
        return {k: extra[k] if k in extra else d[k] for k in keys}


#: The default job: 5 tasks, 5 experts (1 target + 4 sources), < 10 min on a 2-core CPU.
DEFAULT = DemoSizes(name="default")

#: The fast job (tests, a first look): 4 tasks, 3 source experts, smaller and shallower
#: models, LoRA on q/v only (2 fusion groups: less to compile), a few steps per stage.
FAST = DemoSizes(
    name="fast", source_tasks={"qwen2": ("news", "relation"), "mistral": ("vehicle",)},
    n_train=64, n_val=8, n_replay=8, n_test=8, corpus_docs=600, copy_fraction=0.3,
    copy_warmup_steps={"llama": 10, "qwen2": 0, "mistral": 0}, copy_warmup_rounds=2,
    copy_row_fraction=0.2, base_seeds={"llama": 0, "qwen2": 0, "mistral": 0}, base_attempts=2,
    shapes={"llama": FamilyShape("llama", 3, 32, 4, 2, 64, 512),
            "qwen2": FamilyShape("qwen2", 2, 24, 2, 1, 48, 640),
            "mistral": FamilyShape("mistral", 4, 32, 4, 4, 64, 448, sliding_window=32)},
    vocab_sizes={"llama": 512, "qwen2": 640, "mistral": 448},
    pretrain_steps={"llama": 40, "qwen2": 40, "mistral": 40},
    pretrain=PretrainConfig(steps=0, batch_size=8, seq_len=64, lr=5e-3),
    cutoff_len=256, min_bucket=256,
    lora_targets=("q_proj", "v_proj"), lora_epochs=1, lora_batch=16, lora_lr=1e-2, fuse_epochs=1,
    fuse_batch=16, num_projections=32, eval_batch=8, max_new_tokens=24,
    study_rows=("base", "target", "fused", "noise_sources", "tuned_target"))


#: The full job (`hfjax demo --full`): the default zoo plus a same-family oracle source (a
#: Llama expert on news, so the homogeneous merges and the projection apply), experts on 640
#: examples (10x the largest replay), the main study at 64 replay examples per task and
#: replay-sweep studies at 4 and 16.
FULL = dataclasses.replace(
    DEFAULT, name="full", source_tasks={"qwen2": ("news", "relation"),
                                        "mistral": ("typing", "vehicle"), "llama": ("news",)},
    n_train=640, n_replay=64, replay_sweep=(4, 16),
    study_rows=(*DEFAULT.study_rows, "merge_linear", "merge_ties", "merge_dare_linear",
                "merge_dare_ties", "merge_magnitude_prune", "project"))


# ----------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data, indent=1, default=str)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unit(work: Path, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one unit of a stage (a model, an expert, a fusion variant, an evaluation) once.

    Its info is kept in ``work/.units/<name>.json``, so a stage interrupted part-way resumes
    at its first unfinished unit.
    """
    path = work / ".units" / f"{name}.json"
    if path.exists():
        _log(f"   {name}: done before the interruption, kept")
        return _read_json(path)
    info = run()
    path.parent.mkdir(exist_ok=True)
    _write_json(path, info)
    return info


@dataclasses.dataclass
class _Ctx:
    """What the stage functions share: the output root, the sizes, the progress flag."""

    out: Path
    sizes: DemoSizes
    progress: bool

    def final(self, stage: str) -> Path:
        return self.out / stage


# ----------------------------------------------------------------------------- stage 1: data
def _splits(s: DemoSizes) -> dict[str, dict[str, list[dict[str, Any]]]]:
    from hfjax.testing import tasks

    return {t: tasks.make_splits(t, n_train=s.n_train, n_replay=s.n_replay, n_test=s.n_test,
                                 n_val=s.n_val, seed=s.data_seed) for t in s.tasks}


def _stage_data(ctx: _Ctx, work: Path) -> dict[str, Any]:
    from hfjax.testing import tasks

    s = ctx.sizes
    splits = _splits(s)
    for n in s.replay_sweep:  # nested subsets: the first n records of the replay split
        if not 0 < n < s.n_replay:
            raise ValueError(f"replay_sweep: {n} must be in 1..{s.n_replay - 1} (n_replay)")
        for sp in splits.values():
            sp[f"replay{n}"] = sp["replay"][:n]
    info = tasks.write_task_files(work, splits)
    _log(f"   wrote {len(info)} datasets: {', '.join(sorted(info))}")
    return {"datasets": sorted(info),
            "records": {t: {k: len(v) for k, v in sp.items()} for t, sp in splits.items()}}


# ----------------------------------------------------------------------------- stage 2: models
def models_key(sizes: DemoSizes, held_out_inputs: Iterable[str]) -> str:
    """The key of the bases ``sizes`` builds (`hfjax.demo.shipped.bases_key`)."""
    params = {k: v for k, v in sizes.stage_params("models").items() if k != "shipped_bases"}
    return bases_key(params, held_out_inputs)


def default_models_key(sizes: DemoSizes | None = None) -> str:
    """`models_key` of ``sizes`` (default: `DEFAULT`), its held-out inputs made in memory."""
    s = sizes or DEFAULT
    held_out = {r["input"] for sp in _splits(s).values() for r in (*sp["val"], *sp["test"])}
    return models_key(s, held_out)


def _stage_models(ctx: _Ctx, work: Path) -> dict[str, Any]:
    import jax

    from hfjax.demo.pretrain import copy_nll, copy_rows, mix_copy_rows, pack_corpus, pretrain
    from hfjax.loading import init_params
    from hfjax.testing import tasks
    from hfjax.testing.models import build_base_model, model_config
    from hfjax.testing.tokenizer import train_tokenizer
    from hfjax.training.data import load_alpaca

    s = ctx.sizes
    if s.base_attempts < 1:
        raise ValueError(f"base_attempts must be >= 1, got {s.base_attempts}")
    data = ctx.final("data")
    held_out = {r["input"] for t in s.tasks for split in ("val", "test")
                for r in load_alpaca(data / f"{t}_{split}.json")}
    key = models_key(s, held_out)
    if s.shipped_bases:
        shipped = copy_shipped(key, FAMILIES, work)
        if shipped is not None:
            for fam, info in shipped.items():
                _log(f"   {fam}: shipped base (key {key}), repeated random strings: NLL "
                     f"{info['copy_nll'][0]:.2f} first half, {info['copy_nll'][1]:.2f} second")
            return shipped
        _log(f"   no shipped bases with key {key}: pretraining here (minutes per family)")
    corpus = tasks.pretraining_corpus(s.corpus_docs, seed=s.data_seed,
                                      copy_fraction=s.copy_fraction, exclude_inputs=held_out)

    def pretrain_seed(i: int, fam: str, cfg: Any, text_rows: Any, seed: int
                      ) -> tuple[Any, dict[str, Any]]:
        """One base pretrained from seed offset ``seed``: warm-up rounds, then the corpus."""
        k = i + 10 * seed  # seed 0: the seeds of earlier versions
        pcfg = dataclasses.replace(s.pretrain, steps=s.pretrain_steps[fam], seed=k)
        tokens = mix_copy_rows(text_rows, s.copy_row_fraction, cfg.vocab_size, seed=1000 + k)
        params = init_params(cfg, jax.random.PRNGKey(100 + k))
        warm = s.copy_warmup_steps.get(fam, 0)
        warm_losses: list[float] = []
        rounds = 0
        for rounds in range(1, s.copy_warmup_rounds + 1 if warm else 1):
            # a copy circuit is born after a plateau of uneven length: warm up again (fresh
            # strings) until the model copies, at most copy_warmup_rounds times
            wseed = k + 97 * (rounds - 1)  # round 1: the single warm-up of earlier versions
            wcfg = dataclasses.replace(pcfg, steps=warm, lr=s.copy_warmup_lr, seed=wseed)
            rows = copy_rows(warm * wcfg.batch_size, wcfg.seq_len, cfg.vocab_size, seed=wseed)
            params, losses = pretrain(cfg, params, rows, wcfg, progress=ctx.progress,
                                      desc=f"copy warm-up {fam} ({rounds})")
            warm_losses += losses
            first, second = copy_nll(cfg, params, seq_len=wcfg.seq_len)
            _log(f"   {fam}: copy warm-up round {rounds}: NLL of repeated random strings "
                 f"{first:.2f} first half, {second:.2f} second")
            if second < 0.5 * first:
                break
        params, losses = pretrain(cfg, params, tokens, pcfg, progress=ctx.progress,
                                  desc=f"pretrain {fam} (seed {seed})")
        first, second = copy_nll(cfg, params, seq_len=pcfg.seq_len)
        return params, {
            "base_seed": seed, "copy_rows": int(tokens.shape[0] - text_rows.shape[0]),
            "copy_nll": [round(first, 3), round(second, 3)], "steps": pcfg.steps,
            "loss_first": round(losses[0], 4),
            "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "losses": [round(x, 4) for x in losses], "copy_warmup_steps": warm,
            "copy_warmup_rounds": rounds,
            "copy_warmup_loss_last": (round(sum(warm_losses[-10:]) / len(warm_losses[-10:]), 4)
                                      if warm_losses else None)}

    def build(i: int, fam: str) -> dict[str, Any]:
        t0 = time.time()
        tok = train_tokenizer(corpus, fam, s.vocab_sizes[fam], work / f"tokenizer_{fam}")
        shape = s.shapes[fam]
        cfg = model_config(shape, tok)
        text_rows = pack_corpus(corpus, tok, s.pretrain.seq_len)
        tried = []
        for attempt in range(s.base_attempts):
            # the circuit is not born in every run: the next seed, while the base cannot copy
            params, run = pretrain_seed(i, fam, cfg, text_rows, s.base_seeds.get(fam, 0) + attempt)
            tried.append({"base_seed": run["base_seed"], "copy_nll": run["copy_nll"]})
            first, second = run["copy_nll"]
            if second < 0.5 * first:
                break
            if attempt + 1 < s.base_attempts:
                _log(f"   {fam}: seed {run['base_seed']} did not form a copy circuit "
                     f"(random strings NLL {first:.2f} / {second:.2f}): the next seed")
        build_base_model(work / fam, shape, tok, params=params)
        shutil.rmtree(work / f"tokenizer_{fam}")
        n_params = sum(x.size for x in jax.tree.leaves(params))
        info = {"shape": dataclasses.asdict(shape), "vocab": cfg.vocab_size,
                "params": int(n_params), "corpus_tokens": int(text_rows.size), **run,
                "seeds_tried": tried, "seconds": round(time.time() - t0, 1),
                "source": "pretrained here", "bases_key": key}
        _log(f"   {fam}: {shape.layers} layers x {shape.hidden}, {shape.heads}/{shape.kv_heads} "
             f"heads, vocab {cfg.vocab_size}, {n_params / 1e3:.0f}k params; loss "
             f"{info['loss_first']:.2f} -> {info['loss_last']:.2f}, repeated random strings: "
             f"NLL {first:.2f} first half, {second:.2f} second (seed {run['base_seed']}, "
             f"{info['seconds']:.0f}s)")
        return info

    return {fam: _unit(work, fam, lambda i=i, fam=fam: build(i, fam))
            for i, fam in enumerate(FAMILIES)}


# ----------------------------------------------------------------------------- stage 3: experts
def expert_name(family: str, task: str) -> str:
    """The folder / source name of an expert, e.g. ``qwen2_news``."""
    return f"{family}_{task}"


def _stage_experts(ctx: _Ctx, work: Path) -> dict[str, Any]:
    from hfjax.configs.train_lora import get_config
    from hfjax.training.lora_train import train_lora

    s = ctx.sizes

    def _score(model: Path, data_file: Path, adapter: Path, out_dir: Path) -> dict[str, float]:
        from hfjax.demo.report import type_f1
        from hfjax.eval.run import evaluate

        m = evaluate(model, data_file, adapter_path=adapter, batch_size=s.eval_batch,
                     max_new_tokens=s.max_new_tokens, out_dir=out_dir, progress=False)
        return {"f1": round(float(m["f1"]), 4), "exact_match": round(float(m["exact_match"]), 4),
                "type_f1": round(type_f1(out_dir / "predictions.jsonl"), 4)}

    def train(fam: str, task: str) -> dict[str, Any]:
        name = expert_name(fam, task)
        cfg = get_config()
        cfg.model_path = str(ctx.final("models") / fam)
        cfg.data_root = str(ctx.final("data"))
        cfg.datasets = (f"{task}_train",)
        cfg.cutoff_len = s.cutoff_len
        cfg.min_bucket = s.min_bucket
        cfg.output_dir = str(work)
        cfg.task_name = name
        cfg.seed = 0
        cfg.lora.r = s.lora_r
        cfg.lora.alpha = float(2 * s.lora_r)
        cfg.lora.target_modules = tuple(s.lora_targets)
        cfg.train.epochs = s.lora_epochs
        cfg.train.lr = s.lora_lr
        cfg.train.batch_size = s.lora_batch
        cfg.train.grad_accum = 1
        cfg.train.base_dtype = "float32"
        cfg.train.checkpoint_every = 10**6  # only the final one: the runs are short
        t0 = time.time()
        adapter_dir = train_lora(cfg, progress=ctx.progress)
        report = _read_json(adapter_dir.parent / "train_report.json")
        losses = [json.loads(line)["loss"] for line in
                  (adapter_dir.parent / "metrics.jsonl").read_text().splitlines() if line]
        shutil.rmtree(adapter_dir.parent / "checkpoints", ignore_errors=True)
        scores = {split: _score(ctx.final("models") / fam, ctx.final("data") /
                                f"{task}_{split}.json", adapter_dir,
                                adapter_dir.parent / "eval" / split) for split in ("val", "test")}
        info = {"family": fam, "task": task, "steps": report["run"]["steps"],
                "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                "scores": scores, "seconds": round(time.time() - t0, 1)}
        _log(f"   {name}: {info['steps']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
             f"val exact F1 {100 * scores['val']['f1']:.1f}, type-only "
             f"{100 * scores['val']['type_f1']:.1f} ({info['seconds']:.0f}s)")
        return info

    return {expert_name(f, t): _unit(work, expert_name(f, t), lambda f=f, t=t: train(f, t))
            for f, t in s.experts}


# ----------------------------------------------------------------------------- stage 4: study
def fuse_config(ctx: _Ctx, work: Path, replay: int | None = None) -> Any:
    """The demo's fuse config (paths point at the finished earlier stages); the study runs it
    and its controls at every seed. ``replay``: a `replay_sweep` size (None: the whole replay
    split)."""
    from hfjax.configs.fuse import get_config

    s = ctx.sizes
    experts = ctx.final("experts")
    cfg = get_config()
    cfg.task_name = "fused"
    cfg.experiment_name = f"hfjax demo ({s.name})"
    cfg.output_dir = str(work)
    cfg.seed = 0
    cfg.target.model_path = str(ctx.final("models") / "llama")
    cfg.target.adapter_path = str(experts / expert_name("llama", s.target_task) / "adapter")
    cfg.sources = tuple({"name": expert_name(f, t),
                         "adapter_path": str(experts / expert_name(f, t) / "adapter")}
                        for f, t in s.experts[1:])
    cfg.data.data_root = str(ctx.final("data"))
    cfg.data.datasets = tuple(f"{t}_replay{replay or ''}" for t in s.tasks)
    cfg.data.cutoff_len = s.cutoff_len
    cfg.data.min_bucket = s.min_bucket
    cfg.fusion.block_size = s.block_size
    cfg.fusion.embed_dim = s.embed_dim
    cfg.fusion.num_heads = s.num_heads
    cfg.fusion.max_pos = s.max_pos
    cfg.rdm.num_projections = s.num_projections
    cfg.train.epochs = s.fuse_epochs
    cfg.train.batch_size = s.fuse_batch
    cfg.train.grad_accum = s.fuse_accum
    cfg.train.lr = s.fuse_lr
    cfg.train.base_dtype = "float32"
    cfg.train.checkpoint_every = 10**6
    return cfg


def peft_check(model_dir: Path, adapter_dir: Path, data_file: Path) -> dict[str, Any]:
    """Load ``adapter_dir`` with ``peft.PeftModel`` on ``model_dir``; compare logits with ours.

    Returns ``{"max_abs_diff", "adapter_effect", "tokens"}`` (``adapter_effect``: the largest
    logit change the adapter makes, so a silently unloaded adapter would show 0), or
    ``{"skipped": why}`` when torch / peft are not installed.
    """
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed"}
    import numpy as np

    from bridge import load_adapter
    from hfjax.loading import from_pretrained
    from hfjax.training.data import encode_example, load_alpaca

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ex = encode_example(load_alpaca(data_file)[0], tok, "llama3", 1024)
    ids = ex.input_ids[None].astype(np.int64)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    model = from_pretrained(model_dir, dtype="float32")
    ours = np.asarray(model(ids, adapter=load_adapter(adapter_dir)))
    plain = np.asarray(model(ids))
    return {"max_abs_diff": float(np.abs(ours - ref).max()),
            "adapter_effect": float(np.abs(ours - plain).max()), "tokens": int(ids.shape[1]),
            "torch": torch.__version__, "peft": peft.__version__}


def _stage_study(ctx: _Ctx, work: Path) -> dict[str, Any]:
    from hfjax.study.runner import EvalOptions, run_study

    s = ctx.sizes
    data = ctx.final("data")
    eval_data = {t: str(data / f"{t}_test.json") for t in s.tasks}
    summary = run_study(fuse_config(ctx, work), eval_data, seeds=s.seeds, out_dir=work,
                        rows=list(s.study_rows), progress=ctx.progress,
                        eval_options=EvalOptions(batch_size=s.eval_batch,
                                                 max_new_tokens=s.max_new_tokens))
    fused = work / summary["rows"]["fused"]["adapters"][str(s.seeds[0])]
    if s.peft_check:
        check = peft_check(ctx.final("models") / "llama", fused,
                           data / f"{s.target_task}_test.json")
    else:
        check = {"skipped": "disabled by the run's sizes"}
    if "skipped" in check:
        _log(f"   PEFT check skipped: {check['skipped']}")
    else:
        _log(f"   PEFT check: fused adapter in peft.PeftModel vs JAX, max |logit diff| "
             f"{check['max_abs_diff']:.2e} (the adapter moves logits by up to "
             f"{check['adapter_effect']:.2f})")
    _write_json(work / "peft_check.json", check)
    for n in s.replay_sweep:
        _log(f"   replay sweep: {n} examples per task")
        run_study(fuse_config(ctx, work / f"replay{n}", n), eval_data, seeds=s.seeds,
                  out_dir=work / f"replay{n}", rows=list(s.sweep_rows), progress=ctx.progress,
                  eval_options=EvalOptions(batch_size=s.eval_batch,
                                           max_new_tokens=s.max_new_tokens))
    return {"rows": list(summary["rows"]), "skipped": summary["skipped"],
            "runs": len(summary["runs"]), "peft_check": check,
            "replay_sweep": list(s.replay_sweep)}


# ----------------------------------------------------------------------------- stage 6: report
def _stage_report(ctx: _Ctx, work: Path) -> dict[str, Any]:
    from hfjax.demo.report import write_report

    markers = {st: _read_json(ctx.out / f"{st}.done") for st in STAGES[:-1]}
    path = write_report(ctx.out, work, ctx.sizes, markers)
    return {"report": str(path.relative_to(work))}


_STAGE_FUNCS: dict[str, Callable[[_Ctx, Path], dict[str, Any]]] = {
    "data": _stage_data, "models": _stage_models, "experts": _stage_experts,
    "study": _stage_study, "report": _stage_report}

_STAGE_TITLES = {
    "data": "synthetic tasks (train / val / replay / test)",
    "models": "tokenizers + pretrained base models (Llama, Qwen2, Mistral), shipped or built here",
    "experts": "LoRA experts (Llama target, Qwen2 + Mistral sources), scored on val and test",
    "study": "HeteroFusion, its controls and the tuned target at every seed, scored on test",
    "report": "report.md: hypotheses, study table and verdicts, plots",
}


# ----------------------------------------------------------------------------- the runner
def _run_stage(ctx: _Ctx, index: int, stage: str, key: dict[str, Any], t_start: float, *,
               force: bool = False) -> dict[str, Any]:
    """Run one stage (or skip it when its marker matches and not ``force``); return its marker."""
    marker_file = ctx.out / f"{stage}.done"
    final = ctx.final(stage)
    header = f"== [{index + 1}/{len(STAGES)}] {stage}: {_STAGE_TITLES[stage]}"
    if force and marker_file.exists():
        _log(f"{header} -- an earlier stage reran, rerunning")
    elif marker_file.exists() and final.exists():
        marker = _read_json(marker_file)
        if marker.get("key") == key:
            _log(f"{header} -- cached, skipped (ran in {marker['seconds']:.1f}s)")
            return {**marker, "skipped": True}
        _log(f"{header} -- parameters changed, rerunning")
    else:
        _log(header)
    marker_file.unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    work = ctx.out / f".{stage}.partial"
    key_file = work / ".key.json"
    if work.exists() and (not key_file.exists() or _read_json(key_file) != key):
        shutil.rmtree(work)  # a leftover of other parameters: start clean
    if work.exists():
        _log("   resuming an interrupted run of this stage")
    work.mkdir(parents=True, exist_ok=True)
    _write_json(key_file, key)
    t0, cpu0 = time.time(), cpu_seconds()
    info = _STAGE_FUNCS[stage](ctx, work)
    seconds = time.time() - t0
    key_file.unlink()
    os.replace(work, final)
    marker = {"stage": stage, "key": key, "seconds": round(seconds, 2),
              "cpu_seconds": round(cpu_seconds() - cpu0, 2),
              "load_average": round(os.getloadavg()[0], 2), "peak_rss_mb": peak_rss_mb(),
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "elapsed_in_run": round(time.time() - t_start, 2), "info": info}
    _write_json(marker_file, marker)
    _log(f"   done in {seconds:.1f}s (peak RSS so far {marker['peak_rss_mb']:.0f} MiB)")
    return {**marker, "skipped": False}


def run_demo(out_dir: str | os.PathLike[str], *, fast: bool = False, full: bool = False,
             progress: bool = True, sizes: DemoSizes | None = None,
             until: str = "report") -> dict[str, Any]:
    """Run (or resume) the demo job into ``out_dir``; return its summary.

    Args:
        out_dir: Output folder; finished stages found there are reused.
        fast: Tiny sizes (a few minutes) instead of the default (<= 10 minutes on 2 cores).
        full: `FULL` (the oracle Llama source, merges, projection, the replay sweep).
        progress: Progress bars and per-step lines (stage headers are always printed).
        sizes: Explicit sizes (tests); overrides ``fast`` and ``full``.
        until: The last stage to run (e.g. ``"models"``: `scripts/build_demo_bases.py`);
            before ``"report"``, only ``out_dir``, ``sizes``, ``stages`` and ``seconds``
            are returned.

    Returns:
        ``{"out_dir", "sizes", "stages": {stage: {"seconds", "skipped", "peak_rss_mb"}},
        "study" (study.json: every row's scores x100 with intervals, per seed, predictions),
        "experts" ({expert: {"val"|"test": {"f1", "exact_match", "type_f1"}}}, fractions),
        "comparisons" (the verdicts on the source tasks, `demo.report.source_comparisons`),
        "report" (report.md's path), "seconds"}``.
    """
    if fast and full:
        raise ValueError("run_demo: fast and full exclude each other")
    if until not in STAGES:
        raise ValueError(f"run_demo: until={until!r} is not a stage ({', '.join(STAGES)})")

    sizes = sizes or (FAST if fast else FULL if full else DEFAULT)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Ctx(out=out, sizes=sizes, progress=progress)
    t_start = time.time()
    _log(f"hfjax demo ({sizes.name} sizes) -> {out}")
    chain = _digest(["hfjax-demo", _VERSION])
    stages: dict[str, Any] = {}
    rerun = False  # once a stage runs, every later one runs too: its inputs were rewritten
    for i, stage in enumerate(STAGES):
        params = sizes.stage_params(stage)
        chain = _digest([chain, stage, params])
        key = {"params": params, "chain": chain}
        m = _run_stage(ctx, i, stage, key, t_start, force=rerun)
        rerun = rerun or not m["skipped"]
        stages[stage] = {"seconds": m["seconds"], "skipped": m["skipped"],
                         "peak_rss_mb": m["peak_rss_mb"]}
        if stage == until:
            break
    if until != STAGES[-1]:
        return {"out_dir": str(out), "sizes": sizes.name, "stages": stages,
                "seconds": round(time.time() - t_start, 2)}
    study = _read_json(out / "study" / "study.json")
    experts = _read_json(out / "experts.done")["info"]
    comparisons = _read_json(out / "report" / "comparisons.json")
    total = time.time() - t_start
    report = out / "report" / "report.md"
    _log(f"hfjax demo: finished in {total:.1f}s; report: {report}")
    return {"out_dir": str(out), "sizes": sizes.name, "stages": stages, "study": study,
            "experts": {n: e["scores"] for n, e in experts.items()},
            "comparisons": comparisons, "report": str(report), "seconds": round(total, 2)}
