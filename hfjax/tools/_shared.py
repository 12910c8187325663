"""What both checkpoint tools need: the base's family config, its linear modules, its tokenizer.

Module names come from the family's key table (`hfjax.models.key_tables`), never from strings
written here, so every supported family (Llama, Qwen2, Mistral) works the same way::

    >>> linear_modules(cfg, ("q_proj", "down_proj"))
    {"model.layers.0.self_attn.q_proj": KeySpec(hf="model.layers.0.self_attn.q_proj.weight"),
     "model.layers.0.mlp.down_proj": ..., "model.layers.1.self_attn.q_proj": ..., ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bridge.checkpoint import CheckpointReader
from bridge.errors import CheckpointError
from hfjax.errors import UserError
from hfjax.models.config import ModelConfig
from hfjax.models.families import ALL_LINEAR
from hfjax.models.key_tables import KeySpec, hf_shape, key_table

# Files beside the weights that a merged checkpoint should carry over, when the base has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class ToolError(UserError):
    """Bad arguments to a checkpoint tool (rank, dtype, target modules)."""


def model_config(ckpt: CheckpointReader) -> ModelConfig:
    """The family config of an open checkpoint (refuses unsupported families, by file)."""
    return ModelConfig.from_hf(ckpt.config, source=str(ckpt.path / "config.json"))


def check_targets(target_modules: Iterable[str] | str) -> tuple[str, ...]:
    """Projection names (``q_proj`` ... ``down_proj``), validated against the key table."""
    if isinstance(target_modules, str):
        names = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    else:
        names = tuple(target_modules)
    if not names:
        raise ToolError("target_modules: empty; choose from " + ", ".join(ALL_LINEAR))
    bad = [t for t in names if t not in ALL_LINEAR]
    if bad:
        raise ToolError(f"target_modules: {bad} are not linear projections of a decoder layer; "
                        f"choose from {', '.join(ALL_LINEAR)}")
    return tuple(t for t in ALL_LINEAR if t in names)  # key-table order, no duplicates


def linear_modules(cfg: ModelConfig, targets: Iterable[str] = ALL_LINEAR) -> dict[str, KeySpec]:
    """PEFT module name -> key-table row of every decoder-layer linear weight in ``targets``."""
    wanted = set(targets)
    out = {}
    for spec in key_table(cfg):
        ours = spec.ours
        if ours[0] == "layers" and ours[-1] == "kernel" and ours[3] in wanted:
            out[spec.hf.removesuffix(".weight")] = spec
    return out


def check_shapes(ckpt: CheckpointReader, cfg: ModelConfig) -> None:
    """Every key-table tensor is present with the shape ``cfg`` implies (no data is read)."""
    for spec in key_table(cfg):
        if spec.hf not in ckpt:
            raise CheckpointError(ckpt.path, f"no tensor {spec.hf!r}, which a "
                                  f"{cfg.model_type} model with this config.json has")
        want, got = hf_shape(spec, cfg), ckpt.shape(spec.hf)
        if tuple(got) != tuple(want):
            raise CheckpointError(ckpt.file_of(spec.hf),
                                  f"tensor {spec.hf!r} has shape {tuple(got)}, config.json "
                                  f"implies {tuple(want)}")


def tokenizer_files(src: Path) -> list[Path]:
    """The tokenizer (and generation config) files checkpoint ``src`` has."""
    return [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
