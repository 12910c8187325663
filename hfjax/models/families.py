"""The one table of the families hfjax runs as targets: HF architecture, chat template, deltas.

Everything that depends on the family by name reads this table (the "auto" chat template,
the architecture written into exported checkpoints, the README's family list); the math of
each delta lives in `ModelConfig` fields and the decoder, the parameter names in
`hfjax.models.key_tables`.
"""

from __future__ import annotations

import dataclasses

from hfjax.models.key_tables import ATTN_PROJECTIONS, MLP_PROJECTIONS

__all__ = ["ALL_LINEAR", "FAMILIES", "Family", "family", "markdown_table", "template_for"]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # HF config.json `model_type`
    architecture: str  # HF `architectures[0]` of a causal LM of this family
    template: str  # name in `hfjax.training.templates.TEMPLATES` ("auto" resolves to it)
    deltas: str  # one line: how the family differs from the Llama core


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "llama3",
               "(core) optional attention / MLP biases; Llama 3 rope scaling"),
        Family("qwen2", "Qwen2ForCausalLM", "qwen",
               "q/k/v biases; optional sliding window on some layers"),
        Family("mistral", "MistralForCausalLM", "mistral", "sliding-window attention"),
        Family("qwen3", "Qwen3ForCausalLM", "qwen",
               "per-head q/k RMSNorm before RoPE; no q/k/v bias; optional sliding layers"),
        Family("gemma2", "Gemma2ForCausalLM", "gemma",
               "scaled embeddings; (1 + w) norms around attention and MLP; tanh GeGLU; "
               "attention and logit soft-capping; alternating sliding/global layers"),
        Family("gemma3_text", "Gemma3ForCausalLM", "gemma",
               "Gemma 2 without soft-capping; per-head q/k norms; local/global RoPE bases"),
        Family("olmo2", "Olmo2ForCausalLM", "olmo",
               "norms after attention and MLP (none before); q/k RMSNorm over the projection"),
    )
}

# Every linear projection of a decoder layer that a LoRA may target, in key-table order.
ALL_LINEAR: tuple[str, ...] = ATTN_PROJECTIONS + MLP_PROJECTIONS


def family(model_type: str) -> Family:
    """The family row of ``model_type``; a `ModelConfigError` naming the supported ones."""
    from hfjax.models.config import ModelConfigError

    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ModelConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        ) from None


def template_for(model_type: str) -> str:
    """The chat template "auto" means for ``model_type``."""
    return family(model_type).template


def markdown_table() -> str:
    """The README's "Supported models" table, one row per family (a test keeps them equal)."""
    lines = ["| `model_type` | architecture | `auto` chat template | deltas from the Llama core |",
             "|---|---|---|---|"]
    lines += [f"| `{f.model_type}` | `{f.architecture}` | `{f.template}` | {f.deltas} |"
              for f in FAMILIES.values()]
    return "\n".join(lines)
