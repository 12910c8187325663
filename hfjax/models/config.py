"""ModelConfig: the one config of the llama-like decoder, with the family deltas as fields.

Families are deltas of Llama (STYLE habit 1):

| family  | delta                                                        |
|---------|--------------------------------------------------------------|
| llama   | (core) optional q/k/v/o and MLP biases; Llama 3 rope scaling |
| qwen2   | q/k/v biases; optional sliding window on some layers         |
| mistral | sliding-window attention on every layer                      |
| qwen3   | per-head RMSNorm on q and k before RoPE; qwen2's sliding layers  |
| gemma2  | sqrt(D)-scaled embeddings; (1 + w) norms before and after attn  |
|         | and MLP; tanh GeGLU; query_pre_attn_scalar; attention and final |
|         | logit soft-capping; alternating sliding/global layers           |
| gemma3_text | gemma2 without soft-capping, plus per-head q/k norms and a   |
|         | separate RoPE base (and optional linear scaling) per layer type  |
| olmo2   | norms after attention and MLP (not before); q/k RMSNorm over   |
|         | the whole projection                                           |

`from_hf` reads a Hugging Face `config.json` (through transformers' own config classes, so
old-style `rope_theta`/`rope_scaling` fields are normalised the way transformers does) and
**refuses by name** every attribute that would change the math and that we do not implement.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hfjax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text",
                         "olmo2")  # the rows of models/families.py
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ModelConfigError(UserError):
    """An HF config that we cannot run faithfully (one line, naming the file and the field)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # a row of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama 3 rope scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE. Stored as a sorted tuple so
    # the config stays hashable (it is a static argument of jitted functions).
    rope_llama3: tuple[tuple[str, float], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2; Llama attention_bias)
    o_bias: bool = False  # o_proj has a bias (Llama attention_bias)
    mlp_bias: bool = False  # gate/up/down have biases (Llama mlp_bias)
    # Per-layer sliding window (None = full causal attention on that layer).
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # --- deltas of the newer families; the defaults are the Llama core ---
    # RMSNorm flavour: "llama" w * cast(x_hat); "f32" cast(w * x_hat) (OLMo 2);
    # "gemma" cast((1 + w) * x_hat), the weight stored as an offset from 1 (Gemma 2/3).
    norm_kind: str = "llama"
    # Where a layer's norms sit: "pre" (before attn and MLP), "sandwich" (before and after
    # both, Gemma), "post" (after both, on the branch output, OLMo 2).
    layer_norms: str = "pre"
    # RMSNorm on q and k: "" none, "head" per head before RoPE (Qwen3, Gemma 3), "full" over
    # the whole q / k projection before the head split (OLMo 2).
    qk_norm: str = ""
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    mlp_act: str = "silu"  # gate activation: "silu" | "gelu_tanh" (Gemma's GeGLU)
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None  # tanh soft-capping of attention scores (Gemma 2)
    final_softcap: float | None = None  # tanh soft-capping of the logits (Gemma 2)
    # RoPE base of sliding-window layers when it differs from rope_theta (Gemma 3's local
    # base); None = every layer uses rope_theta.
    rope_local_theta: float | None = None
    # Linear RoPE scaling factor (positions divided by it) of the full-attention layers
    # (rope_type "linear"; Gemma 3 4B+); 1.0 = none.
    rope_linear_factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ------------------------------------------------------------------ HF <-> ours
    @classmethod
    def from_hf(cls, hf: Any, *, source: str = "config.json") -> ModelConfig:
        """From a transformers `PretrainedConfig`, a config dict, or a checkpoint directory."""
        hf = _as_hf_config(hf, source)
        where = source
        mt = getattr(hf, "model_type", None)
        _check_model_type(mt, where)
        _refuse_unsupported(hf, where)
        n_layers = hf.num_hidden_layers
        heads = hf.num_attention_heads
        kv = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        local_theta = None
        if mt == "gemma3_text":  # transformers 5: one rope dict per layer type
            local = dict(rope.get("sliding_attention") or {})
            rope = dict(rope.get("full_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise ModelConfigError(
                    f"{where}: rope_parameters.sliding_attention.rope_type "
                    f"{local['rope_type']!r} is not supported (only 'default')")
            local_theta = float(local.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        llama3 = None
        linear = 1.0
        if rope_type == "linear":
            linear = float(rope["factor"])
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ModelConfigError(f"{where}: llama3 rope_parameters lack {missing}")
            llama3 = tuple(sorted((k, float(rope[k])) for k in keys))
        elif rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"{where}: rope type {rope_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelConfigError(f"{where}: partial_rotary_factor != 1 is not supported")

        windows: tuple[int | None, ...]
        if mt == "mistral":
            w = getattr(hf, "sliding_window", None)
            windows = (w,) * n_layers
        elif mt in ("qwen2", "qwen3"):
            w = getattr(hf, "sliding_window", None)
            types = getattr(hf, "layer_types", None) or ["full_attention"] * n_layers
            use = getattr(hf, "use_sliding_window", False)
            windows = tuple(
                w if (use and t == "sliding_attention" and w) else None for t in types
            )
        elif mt in ("gemma2", "gemma3_text"):
            w = getattr(hf, "sliding_window", None)
            windows = tuple(w if t == "sliding_attention" else None for t in hf.layer_types)
        else:
            windows = (None,) * n_layers
        deltas = _family_deltas(hf, mt)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=theta,
            rope_llama3=llama3,
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2") or attention_bias,
            o_bias=attention_bias and mt == "llama",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)) and mt == "llama",
            sliding_windows=windows,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=_eos(getattr(hf, "eos_token_id", None)),
            pad_token_id=getattr(hf, "pad_token_id", None),
            rope_local_theta=local_theta,
            rope_linear_factor=linear,
            **deltas,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers reads back into the same model."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_linear_factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": self.rope_theta,
                    "factor": self.rope_linear_factor}
        if self.rope_llama3 is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dict(self.rope_llama3)}
            rope["original_max_position_embeddings"] = int(
                rope["original_max_position_embeddings"]
            )
        from hfjax.models.families import family

        arch = family(self.model_type).architecture
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu" if self.mlp_act == "silu" else "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_windows[0] if self.sliding_windows else None
        if self.model_type in ("qwen2", "qwen3"):
            ws = [w for w in self.sliding_windows if w]
            d["use_sliding_window"] = bool(ws)
            d["sliding_window"] = ws[0] if ws else None
            d["layer_types"] = ["sliding_attention" if w else "full_attention"
                                for w in self.sliding_windows]
            d["max_window_layers"] = self.num_hidden_layers
        if self.model_type in ("gemma2", "gemma3_text"):
            ws = [w for w in self.sliding_windows if w]
            d.pop("hidden_act")
            d["hidden_activation"] = "gelu_pytorch_tanh"
            d["sliding_window"] = ws[0] if ws else None
            d["layer_types"] = ["sliding_attention" if w else "full_attention"
                                for w in self.sliding_windows]
            qpas = self.query_pre_attn_scalar  # transformers types it as int
            d["query_pre_attn_scalar"] = int(qpas) if qpas and float(qpas).is_integer() else qpas
            d["attn_logit_softcapping"] = self.attn_softcap
            d["final_logit_softcapping"] = self.final_softcap
        if self.model_type == "gemma3_text":
            d["rope_parameters"] = {
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": self.rope_local_theta or self.rope_theta}}
        return d


# The math of each newer family, as ModelConfig fields (Llama's defaults elsewhere).
_GEMMA = dict(norm_kind="gemma", layer_norms="sandwich", embed_scale=True, mlp_act="gelu_tanh")


def _family_deltas(hf: Any, mt: str) -> dict[str, Any]:
    if mt == "qwen3":
        return {"qk_norm": "head"}
    if mt == "olmo2":
        return {"norm_kind": "f32", "layer_norms": "post", "qk_norm": "full"}
    if mt == "gemma2":
        return {**_GEMMA, "query_pre_attn_scalar": float(hf.query_pre_attn_scalar),
                "attn_softcap": _opt_float(hf.attn_logit_softcapping),
                "final_softcap": _opt_float(hf.final_logit_softcapping)}
    if mt == "gemma3_text":
        # transformers' Gemma 3 attention ignores attn_logit_softcapping; so do we.
        return {**_GEMMA, "qk_norm": "head",
                "query_pre_attn_scalar": float(hf.query_pre_attn_scalar),
                "final_softcap": _opt_float(hf.final_logit_softcapping)}
    return {}


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _eos(x: Any) -> int | tuple[int, ...] | None:
    if isinstance(x, list | tuple):
        return tuple(int(v) for v in x)
    return x


def _check_model_type(mt: Any, where: str) -> None:
    if mt in _REFUSED_MODEL_TYPES:
        raise ModelConfigError(f"{where}: model_type {mt!r}: {_REFUSED_MODEL_TYPES[mt]}")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{where}: model_type {mt!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _as_hf_config(hf: Any, source: str) -> Any:
    import transformers

    if isinstance(hf, str | Path):
        path = Path(hf)
        cfg_file = path / "config.json" if path.is_dir() else path
        try:
            hf = json.loads(cfg_file.read_text())
        except FileNotFoundError as e:
            raise ModelConfigError(f"{cfg_file}: config file not found") from e
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_file}: invalid JSON ({e.msg}, line {e.lineno})") from e
    if isinstance(hf, dict):
        mt = hf.get("model_type")
        _check_model_type(mt, source)
        d = dict(hf)
        d.pop("model_type", None)
        hf = transformers.AutoConfig.for_model(mt, **d)
    return hf


_NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "olmo2")
# model_types of other wrappers / variants, refused with a pointer to what we run instead.
_REFUSED_MODEL_TYPES = {
    "gemma3": "Gemma3ForConditionalGeneration (the vision tower) is not supported; use a "
              "text-only gemma3_text checkpoint (Gemma3ForCausalLM)",
    "qwen3_moe": "Qwen3 MoE is not supported (dense qwen3 only)",
    "qwen2_moe": "Qwen2 MoE is not supported (dense qwen2 only)",
    "olmoe": "OLMoE is not supported (dense olmo2 only)",
}

# Attributes whose non-default values change the math and that we do not implement.
_MUST_EQUAL: dict[str, Any] = {
    "hidden_act": "silu",
    "pretraining_tp": 1,
    "attention_dropout": 0.0,
}


def _refuse_unsupported(hf: Any, where: str) -> None:
    for name, expected in _MUST_EQUAL.items():
        if hasattr(hf, name):
            v = getattr(hf, name)
            if v is not None and v != expected:
                raise ModelConfigError(
                    f"{where}: {name}={v!r} is not supported (only {expected!r})"
                )
    qc = getattr(hf, "quantization_config", None)
    if qc:
        raise ModelConfigError(f"{where}: quantization_config is not supported (dequantize first)")
    mt = getattr(hf, "model_type", None)
    if mt in _NEW_FAMILIES and getattr(hf, "attention_bias", False):
        raise ModelConfigError(f"{where}: attention_bias=True is not supported for {mt}")
    if mt in ("gemma2", "gemma3_text"):
        act = getattr(hf, "hidden_activation", None)
        if act != "gelu_pytorch_tanh":
            raise ModelConfigError(f"{where}: hidden_activation={act!r} is not supported "
                                   "(only 'gelu_pytorch_tanh')")
        if getattr(hf, "use_bidirectional_attention", False):
            raise ModelConfigError(f"{where}: use_bidirectional_attention is not supported")
    if mt in ("qwen2", "qwen3") and getattr(hf, "use_sliding_window", False):
        types = getattr(hf, "layer_types", None)
        if not types:
            raise ModelConfigError(f"{where}: use_sliding_window without layer_types")
