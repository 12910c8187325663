"""Read and write PEFT LoRA adapter directories, refusing anything we would not apply faithfully.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
older pickled ``adapter_model.bin``)::

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
    adapter_model.safetensors:
      base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   (8, 4096)
      base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   (1024, 8)
      ...                        (a ``.default`` adapter name may follow lora_A / lora_B)

    >>> adapter = load_adapter("experts/qwen-conll04")
    >>> m = adapter.modules["model.layers.3.self_attn.q_proj"]
    >>> m.A.shape, m.B.shape, m.scale                  # (8, 3584), (512, 8), 2.0 = 16 / 8
    >>> save_adapter(adapter.with_B(new_bs), "out/fused")   # PeftModel.from_pretrained reads it

The per-module scale follows PEFT exactly: ``r`` and ``lora_alpha`` come from the first
``rank_pattern`` / ``alpha_pattern`` key (in file order) that matches the module name as
``(.*\\.)?(key)$``, else from ``r`` / ``lora_alpha``; scale = alpha / r, or alpha / sqrt(r) with
``use_rslora``. Everything is validated before `load_adapter` returns: config fields that change
the math (DoRA, LoRA bias, fan_in_fan_out, modules_to_save, ...), tensor names, A/B pairing,
shapes, ranks against the config, modules the config would not target, NaN/Inf.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bridge.checkpoint import SafetensorsFile, atomic_directory, read_json, write_json
from bridge.errors import AdapterError
from bridge.lora_adapter import LoraAdapter, LoraModule

__all__ = ["load_adapter", "save_adapter", "make_adapter_config", "module_rank_scale"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_FLOAT_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
)
_REFUSED_MODULES = ("lm_head", "embed_tokens")

# Config fields that change the forward when set (truthy). PEFT's defaults are all falsy.
_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA adapters are not supported",
    "fan_in_fan_out": "transposed (Conv1D-style) LoRA weights are not supported",
    "modules_to_save": "fully trained extra modules are not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "layer_replication": "layer replication is not supported",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "target_parameters": "LoRA on nn.Parameter targets is not supported",
}


# ------------------------------------------------------------------------------------------
# The config, resolved the way PEFT resolves it
# ------------------------------------------------------------------------------------------


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key (in order) matching ``(.*\\.)?(key)$``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


class _LoraSpec:
    """The fields of an adapter_config.json that decide which modules exist and their scale."""

    def __init__(self, config: Mapping[str, Any], file: Path | str) -> None:
        self.file = file
        _check_supported(config, file)
        self.r = config.get("r", 8)  # PEFT's LoraConfig defaults
        self.lora_alpha = config.get("lora_alpha", 8)
        self.use_rslora = config.get("use_rslora", False)
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self.target_modules = config.get("target_modules")
        self.exclude_modules = config.get("exclude_modules")
        self.layers_to_transform = config.get("layers_to_transform")
        self.layers_pattern = config.get("layers_pattern")
        self._check_types()

    def _fail(self, problem: str) -> AdapterError:
        return AdapterError(self.file, problem)

    def _check_types(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise self._fail(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha):
            raise self._fail(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not isinstance(self.use_rslora, bool):
            raise self._fail(f"use_rslora must be true or false, got {self.use_rslora!r}")
        for field, patterns, ok, what in (
            ("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v > 0, "positive ints"),
            ("alpha_pattern", self.alpha_pattern, _is_number, "numbers"),
        ):
            if not isinstance(patterns, dict):
                raise self._fail(f"{field} must be an object, got {patterns!r}")
            for key, value in patterns.items():
                if not ok(value):
                    raise self._fail(f"{field}[{key!r}] = {value!r}; values must be {what}")
                _check_regex(key, f"{field} key", self.file)
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, str):
                _check_regex(value, field, self.file)
            elif value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise self._fail(f"{field} must be a string or a list of strings, got {value!r}")
        for target in self.target_modules if isinstance(self.target_modules, list) else []:
            if target.rsplit(".", 1)[-1] in _REFUSED_MODULES:
                raise self._fail(
                    f"target_modules names {target!r}; LoRA on lm_head/embed_tokens "
                    "is not supported"
                )
        lt = self.layers_to_transform
        if lt is not None and not (_is_int(lt) or (isinstance(lt, list) and all(map(_is_int, lt)))):
            raise self._fail(f"layers_to_transform must be an int or a list of ints, got {lt!r}")

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of module ``name`` after rank_pattern / alpha_pattern."""
        r_key = _pattern_key(self.rank_pattern, name)
        a_key = _pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return r, alpha

    def scale(self, name: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, name: str) -> bool:
        """Whether PEFT's ``check_target_module_exists`` would give ``name`` a LoRA layer."""
        exclude = self.exclude_modules
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, name):
                    return False
            elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
                return False
        targets = self.target_modules
        if targets is None:
            return True  # PEFT fills a per-architecture default; we cannot know it here
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                return True
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True
        if not any(name.endswith(f".{t}") for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        patterns = self.layers_pattern
        if not patterns:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            m = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if m is not None:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    )


def _check_regex(pattern: str, what: str, file: Path | str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterError(file, f"{what} {pattern!r} is not a valid regex ({exc})") from exc


def _js(value: object) -> str:
    """A config value as it reads in the JSON file."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_supported(config: Mapping[str, Any], file: Path | str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(file, f"peft_type is {_js(peft_type)}; only LORA adapters are supported")
    bias = config.get("bias", "none")
    if bias not in ("none", None):
        raise AdapterError(file, f'bias is {_js(bias)}; only "none" is supported')
    for field, reason in _UNSUPPORTED.items():
        value = config.get(field)
        if value:
            raise AdapterError(file, f"{field} is {_js(value)}; {reason}")


# ------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------


def _module_of(key: str, file: Path) -> tuple[str, str, str | None]:
    """``(module, "lora_A" | "lora_B", adapter name or None)`` of a tensor key, or refuse it."""
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        raise AdapterError(file, f"tensor {key!r} is an embedding LoRA; not supported")
    m = _KEY_RE.match(key)
    if m is None:
        raise AdapterError(
            file, f"unexpected tensor {key!r}; only lora_A / lora_B weights are supported"
        )
    module = m.group("module").removeprefix(PREFIX)
    if module.rsplit(".", 1)[-1] in _REFUSED_MODULES:
        raise AdapterError(file, f"LoRA on {module} (lm_head/embed_tokens) is not supported")
    return module, m.group("kind"), m.group("adapter")


def _pair_keys(keys: list[str], file: Path) -> dict[str, dict[str, str]]:
    """Group tensor keys by module: ``{module: {"lora_A": key, "lora_B": key}}``."""
    pairs: dict[str, dict[str, str]] = collections.defaultdict(dict)
    adapters = set()
    for key in keys:
        module, kind, adapter = _module_of(key, file)
        adapters.add(adapter)
        if kind in pairs[module]:
            raise AdapterError(
                file, f"module {module} has two {kind} tensors ({pairs[module][kind]!r}, {key!r})"
            )
        pairs[module][kind] = key
    if len(adapters - {None}) > 1:
        names = ", ".join(sorted(a for a in adapters if a))
        raise AdapterError(file, f"tensors of several adapters ({names}); expected one")
    for module, kinds in pairs.items():
        for kind, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if kind in kinds and other not in kinds:
                raise AdapterError(file, f"module {module} has {kind} but no {other}")
    if not pairs:
        raise AdapterError(file, "no LoRA tensors")
    return dict(pairs)


def _check_module(name: str, A: np.ndarray, B: np.ndarray, file: Path) -> None:
    """Shapes, dtypes and finiteness of one module's factors."""
    for label, t in (("lora_A", A), ("lora_B", B)):
        if t.ndim != 2:
            raise AdapterError(file, f"{name}.{label} is {t.ndim}-D {t.shape}; expected 2-D")
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterError(file, f"{name}.{label} has dtype {t.dtype}; expected a float dtype")
    if A.shape[0] != B.shape[1]:
        raise AdapterError(
            file,
            f"{name}: lora_A {A.shape} and lora_B {B.shape} disagree on the rank "
            f"({A.shape[0]} != {B.shape[1]})",
        )
    for label, t in (("lora_A", A), ("lora_B", B)):
        if not np.isfinite(t).all():
            raise AdapterError(file, f"{name}.{label} contains NaN or Inf")


def _check_against_config(
    name: str, rank: int, spec: _LoraSpec, file: Path, scale: float | None = None
) -> None:
    """The module's rank (and scale, when given) must be what the config says."""
    r, _ = spec.rank_alpha(name)
    if rank != r:
        how = "rank_pattern" if _pattern_key(spec.rank_pattern, name) is not None else "r"
        raise AdapterError(file, f"{name} has rank {rank} but the config ({how}) says {r}")
    if scale is not None and not math.isclose(scale, spec.scale(name), rel_tol=1e-9):
        raise AdapterError(
            file, f"{name} has scale {scale} but the config gives {spec.scale(name)}"
        )
    if not spec.targets(name):
        raise AdapterError(
            file,
            f"{name} has LoRA weights but target_modules {spec.target_modules!r} does not "
            "select it (PEFT would silently drop them)",
        )


def _torch_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as numpy with the same dtype and bits (bf16 via ml_dtypes)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise AdapterError(
            file,
            "reading adapter_model.bin needs torch; install the `torch` extra "
            "(pip install 'hfjax[torch]') or convert the adapter to safetensors",
        ) from exc
    try:
        state = torch.load(os.fspath(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise AdapterError(file, f"not a readable torch state dict ({exc})") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(file, "expected a mapping of tensor names to tensors")
    _pair_keys(list(state), file)  # refuse bad names before converting anything
    return {k: _torch_to_numpy(v) for k, v in state.items()}


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(file, AdapterError) as st:
        keys = st.keys()
        _pair_keys(keys, file)  # refuse bad names from the header, before reading data
        return {k: st.read(k) for k in keys}


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def load_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory.

    Tensors keep their stored dtype (bf16 as ``ml_dtypes.bfloat16``). Keys may carry the
    ``base_model.model.`` prefix and an adapter name (``lora_A.default.weight``). Raises
    `AdapterError` naming the file and the problem for anything not applied faithfully.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(root, "not a directory (expected a PEFT adapter directory)")
    config_file = root / CONFIG_NAME
    config = read_json(config_file, AdapterError)
    spec = _LoraSpec(config, config_file)

    if (root / SAFETENSORS_NAME).is_file():
        weights_file = root / SAFETENSORS_NAME
        tensors = _read_safetensors(weights_file)
    elif (root / BIN_NAME).is_file():
        weights_file = root / BIN_NAME
        tensors = _read_bin(weights_file)
    else:
        raise AdapterError(root, f"no {SAFETENSORS_NAME} or {BIN_NAME}")

    modules = {}
    for name, keys in _pair_keys(list(tensors), weights_file).items():
        A, B = tensors[keys["lora_A"]], tensors[keys["lora_B"]]
        _check_module(name, A, B, weights_file)
        _check_against_config(name, int(A.shape[0]), spec, weights_file)
        modules[name] = LoraModule(name=name, A=A, B=B, scale=spec.scale(name))
    return LoraAdapter(config=config, modules=modules, path=str(root))


def make_adapter_config(
    *,
    r: int,
    lora_alpha: float,
    target_modules: list[str] | str,
    base_model_name_or_path: str = "",
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A fresh PEFT LoRA ``adapter_config.json`` dict (causal LM, inference mode).

    Pattern keys match module names as PEFT does (first matching key wins, in the given
    order, which `save_adapter` preserves).
    """
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(target_modules)
        if isinstance(target_modules, (list, tuple, set, frozenset))
        else target_modules,
        "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    _LoraSpec(config, "make_adapter_config")
    return config


def module_rank_scale(config: Mapping[str, Any], name: str) -> tuple[int, float]:
    """``(r, scale)`` PEFT gives module ``name`` (e.g. ``model.layers.3.self_attn.q_proj``).

    Use it to build `LoraModule`s for a config from `make_adapter_config`; raises
    `AdapterError` for a config PEFT LoRA semantics do not cover.
    """
    spec = _LoraSpec({"peft_type": "LORA", **config}, "adapter config")
    return spec.rank_alpha(name)[0], spec.scale(name)


def save_adapter(
    adapter: LoraAdapter, path: str | os.PathLike[str], *, dtype: Any = None
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    ``adapter_config.json`` is ``adapter.config`` with ``inference_mode: true`` and any missing
    field PEFT needs filled in (r / lora_alpha / target_modules from the modules themselves);
    every module's rank and scale must agree with it. Tensors are stored as
    ``base_model.model.<module>.lora_{A,B}.weight`` in their own dtype, or ``dtype`` if given.
    The directory is written beside ``path`` and renamed into place (replacing an existing one).
    """
    dest = Path(path)
    config_file, weights_file = dest / CONFIG_NAME, dest / SAFETENSORS_NAME
    if not adapter.modules:
        raise AdapterError(weights_file, "adapter has no modules")
    cast = None
    if dtype is not None:
        cast = np.dtype(dtype)
        if cast not in _FLOAT_DTYPES:
            raise AdapterError(weights_file, f"dtype {cast} is not a float dtype")
    config = _export_config(adapter, config_file)
    spec = _LoraSpec(config, config_file)

    tensors: dict[str, np.ndarray] = {}
    for name, m in adapter.modules.items():
        if name.startswith(PREFIX) or re.search(r"\.lora_[AB](\.|$)", name) or name != m.name:
            raise AdapterError(weights_file, f"bad module name {name!r} (module.name {m.name!r})")
        _module_of(f"{name}.lora_A.weight", weights_file)  # refuse lm_head / embed_tokens
        A, B = np.asarray(m.A), np.asarray(m.B)
        if cast is not None:
            with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
                A, B = A.astype(cast), B.astype(cast)
        _check_module(name, A, B, weights_file)
        _check_against_config(name, int(A.shape[0]), spec, config_file, scale=m.scale)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.asarray(A, order="C")
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.asarray(B, order="C")

    with atomic_directory(dest, AdapterError) as tmp:
        write_json(tmp / CONFIG_NAME, config, sort_keys=False)
        save_file(tensors, os.fspath(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    return dest


def _export_config(adapter: LoraAdapter, file: Path) -> dict[str, Any]:
    """``adapter.config`` with the fields PEFT needs filled, top-level keys sorted.

    Nested dicts keep their order: ``rank_pattern`` / ``alpha_pattern`` are first-match-wins.
    """
    cfg = dict(adapter.config)
    mods = list(adapter.modules.values())
    use_rslora = cfg.setdefault("use_rslora", False)
    if "r" not in cfg:
        cfg["r"], extra = _common_value({m.name: m.rank for m in mods})
        cfg["rank_pattern"] = {**extra, **(cfg.get("rank_pattern") or {})}
    if "lora_alpha" not in cfg:
        spec_r = _LoraSpec({**cfg, "peft_type": "LORA"}, file)
        alphas = {}
        for m in mods:
            r, _ = spec_r.rank_alpha(m.name)
            alpha = m.scale * (math.sqrt(r) if use_rslora else r)
            alphas[m.name] = int(round(alpha)) if math.isclose(alpha, round(alpha)) else alpha
        cfg["lora_alpha"], extra = _common_value(alphas)
        cfg["alpha_pattern"] = {**extra, **(cfg.get("alpha_pattern") or {})}
    if cfg.get("target_modules") is None:  # None: PEFT would guess per architecture
        cfg["target_modules"] = sorted({m.module_type for m in mods})
    for key, value in (
        ("peft_type", "LORA"),
        ("task_type", "CAUSAL_LM"),
        ("base_model_name_or_path", None),
        ("bias", "none"),
        ("fan_in_fan_out", False),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
    ):
        cfg.setdefault(key, value)
    cfg["inference_mode"] = True
    try:
        json.dumps(cfg)
    except (TypeError, ValueError) as exc:
        raise AdapterError(file, f"config is not JSON-serialisable ({exc})") from exc
    return {k: cfg[k] for k in sorted(cfg)}


def _common_value(per_module: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and exact-name patterns for the modules that differ."""
    counts = collections.Counter(per_module.values())
    common = max(counts, key=lambda v: (counts[v], -v))
    extra = {re.escape(name): v for name, v in per_module.items() if v != common}
    return common, extra
