"""A tiny heterogeneous zoo on disk: a Llama target + its LoRA, Qwen2 and Mistral source LoRAs
and two replay sets, small enough that a whole fuse run takes seconds on a CPU::

    paths = build_zoo(tmp)                       # {"base_llama": ..., "target_adapter": ..., ...}
    cfg = tiny_fuse_config(paths, tmp / "out")   # a fuse config sized for it
    fuse_overrides(paths, tmp / "out")           # the same as ``--config.FIELD=VALUE`` strings

``write_tiny_zoo(DIR)`` (``hfjax tiny-zoo DIR``) writes one plus ``DIR/fuse_flags.txt``, the
``--config.FIELD=VALUE`` flags (one a line) of a fuse run over it::

    hfjax tiny-zoo zoo && xargs -d '\\n' -a zoo/fuse_flags.txt hfjax fuse --config hfjax:fuse
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge import save_adapter
from hfjax.testing import tasks
from hfjax.testing.models import DEFAULT_SHAPES, FamilyShape, build_base_model, random_lora
from hfjax.testing.tokenizer import train_tokenizer

SMALL = {
    "llama": FamilyShape("llama", 4, 32, 4, 2, 64, 320),
    "qwen2": FamilyShape("qwen2", 3, 24, 2, 1, 48, 320),
    "mistral": FamilyShape("mistral", 5, 40, 4, 4, 80, 320, sliding_window=16),
}
assert set(SMALL) == set(DEFAULT_SHAPES)


QV = ("q_proj", "v_proj")  # source modules for fast tests: two fusion groups
QKV = ("q_proj", "k_proj", "v_proj")  # a target over QV sources: k_proj stays unfused


def build_zoo(root: Path, *, r: int = 4, n_replay: int = 24,
              modules: tuple[str, ...] | None = None,
              target_modules: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Target model + tokenizer, target/source adapters and a replay data root.

    ``modules``: the projections the source LoRAs (and, without ``target_modules``, the
    target LoRA) target; ``modules=QV, target_modules=QKV`` gives two fusion groups, a fuse
    step that compiles ~3x faster than the default. By default the target and Qwen2 LoRAs
    target every linear layer and the Mistral one ``q_proj, v_proj, down_proj``."""
    corpus = tasks.pretraining_corpus(300, seed=0)
    paths: dict[str, Path] = {}
    models = {}
    for fam, shape in SMALL.items():
        tok = train_tokenizer(corpus, fam, 320, root / f"tok_{fam}")
        models[fam] = build_base_model(root / f"base_{fam}", shape, tok, seed=1)
        paths[f"base_{fam}"] = root / f"base_{fam}"
    every = {"target_modules": modules} if modules else {}
    target = target_modules or modules
    paths["target_adapter"] = save_adapter(
        random_lora(models["llama"].config, r=r, alpha=2 * r, seed=10,
                    **({"target_modules": target} if target else {})),
        root / "lora_llama")
    paths["qwen_adapter"] = save_adapter(
        random_lora(models["qwen2"].config, r=r, alpha=2 * r, seed=11, **every),
        root / "lora_qwen")
    paths["mistral_adapter"] = save_adapter(
        random_lora(models["mistral"].config, r=r, alpha=2 * r, seed=12,
                    target_modules=modules or ("q_proj", "v_proj", "down_proj")),
        root / "lora_mistral")
    splits = {name: {"replay": tasks.make_splits(name, n_train=0, n_replay=n_replay, n_test=0,
                                                 seed=3)["replay"]}
              for name in ("movie", "relation")}
    tasks.write_task_files(root / "data", splits)
    paths["data"] = root / "data"
    return paths


def _fields(paths: dict[str, Path], out: Path) -> dict[str, Any]:
    """The fuse-config fields a run over the zoo in ``paths`` changes, by dotted name."""
    return {
        "task_name": "tiny", "output_dir": str(out), "seed": 0,
        "target.model_path": str(paths["base_llama"]),
        "target.adapter_path": str(paths["target_adapter"]),
        "sources": ({"name": "qwen", "adapter_path": str(paths["qwen_adapter"])},
                    {"name": "mistral", "adapter_path": str(paths["mistral_adapter"])}),
        "data.data_root": str(paths["data"]),
        "data.datasets": ("movie_replay", "relation_replay"),
        "data.cutoff_len": 160, "data.min_bucket": 64,
        "fusion.block_size": 16, "fusion.embed_dim": 32, "fusion.num_heads": 4,
        "fusion.max_pos": 64, "rdm.num_projections": 16,
        "train.epochs": 2, "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
        "train.base_dtype": "float32", "train.checkpoint_every": 4,
    }


def tiny_fuse_config(paths: dict[str, Path], out: Path) -> Any:
    """The shipped fuse config (``hfjax:fuse``) sized for the zoo in ``paths``, output ``out``."""
    from hfjax.configs.fuse import get_config

    cfg = get_config()
    for name, value in _fields(paths, out).items():
        *parents, leaf = name.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def fuse_overrides(paths: dict[str, Path], out: Path) -> list[str]:
    """`tiny_fuse_config` as ``FIELD=VALUE`` overrides of ``hfjax:fuse`` (the CLI's form)."""
    items = []
    for name, value in _fields(paths, out).items():
        if name == "sources":
            value = ",".join(f"{s['name']}={s['adapter_path']}" for s in value)
        elif isinstance(value, tuple):
            value = ",".join(value)
        items.append(f"{name}={value}")
    return items


def write_tiny_zoo(out_dir: str | Path) -> dict[str, Path]:
    """`build_zoo` into ``out_dir``, plus ``fuse_flags.txt``: the `fuse_overrides` as
    ``--config.`` flags, one a line, for a run writing to ``out_dir/fused``. Returns the
    zoo's paths and ``"fuse_flags"``."""
    out = Path(out_dir)
    paths = build_zoo(out)
    flags = out / "fuse_flags.txt"
    flags.write_text("".join(f"--config.{item}\n"
                             for item in fuse_overrides(paths, out / "fused")))
    return {**paths, "fuse_flags": flags}
