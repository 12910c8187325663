"""bridge.load_adapter / save_adapter / make_adapter_config against PEFT itself.

Torch/PEFT tests build a tiny random Llama, wrap it with ``get_peft_model`` (non-zero B via
``init_lora_weights=False``) and compare tensors and ``scaling`` with what PEFT loads. The
refusal tests write adapter directories by hand with numpy and need neither.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bridge
import bridge.peft_io
from bridge import (
    AdapterError,
    LoraAdapter,
    LoraModule,
    load_adapter,
    make_adapter_config,
    module_rank_scale,
    save_adapter,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
PREFIX = "base_model.model."

# ------------------------------------------------------------------------------------------
# Helpers: PEFT side
# ------------------------------------------------------------------------------------------


def _tiny_llama(dtype: Any = None) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model.to(dtype) if dtype is not None else model


def _peft_adapter(out: Path, *, dtype: Any = None, safe: bool = True, **lora_kw: Any) -> Any:
    """Save a PEFT LoRA of the tiny Llama to ``out``; return the PeftModel."""
    import peft
    import torch

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    kw.update(lora_kw)
    model = peft.get_peft_model(
        _tiny_llama(dtype), peft.LoraConfig(**kw), autocast_adapter_dtype=False
    )
    torch.manual_seed(1)
    model.save_pretrained(out, safe_serialization=safe)
    return model


def _peft_load(path: Path, dtype: Any = None) -> Any:
    import peft

    return peft.PeftModel.from_pretrained(_tiny_llama(dtype), path, autocast_adapter_dtype=False)


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()


def _peft_lora(model: Any) -> dict[str, dict[str, Any]]:
    """``{module: {"A", "B", "scale"}}`` of every LoRA layer of a PeftModel (adapter "default")."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[name.removeprefix(PREFIX)] = {
                "A": _to_numpy(mod.lora_A["default"].weight),
                "B": _to_numpy(mod.lora_B["default"].weight),
                "scale": mod.scaling["default"],
            }
    return out


def _assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _assert_matches_peft(adapter: LoraAdapter, model: Any) -> None:
    lora = _peft_lora(model)
    assert list(adapter.modules) == sorted(lora, key=lambda n: (int(n.split(".")[2]), n))
    for name, m in adapter.modules.items():
        _assert_same_bits(m.A, lora[name]["A"])
        _assert_same_bits(m.B, lora[name]["B"])
        assert m.scale == lora[name]["scale"], name


# ------------------------------------------------------------------------------------------
# Loading what PEFT wrote
# ------------------------------------------------------------------------------------------


def test_load_peft_safetensors_with_and_without_adapter_name(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    model = _peft_adapter(tmp_path / "plain")
    adapter = load_adapter(tmp_path / "plain")
    assert list(adapter.modules)[:2] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    ]
    assert adapter.num_layers == 2 and adapter.path == str(tmp_path / "plain")
    m = adapter.modules["model.layers.1.self_attn.v_proj"]
    assert (m.rank, m.d_in, m.d_out, m.scale) == (4, 32, 16, 2.0)
    assert any(np.abs(m.B).max() > 0 for m in adapter.modules.values())  # B is not zero
    _assert_matches_peft(adapter, model)

    # The same tensors keyed with PEFT's in-memory adapter name.
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "adapter_config.json").write_text(
        (tmp_path / "plain" / "adapter_config.json").read_text()
    )
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    named = {k.replace(".weight", ".default.weight"): v for k, v in plain.items()}
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in named)
    save_file(named, tmp_path / "named" / "adapter_model.safetensors")
    again = load_adapter(tmp_path / "named")
    assert list(again.modules) == list(adapter.modules)
    for name, m in again.modules.items():
        _assert_same_bits(m.A, adapter.modules[name].A)
        _assert_same_bits(m.B, adapter.modules[name].B)


def test_load_peft_bin(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import torch

    model = _peft_adapter(tmp_path / "bin", dtype=torch.bfloat16, safe=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    adapter = load_adapter(tmp_path / "bin")
    assert {m.A.dtype for m in adapter.modules.values()} == {BF16}
    _assert_matches_peft(adapter, model)

    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: not a readable torch state"):
        load_adapter(tmp_path / "bin")


@pytest.mark.parametrize(
    "lora_kw",
    [
        pytest.param({}, id="plain"),
        pytest.param({"use_rslora": True, "r": 8, "lora_alpha": 5}, id="rslora"),
        pytest.param(
            {
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "lora_alpha": 16,
                # First match wins, in file order (PEFT writes the JSON with sorted keys).
                "rank_pattern": {"layers.1.self_attn.q_proj": 6, "q_proj": 2},
                "alpha_pattern": {"down_proj": 3, "model.layers.0.self_attn.v_proj": 7.5},
                "use_rslora": True,
            },
            id="patterns+rslora",
        ),
        pytest.param(
            {"rank_pattern": {"^model.layers.1.*": 3}, "alpha_pattern": {"v_proj": 2}},
            id="regex-patterns",
        ),
    ],
)
def test_scales_match_peft(tmp_path: Path, lora_kw: dict[str, Any]) -> None:
    pytest.importorskip("peft")
    _peft_adapter(tmp_path / "a", **lora_kw)
    adapter = load_adapter(tmp_path / "a")
    reloaded = _peft_load(tmp_path / "a")  # what PEFT makes of the file, not its memory
    _assert_matches_peft(adapter, reloaded)


def test_patterns_resolve_as_documented(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    _peft_adapter(
        tmp_path / "a", target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=16,
        use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 6, "q_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    mods = load_adapter(tmp_path / "a").modules
    assert mods["model.layers.1.self_attn.q_proj"].rank == 6
    assert mods["model.layers.1.self_attn.q_proj"].scale == 16 / 6**0.5
    assert mods["model.layers.0.self_attn.q_proj"].scale == 16 / 2**0.5
    assert mods["model.layers.0.mlp.down_proj"].scale == 3 / 4**0.5
    assert mods["model.layers.0.self_attn.v_proj"].scale == 16 / 2.0


# ------------------------------------------------------------------------------------------
# Saving: PEFT reads it back bit-exactly
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_save_loads_in_peft_bit_exact(tmp_path: Path, dtype_name: str) -> None:
    pytest.importorskip("peft")
    import peft
    import torch

    dtype = getattr(torch, dtype_name)
    original = _peft_adapter(
        tmp_path / "orig", dtype=dtype, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 12},
    )
    adapter = load_adapter(tmp_path / "orig")
    assert {m.B.dtype for m in adapter.modules.values()} == {np.dtype(dtype_name)
                                                             if dtype_name == "float32" else BF16}
    out = save_adapter(adapter, tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(load_file(out / "adapter_model.safetensors")) == sorted(
        f"{PREFIX}{n}.lora_{x}.weight" for n in adapter.modules for x in "AB"
    )

    # PEFT loads every tensor bit-exactly, with the same scales.
    reloaded = _peft_load(out, dtype)
    sd_orig = {k: v for k, v in original.state_dict().items() if "lora_" in k}
    sd_new = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert sd_orig.keys() == sd_new.keys() and len(sd_orig) == 2 * len(adapter.modules)
    for k, v in sd_orig.items():
        assert v.dtype == sd_new[k].dtype and torch.equal(v, sd_new[k]), k
    _assert_matches_peft(adapter, reloaded)

    # PEFT reads the config the same way.
    cfg_orig = peft.LoraConfig.from_pretrained(tmp_path / "orig").to_dict()
    cfg_new = peft.LoraConfig.from_pretrained(out).to_dict()
    assert cfg_new == cfg_orig

    # load -> save -> load is bit-identical.
    again = load_adapter(out)
    assert again.config == adapter.config
    for name, m in adapter.modules.items():
        _assert_same_bits(again.modules[name].A, m.A)
        _assert_same_bits(again.modules[name].B, m.B)
        assert again.modules[name].scale == m.scale


def test_save_with_dtype_and_with_B(tmp_path: Path) -> None:
    adapter = load_adapter(_write_adapter(tmp_path / "a"))
    name = "model.layers.1.self_attn.q_proj"
    new_b = np.full_like(adapter.modules[name].B, 0.5)
    fused = adapter.with_B({name: new_b})
    save_adapter(fused, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    back = load_adapter(tmp_path / "bf16")
    assert {m.A.dtype for m in back.modules.values()} == {BF16}
    _assert_same_bits(back.modules[name].B, new_b.astype(BF16))
    other = "model.layers.0.self_attn.v_proj"
    _assert_same_bits(back.modules[other].A, adapter.modules[other].A.astype(BF16))
    assert back.modules[name].scale == adapter.modules[name].scale


def test_make_adapter_config_is_read_by_peft(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import peft

    config = make_adapter_config(
        r=4, lora_alpha=16, target_modules=["v_proj", "q_proj"], use_rslora=True,
        base_model_name_or_path="tiny-llama", alpha_pattern={"v_proj": 3},
        rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6},
    )
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    rng = np.random.default_rng(0)
    modules = {}
    for layer in range(2):
        for proj, d_out in (("q_proj", 32), ("v_proj", 16)):
            name = f"model.layers.{layer}.self_attn.{proj}"
            r, scale = module_rank_scale(config, name)
            A = rng.standard_normal((r, 32), dtype=np.float32)
            B = rng.standard_normal((d_out, r), dtype=np.float32)
            modules[name] = LoraModule(name, A, B, scale)
    # q_proj comes first, so it wins over the later layer-1 pattern; save keeps that order.
    assert modules["model.layers.1.self_attn.q_proj"].rank == 2
    save_adapter(LoraAdapter(config=config, modules=modules), tmp_path / "new")
    text = (tmp_path / "new" / "adapter_config.json").read_text()
    assert list(json.loads(text)["rank_pattern"]) == ["q_proj", "layers.1.self_attn.q_proj"]

    cfg = peft.LoraConfig.from_pretrained(tmp_path / "new")
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.target_modules) == (
        4, 16, True, {"q_proj", "v_proj"}
    )
    assert (cfg.rank_pattern, cfg.alpha_pattern) == (config["rank_pattern"], {"v_proj": 3})
    assert cfg.base_model_name_or_path == "tiny-llama" and cfg.task_type == "CAUSAL_LM"
    _assert_matches_peft(load_adapter(tmp_path / "new"), _peft_load(tmp_path / "new"))


def test_save_fills_missing_config_fields(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    rng = np.random.default_rng(0)
    modules = {}
    for layer, (r, scale) in enumerate([(4, 2.0), (4, 2.0), (2, 1.5)]):
        name = f"model.layers.{layer}.mlp.down_proj"
        A = rng.standard_normal((r, 64), dtype=np.float32)
        B = rng.standard_normal((32, r), dtype=np.float32)
        modules[name] = LoraModule(name, A, B, scale)
    save_adapter(LoraAdapter(config={}, modules=modules), tmp_path / "filled")
    cfg = json.loads((tmp_path / "filled" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8, ["down_proj"])
    assert cfg["rank_pattern"] == {r"model\.layers\.2\.mlp\.down_proj": 2}
    assert cfg["alpha_pattern"] == {r"model\.layers\.2\.mlp\.down_proj": 3}
    back = load_adapter(tmp_path / "filled")
    assert {n: m.scale for n, m in back.modules.items()} == {n: m.scale for n, m in modules.items()}


# ------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------


def _failing_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
    Path(filename).write_bytes(b"partial")
    raise OSError("disk full (simulated)")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = load_adapter(_write_adapter(tmp_path / "src"))
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    monkeypatch.setattr(bridge.peft_io, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapter, out_parent / "fused")
    assert os.listdir(out_parent) == []  # no destination, no temp leftovers

    # Replacing an existing adapter: a failure leaves the old one intact...
    monkeypatch.undo()
    save_adapter(adapter, out_parent / "fused")
    before = (out_parent / "fused" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(bridge.peft_io, "save_file", _failing_save_file)
    changed = adapter.with_B({n: m.B * 2 for n, m in adapter.modules.items()})
    with pytest.raises(OSError, match="disk full"):
        save_adapter(changed, out_parent / "fused")
    assert os.listdir(out_parent) == ["fused"]
    assert (out_parent / "fused" / "adapter_model.safetensors").read_bytes() == before
    # ...and a success replaces it.
    monkeypatch.undo()
    save_adapter(changed, out_parent / "fused")
    assert os.listdir(out_parent) == ["fused"]
    name = next(iter(changed.modules))
    _assert_same_bits(load_adapter(out_parent / "fused").modules[name].B,
                      changed.modules[name].B)


# ------------------------------------------------------------------------------------------
# Refusals (no torch): hand-written adapter directories
# ------------------------------------------------------------------------------------------


def _good_tensors(r: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for layer in range(2):
        for proj, d_out in (("q_proj", 32), ("v_proj", 16)):
            stem = f"{PREFIX}model.layers.{layer}.self_attn.{proj}"
            out[f"{stem}.lora_A.weight"] = rng.standard_normal((r, 32), dtype=np.float32)
            out[f"{stem}.lora_B.weight"] = rng.standard_normal((d_out, r), dtype=np.float32)
    return out


def _write_adapter(
    path: Path,
    config: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    **overrides: Any,
) -> Path:
    path.mkdir(parents=True)
    config = dict(config or make_adapter_config(r=4, lora_alpha=8,
                                                target_modules=["q_proj", "v_proj"]))
    config.update(overrides)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(_good_tensors() if tensors is None else tensors,
              path / "adapter_model.safetensors")
    return path


QA = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
QB = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"


def _edit(**changes: Any) -> dict[str, np.ndarray]:
    """Good tensors with keys replaced (value) or removed (None)."""
    t = _good_tensors()
    for key, value in changes.items():
        t.pop(key)
        if value is not None:
            t[value[0]] = value[1]
    return t


def _with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    t = _good_tensors()
    t[key] = value
    return t


def _nan_b() -> dict[str, np.ndarray]:
    t = _good_tensors()
    t[QB][3, 1] = np.nan
    return t


def _inf_a_bf16() -> dict[str, np.ndarray]:
    t = {k: v.astype(BF16) for k, v in _good_tensors().items()}
    t[QA][0, 0] = np.inf
    return t


CONFIG_REFUSALS = [
    ("peft_type", {"peft_type": "IA3"}, r'peft_type is "IA3"; only LORA'),
    ("use_dora", {"use_dora": True}, r"use_dora is true; DoRA"),
    ("fan_in_fan_out", {"fan_in_fan_out": True}, r"fan_in_fan_out is true"),
    ("bias", {"bias": "lora_only"}, r'bias is "lora_only"; only "none"'),
    ("modules_to_save", {"modules_to_save": ["score"]}, r'modules_to_save is \["score"\]'),
    ("lora_bias", {"lora_bias": True}, r"lora_bias is true"),
    ("layer_replication", {"layer_replication": [[0, 2]]}, r"layer_replication is"),
    ("megatron_config", {"megatron_config": {"tp": 2}}, r"megatron_config is"),
    ("trainable_tokens", {"trainable_token_indices": [1, 2]}, r"trainable_token_indices is"),
    ("alora", {"alora_invocation_tokens": [5]}, r"alora_invocation_tokens is"),
    ("target_parameters", {"target_parameters": ["experts.w"]}, r"target_parameters is"),
    ("target_lm_head", {"target_modules": ["q_proj", "v_proj", "lm_head"]},
     r"target_modules names 'lm_head'"),
    ("r_type", {"r": "4"}, r"r must be a positive integer, got '4'"),
    ("rank_pattern_value", {"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] = 0"),
    ("bad_regex", {"alpha_pattern": {"q_proj(": 2}},
     r"alpha_pattern key 'q_proj\(' is not a valid"),
]

WEIGHT_REFUSALS = [
    ("embedding_lora", _with(f"{PREFIX}model.embed_tokens.lora_embedding_A",
                             np.ones((4, 128), np.float32)), r"lora_embedding_A.* embedding LoRA"),
    ("lm_head_lora", _with(f"{PREFIX}lm_head.lora_A.weight", np.ones((4, 32), np.float32)),
     r"LoRA on lm_head"),
    ("dora_magnitude", _with(f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                             np.ones(32, np.float32)),
     r"unexpected tensor '.*q_proj\.lora_magnitude_vector'; only lora_A / lora_B"),
    ("lora_bias_tensor", _with(f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.bias",
                               np.ones(32, np.float32)), r"unexpected tensor '.*lora_B\.bias'"),
    ("A_without_B", _edit(**{QB: None}),
     r"module model\.layers\.0\.self_attn\.q_proj has lora_A but no lora_B"),
    ("B_without_A", _edit(**{QA: None}), r"q_proj has lora_B but no lora_A"),
    ("A_3d", _with(QA, np.ones((4, 32, 1), np.float32)), r"q_proj\.lora_A is 3-D .*expected 2-D"),
    ("B_1d", _with(QB, np.ones(32, np.float32)), r"q_proj\.lora_B is 1-D"),
    ("rank_disagrees", _with(QB, np.ones((32, 3), np.float32)),
     r"q_proj: lora_A \(4, 32\) and lora_B \(32, 3\) disagree on the rank"),
    ("int_dtype", _with(QB, np.ones((32, 4), np.int32)), r"q_proj\.lora_B has dtype int32"),
    ("nan", _nan_b(), r"q_proj\.lora_B contains NaN or Inf"),
    ("inf_bf16", _inf_a_bf16(), r"q_proj\.lora_A contains NaN or Inf"),
    ("two_adapters", _with(QA.replace(".weight", ".other.weight"), np.ones((4, 32), np.float32)),
     r"two lora_A tensors"),
    ("several_adapter_names", {k.replace(".weight", ".default.weight") if "q_proj" in k
                               else k.replace(".weight", ".other.weight"): v
                               for k, v in _good_tensors().items()},
     r"tensors of several adapters \(default, other\)"),
    ("not_targeted", _with(f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight",
                           np.ones((4, 32), np.float32)) | {
        f"{PREFIX}model.layers.0.mlp.up_proj.lora_B.weight": np.ones((64, 4), np.float32)},
     r"model\.layers\.0\.mlp\.up_proj has LoRA weights but target_modules .* does not select"),
]


@pytest.mark.parametrize("overrides,problem", [c[1:] for c in CONFIG_REFUSALS],
                         ids=[c[0] for c in CONFIG_REFUSALS])
def test_refuses_config(tmp_path: Path, overrides: dict[str, Any], problem: str) -> None:
    path = _write_adapter(tmp_path / "a", **overrides)
    file = re.escape(str(path / "adapter_config.json"))
    with pytest.raises(AdapterError, match=rf"^{file}: {problem}") as info:
        load_adapter(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tensors,problem", [c[1:] for c in WEIGHT_REFUSALS],
                         ids=[c[0] for c in WEIGHT_REFUSALS])
def test_refuses_weights(tmp_path: Path, tensors: dict[str, np.ndarray], problem: str) -> None:
    path = _write_adapter(tmp_path / "a", tensors=tensors)
    file = re.escape(str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"^{file}: .*{problem}") as info:
        load_adapter(path)
    assert "\n" not in str(info.value)


def test_refuses_rank_against_config(tmp_path: Path) -> None:
    path = _write_adapter(tmp_path / "r", r=8)
    file = re.escape(str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError,
                       match=rf"^{file}: .*q_proj has rank 4 but the config \(r\) says 8"):
        load_adapter(path)
    path = _write_adapter(tmp_path / "p", rank_pattern={"layers.1.self_attn.v_proj": 2})
    with pytest.raises(AdapterError, match=r"layers\.1\.self_attn\.v_proj has rank 4 but the "
                                           r"config \(rank_pattern\) says 2"):
        load_adapter(path)


def test_refuses_bad_files(tmp_path: Path) -> None:
    path = _write_adapter(tmp_path / "json")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(path))}/adapter_config\.json: "
                                           r"invalid JSON"):
        load_adapter(path)

    path = _write_adapter(tmp_path / "noconfig")
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json: file not found"):
        load_adapter(path)

    path = _write_adapter(tmp_path / "noweights")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(path))}: no adapter_model\."
                                           r"safetensors or adapter_model\.bin"):
        load_adapter(path)

    path = _write_adapter(tmp_path / "garbage")
    (path / "adapter_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{garbage")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: not a readable "
                                           r"safetensors file"):
        load_adapter(path)

    with pytest.raises(AdapterError, match=r"not a directory"):
        load_adapter(tmp_path / "missing")


def test_bin_without_torch_says_install_extra(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_adapter(tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"not really a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: .*install the `torch` extra"):
        load_adapter(path)


def test_accepts_fields_that_do_not_change_the_math(tmp_path: Path) -> None:
    path = _write_adapter(
        tmp_path / "a", init_lora_weights="gaussian", lora_dropout=0.1, megatron_config=None,
        layer_replication=None, use_dora=False, modules_to_save=[], some_future_field=3,
    )
    assert len(load_adapter(path).modules) == 4


def test_save_refuses_inconsistent_adapters(tmp_path: Path) -> None:
    adapter = load_adapter(_write_adapter(tmp_path / "a"))
    name = "model.layers.0.self_attn.q_proj"
    m = adapter.modules[name]
    wrong_scale = LoraAdapter(adapter.config, {**adapter.modules, name: LoraModule(
        name, m.A, m.B, 3.0)})
    with pytest.raises(AdapterError, match=r"adapter_config\.json: .*q_proj has scale 3\.0 but "
                                           r"the config gives 2\.0"):
        save_adapter(wrong_scale, tmp_path / "out")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: .*q_proj\.lora_B "
                                           r"contains NaN"):
        save_adapter(adapter.with_B({name: np.full_like(m.B, np.nan)}), tmp_path / "out")
    big = adapter.with_B({name: np.full_like(m.B, 1e6)})
    with pytest.raises(AdapterError, match=r"contains NaN or Inf"):
        save_adapter(big, tmp_path / "out", dtype=np.float16)  # overflows to inf
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["a"]
