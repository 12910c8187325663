"""A tiny heterogeneous zoo for fusion tests: Llama target, Qwen2 + Mistral sources (tests only)."""

from __future__ import annotations

from pathlib import Path

from bridge import save_adapter
from hfjax.demo import tasks
from hfjax.demo.tokenizer import train_tokenizer
from hfjax.demo.zoo import DEFAULT_SHAPES, FamilyShape, build_base_model, random_lora

SMALL = {
    "llama": FamilyShape("llama", 4, 32, 4, 2, 64, 320),
    "qwen2": FamilyShape("qwen2", 3, 24, 2, 1, 48, 320),
    "mistral": FamilyShape("mistral", 5, 40, 4, 4, 80, 320, sliding_window=16),
}
assert set(SMALL) == set(DEFAULT_SHAPES)


def build_zoo(root: Path, *, r: int = 4, n_replay: int = 24) -> dict[str, Path]:
    """Target model + tokenizer, target/source adapters and a replay data root."""
    corpus = tasks.pretraining_corpus(300, seed=0)
    paths: dict[str, Path] = {}
    models = {}
    for fam, shape in SMALL.items():
        tok = train_tokenizer(corpus, fam, 320, root / f"tok_{fam}")
        models[fam] = build_base_model(root / f"base_{fam}", shape, tok, seed=1)
        paths[f"base_{fam}"] = root / f"base_{fam}"
    paths["target_adapter"] = save_adapter(
        random_lora(models["llama"].config, r=r, alpha=2 * r, seed=10), root / "lora_llama")
    paths["qwen_adapter"] = save_adapter(
        random_lora(models["qwen2"].config, r=r, alpha=2 * r, seed=11), root / "lora_qwen")
    paths["mistral_adapter"] = save_adapter(
        random_lora(models["mistral"].config, r=r, alpha=2 * r, seed=12,
                    target_modules=("q_proj", "v_proj", "down_proj")), root / "lora_mistral")
    splits = {name: {"replay": tasks.make_splits(name, n_train=0, n_replay=n_replay, n_test=0,
                                                 seed=3)["replay"]}
              for name in ("movie", "relation")}
    tasks.write_task_files(root / "data", splits)
    paths["data"] = root / "data"
    return paths


def tiny_fuse_config(paths: dict[str, Path], out: Path):
    from configs.fuse import get_config

    cfg = get_config()
    cfg.task_name = "tiny"
    cfg.output_dir = str(out)
    cfg.seed = 0
    cfg.target.model_path = str(paths["base_llama"])
    cfg.target.adapter_path = str(paths["target_adapter"])
    cfg.sources = ({"name": "qwen", "adapter_path": str(paths["qwen_adapter"])},
                   {"name": "mistral", "adapter_path": str(paths["mistral_adapter"])})
    cfg.data.data_root = str(paths["data"])
    cfg.data.datasets = ("movie_replay", "relation_replay")
    cfg.data.cutoff_len = 160
    cfg.data.min_bucket = 64
    cfg.fusion.block_size = 16
    cfg.fusion.embed_dim = 32
    cfg.fusion.num_heads = 4
    cfg.fusion.max_pos = 64
    cfg.rdm.num_projections = 16
    cfg.train.epochs = 2
    cfg.train.batch_size = 2
    cfg.train.grad_accum = 2
    cfg.train.lr = 3e-3
    cfg.train.base_dtype = "float32"
    cfg.train.checkpoint_every = 4
    return cfg
