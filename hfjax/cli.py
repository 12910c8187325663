"""The `hfjax` command: thin wrappers over library functions (no logic a Python user lacks).

    hfjax fuse --config FILE[:ARG] [--config.FIELD=VALUE ...] [--dry_run]
    hfjax train-lora --config FILE [--config.FIELD=VALUE ...]
    hfjax eval --model DIR [--adapter DIR] --data FILE.json [--out DIR]
    hfjax demo [--out DIR] [--fast | --full] [--pretrain_bases]
    hfjax bench [--only small,mid,paper] [--skip-torch] [--skip-bridge] [--repeats N]
    hfjax memory
    hfjax tiny-zoo DIR
    hfjax lora-from-delta --base DIR --tuned DIR --out DIR --rank R [--alpha A] [...]
    hfjax merge-full --base DIR --adapter DIR --out DIR [--dtype float32|bfloat16|float16]

Config files are ml_collections Python files (``get_config()``) or the original release's
YAML layout (see `hfjax.config`); ``hfjax:NAME[:ARG]`` names a shipped one
(``hfjax:fuse``, ``hfjax:train_lora``, ``hfjax:paper:<experiment>``; `hfjax.config_names`).
Every command parses its arguments, calls one library function and prints what it returns.
Exit codes: 0 done; 2 bad input (one line); 3 the machine refused (disk full, permission, a
task directory held by another run; one line); 4 the run diverged (one line); 130
interrupted; 1 a bug (the traceback and a request to report it). ``--restart`` (fuse,
train-lora) starts a task over when its checkpoint was made by another configuration.
Compiled executables are cached on disk (`hfjax.compile_cache`; ``HFJAX_COMPILATION_CACHE=off``
turns that off).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from hfjax.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_DIVERGED,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EnvironmentFailure,
    RunDiverged,
    UserError,
    machine_error,
)

EXIT_RUN_FAILED = EXIT_BUG  # the old name
# OSErrors that are the machine's fault, not a bug: disk full, no permission, read-only.
_ENV_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT, errno.EIO,
               errno.EMFILE, errno.ENFILE}


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.x=y`` / ``--config.x y`` overrides from the other arguments."""
    rest, overrides = [], []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a.startswith("--config."):
            if "=" in a:
                overrides.append(a[len("--"):])
            elif i + 1 < len(argv):
                overrides.append(f"{a[len('--'):]}={argv[i + 1]}")
                next(it, None)
            else:
                raise SystemExit(f"hfjax: error: {a} needs a value")
        else:
            rest.append(a)
    return rest, overrides


def cmd_fuse(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.config import load_config, validate_configs
    from hfjax.config_names import resolve_config_name
    from hfjax.training.fuse_loop import run_fusion

    configs = load_config(resolve_config_name(args.config), overrides)
    validate_configs(configs, check_paths=not args.dry_run)
    for i, cfg in enumerate(configs):
        if len(configs) > 1:
            print(f"== task {i + 1}/{len(configs)}: {cfg.task_name}", file=sys.stderr)
        if args.dry_run and not os.path.exists(cfg.target.adapter_path) and i > 0:
            print(f"(target adapter {cfg.target.adapter_path} is produced by task "
                  f"{cfg.target.from_task}; planning with the first task's target)")
            cfg = cfg.unlock()
            cfg.target.adapter_path = configs[0].target.adapter_path
        res = run_fusion(cfg, dry_run=args.dry_run, progress=not args.quiet,
                         restart=args.restart)
        if not args.dry_run:
            run = res.report.get("run", {})
            print(f"fused adapter: {res.adapter_dir}")
            print(f"report: {res.output_dir / 'fusion_report.json'}  steps {res.steps}, "
                  f"compilations {run.get('compilations')}, "
                  f"{run.get('tokens_per_second')} tokens/s")
    return 0


def cmd_train_lora(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.config_names import resolve_config_name
    from hfjax.training.lora_train import load_train_config, train_lora

    cfg = load_train_config(resolve_config_name(args.config), overrides)
    adapter_dir = train_lora(cfg, progress=not args.quiet, restart=args.restart)
    report = json.loads((adapter_dir.parent / "train_report.json").read_text())
    run = report["run"]
    print(f"adapter: {adapter_dir}")
    print(f"report: {adapter_dir.parent / 'train_report.json'}  steps {run['steps']}, "
          f"compilations {run['compilations']}, first step {run['first_step_seconds']} s, then "
          f"{run['seconds_per_step']} s/step, "
          f"{run['tokens_per_second']} tokens/s")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.eval.run import evaluate, format_metrics

    metrics = evaluate(args.model, args.data, adapter_path=args.adapter, template=args.template,
                       task=args.task, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, limit=args.limit, dtype=args.dtype,
                       out_dir=args.out, progress=not args.quiet)
    print(format_metrics(metrics))
    if args.out is not None:
        print(f"predictions: {Path(args.out) / 'predictions.jsonl'}")
        print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    import dataclasses

    from hfjax.demo.pipeline import DEFAULT, FAST, FULL, run_demo

    sizes = FAST if args.fast else FULL if args.full else DEFAULT
    if args.pretrain_bases:
        sizes = dataclasses.replace(sizes, shipped_bases=False)
    summary = run_demo(args.out, sizes=sizes, progress=not args.quiet)
    text = Path(summary["report"]).read_text(encoding="utf-8")
    # The experts' ceiling, the study's tables and the verdicts; the rest stays in the file.
    start = text.index("## Experts on their own tasks")
    print(text[start:text.index("## Fusion", start)].rstrip())
    print(f"\nreport: {summary['report']}  (study: {Path(summary['out_dir']) / 'study'})")
    return 0


def cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.aot is not None:
        from hfjax.bench_aot import main as aot_main

        return aot_main(args.aot)
    from hfjax.bench import run_bench

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    run_bench(names, torch_side=not args.skip_torch, bridge=not args.skip_bridge,
              repeats=args.repeats, allocator=args.allocator, rss=not args.no_rss,
              log=lambda text: print(text, flush=True))
    return 0


def cmd_memory(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.memory import paper_memory_report

    print(paper_memory_report())
    return 0


def cmd_tiny_zoo(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.testing.zoo import write_tiny_zoo

    paths = write_tiny_zoo(args.out_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"fuse it: xargs -d '\\n' -a {paths['fuse_flags']} hfjax fuse --config hfjax:fuse")
    return 0


def cmd_lora_from_delta(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.tools import format_summary, lora_from_delta

    report = lora_from_delta(args.base, args.tuned, args.out, rank=args.rank, alpha=args.alpha,
                             target_modules=args.target_modules, dtype=args.dtype)
    print(format_summary(report))
    print(f"adapter: {args.out}")
    return 0


def cmd_merge_full(args: argparse.Namespace, overrides: list[str]) -> int:
    from hfjax.tools import merge_full

    r = merge_full(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"merged {r['merged']} LoRA modules into {r['tensors']} tensors "
          f"({r['bytes'] / 2**20:.1f} MiB, {r['shards']} shard(s)): {r['out_dir']}")
    return 0


def _add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    """The checkpoint tools (hfjax.tools): lora-from-delta and merge-full."""
    from hfjax.models.families import ALL_LINEAR

    ld = sub.add_parser("lora-from-delta", help="a full fine-tune as a PEFT LoRA (truncated SVD)")
    ld.add_argument("--base", required=True, help="HF checkpoint the fine-tune started from")
    ld.add_argument("--tuned", required=True, help="the fully fine-tuned HF checkpoint")
    ld.add_argument("--out", required=True, help="output PEFT adapter directory")
    ld.add_argument("--rank", required=True, type=int, help="LoRA rank r")
    ld.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: r, scale 1)")
    ld.add_argument("--target_modules", default=",".join(ALL_LINEAR),
                    help="comma-separated projections (default: all linear)")
    ld.add_argument("--dtype", default="float32", help="A/B dtype: float32 | bfloat16 | float16")
    ld.set_defaults(func=cmd_lora_from_delta)

    mf = sub.add_parser("merge-full", help="merge a PEFT LoRA into its base (plain HF checkpoint)")
    mf.add_argument("--base", required=True, help="base HF checkpoint directory")
    mf.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    mf.add_argument("--out", required=True, help="output HF checkpoint directory")
    mf.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float16 (default: keep the base's dtypes)")
    mf.set_defaults(func=cmd_merge_full)


# ----------------------------------------------------------------------------- hfjax study
def cmd_study(args: argparse.Namespace, overrides: list[str]) -> int:
    """``hfjax study``: fused vs controls vs baselines over seeds (`hfjax.study.run_study`)."""
    from hfjax import compile_cache
    from hfjax.config import load_config, validate_configs
    from hfjax.study import EvalOptions, StudyError, parse_eval_data, run_study

    configs = load_config(args.config, overrides)
    if len(configs) != 1:
        raise StudyError(f"{args.config}: holds {len(configs)} tasks; a study takes one")
    validate_configs(configs, check_paths=True)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise StudyError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
    compile_cache.enable()
    opts = EvalOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       limit=args.limit)
    summary = run_study(configs[0], parse_eval_data(args.eval_data), seeds=seeds,
                        out_dir=args.out, rows=args.rows, dry_run=args.dry_run,
                        progress=not args.quiet, eval_options=opts)
    if not args.dry_run:
        for c in summary["comparisons"]:
            print(f"{c['question']} {c['verdict']}")
        print(f"report: {args.out}/study.md  figures: {args.out}/study.json")
    return 0


def _add_study_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("study", help="fused vs controls vs merges over seeds, with verdicts")
    s.add_argument("--config", required=True, help="the fuse config (configs/fuse.py layout)")
    s.add_argument("--eval_data", required=True, help="test files: task=file.json,task=file")
    s.add_argument("--seeds", default="0,1,2", help="training seeds of every trained row")
    s.add_argument("--rows", default=None,
                   help="rows to run, e.g. fused,zero_sources,tuned_target (default: all)")
    s.add_argument("--out", required=True, help="study folder (finished runs are skipped)")
    s.add_argument("--dry_run", action="store_true", help="list every run and its cost")
    s.add_argument("--batch_size", type=int, default=8, help="generation batch size")
    s.add_argument("--max_new_tokens", type=int, default=64, help="generation length limit")
    s.add_argument("--limit", type=int, default=0, help="score the first N test records")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_study)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfjax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fuse", help="fuse source LoRAs into a target LoRA (HeteroFusion)")
    f.add_argument("--config", required=True,
                   help="config file: FILE.py[:ARG], FILE.yaml, or a shipped one: hfjax:fuse, "
                        "hfjax:paper:<experiment>")
    f.add_argument("--dry_run", action="store_true",
                   help="print the plan (layer maps, groups, tokens, params, memory) and exit")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--restart", action="store_true",
                   help="delete this task's checkpoints and metrics and start from step 0")
    f.set_defaults(func=cmd_fuse)

    t = sub.add_parser("train-lora", help="train a PEFT-compatible LoRA expert in JAX")
    t.add_argument("--config", required=True,
                   help="config file: FILE.py, or hfjax:train_lora (the shipped defaults)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--restart", action="store_true",
                   help="delete this task's checkpoints and metrics and start from step 0")
    t.set_defaults(func=cmd_train_lora)

    e = sub.add_parser("eval", help="greedy generation + UIE/classification metrics")
    e.add_argument("--model", required=True, help="HF checkpoint directory")
    e.add_argument("--adapter", default=None, help="PEFT LoRA directory (optional)")
    e.add_argument("--data", required=True, help="Alpaca JSON file")
    e.add_argument("--template", default="auto", help="llama3 | qwen | mistral | auto")
    e.add_argument("--out", default="eval_out", help="output directory")
    e.add_argument("--batch_size", type=int, default=8, help="generation batch size")
    e.add_argument("--max_new_tokens", type=int, default=64, help="generation length limit")
    e.add_argument("--limit", type=int, default=0, help="evaluate the first N records (0: all)")
    e.add_argument("--task", default="auto", help="uie | classification | auto")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the whole pipeline on a synthetic heterogeneous zoo")
    d.add_argument("--out", default="demo_out", help="output directory (stages are cached)")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true", help="tiny sizes (a few minutes)")
    mode.add_argument("--full", action="store_true",
                      help="add a same-family oracle source (merges, projection) and a "
                           "replay-size sweep (tens of minutes)")
    d.add_argument("--pretrain_bases", action="store_true",
                   help="pretrain the base models here (~15 min on 2 cores) instead of "
                        "copying the ones shipped for the default settings")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: the fused step vs PyTorch, the bridge "
                                      "(see hfjax.bench)")
    b.add_argument("--only", default="small,mid,paper",
                   help="configurations to run, comma-separated (small, mid, paper)")
    b.add_argument("--skip-torch", action="store_true", help="JAX only")
    b.add_argument("--skip-bridge", action="store_true", help="no checkpoint/adapter bench")
    b.add_argument("--repeats", type=int, default=None,
                   help="interleaved repetitions (default: 5; paper 2)")
    b.add_argument("--allocator", choices=("glibc-tuned", "default"), default="glibc-tuned",
                   help="glibc-tuned: no mmap/trim for both sides (fewer page faults)")
    b.add_argument("--no-rss", action="store_true", help="skip the peak-RSS workers")
    b.add_argument("--aot", nargs=argparse.REMAINDER, default=None,
                   help="instead: the ahead-of-time compile table (hfjax.bench_aot); the "
                        "arguments after it are its own (--quick, --layers, --sources, ...)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("memory", help="the paper setting's memory plan (1 and 8 GPUs)")
    m.set_defaults(func=cmd_memory)

    z = sub.add_parser("tiny-zoo", help="write a tiny Llama target + LoRA, Qwen2 and Mistral "
                                        "source LoRAs and replay data (hfjax.testing.zoo)")
    z.add_argument("out_dir", help="output directory")
    z.set_defaults(func=cmd_tiny_zoo)
    _add_tool_parsers(sub)
    _add_study_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    if args.command in ("fuse", "train-lora", "eval", "demo"):
        from hfjax import compile_cache

        compile_cache.enable()  # reruns of the same shapes skip XLA compilation
    try:
        return func(args, overrides)
    except KeyboardInterrupt:
        print("hfjax: interrupted (the latest checkpoint is kept; rerun to resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as e:  # AdapterError, ConfigError, DataError, FusionError, ...
        print(f"hfjax: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EnvironmentFailure as e:
        print(f"hfjax: environment: {_one_line(e)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except RunDiverged as e:
        print(f"hfjax: run diverged: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
            return _bug()
        where = f"{e.filename}: " if e.filename else ""
        print(f"hfjax: environment: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say so, with the traceback
        code = machine_error(e)  # a library's wrapped disk-full / permission error
        if code is None:
            return _bug()
        print(f"hfjax: environment: {os.strerror(code)} ({_one_line(e)[:300]})",
              file=sys.stderr)
        return EXIT_ENVIRONMENT


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split()) if str(e) else type(e).__name__


def _bug() -> int:
    traceback.print_exc()
    print("hfjax: internal error (a bug): please report it with the traceback above",
          file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
