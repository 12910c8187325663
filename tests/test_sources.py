"""Sources of any family: Gemma 2, OLMo 2, Phi-3 adapters; fused-projection splits; matches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from source_fixtures import BF16, FAMILIES, write_config, write_expert

from bridge import AdapterError, HeadLayout, LoraAdapter, load_adapter, split_fused
from hfjax.errors import UserError
from hfjax.fusion import build_plan
from hfjax.models.families import ALL_LINEAR
from hfjax.sources import SourceSpecError, head_layout, load_sources, source_options
from hfjax.testing.adapters import random_adapter

NO_O = tuple(m for m in ALL_LINEAR if m != "o_proj")


def llama_target(layers: int = 4, modules=ALL_LINEAR, rank: int = 4) -> LoraAdapter:
    return random_adapter(layers, 32, 64, rank, modules=modules, kv_dim=16, seed=7,
                          path="llama_target")


def fused_delta(m) -> np.ndarray:
    return m.scale * (np.asarray(m.B, np.float64) @ np.asarray(m.A, np.float64))


# ------------------------------------------------------------------ families that are not targets
@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_unsplit_families_align_to_a_llama_target(tmp_path, family):
    dtype = BF16 if family == "gemma2" else np.float32
    path = write_expert(tmp_path, family, adapter_name="default" if family == "olmo2" else None,
                        dtype=dtype)
    target = llama_target()
    opts, (src,) = load_sources([{"name": family, "adapter_path": str(path)}], target)
    layers = FAMILIES[family][0]
    assert len(src.modules) == 7 * layers and src.num_layers == layers
    plan = build_plan(target, [src], block_size=8, source_names=[o.name for o in opts])
    off = 4 - layers
    assert plan.layer_maps[0] == {t: t - off for t in range(4) if 0 <= t - off < layers}
    fed = {m.name for m in plan.matches if m.status == "matched"}
    assert len(fed) == 7 * min(4, layers)
    if family == "gemma2":  # q_proj is 24 -> 32 wide (head_dim 16 x 2 heads): still fused
        q = plan.group("q_proj_r4").modules[-1]
        assert q.sources == ((0, "model.layers.2.self_attn.q_proj"),)
        assert src.modules["model.layers.2.self_attn.q_proj"].B.shape == (32, 4)
    else:  # OLMo 2 is deeper than the target: its layer 0 has no partner
        assert {m.status for m in plan.matches if m.layer == 0} == {"unaligned"}


# ------------------------------------------------------------------ the split is exact
@pytest.mark.parametrize("how", ["config", "fields", "shapes"])
def test_split_parts_are_exact_rows_of_the_fused_delta(tmp_path, how):
    family = "phi3mini" if how == "shapes" else "phi3"
    path = write_expert(tmp_path, family)
    spec = {"adapter_path": str(path)}
    if how == "config":
        spec["config_path"] = str(write_config(tmp_path, family))
    elif how == "fields":
        spec.update(num_heads=4, num_kv_heads=2)
    fused = load_adapter(path)
    _, (src,) = load_sources([spec], llama_target())
    q, kv = (16, 8) if family == "phi3" else (16, 16)
    for layer in range(FAMILIES[family][0]):
        pre = f"model.layers.{layer}"
        for fname, parts, rows in (
            ("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), (q, kv, kv)),
            ("mlp.gate_up_proj", ("gate_proj", "up_proj"), (40, 40)),
        ):
            f = fused.modules[f"{pre}.{fname}"]
            assert f"{pre}.{fname}" not in src.modules
            full = fused_delta(f)
            start = 0
            stem = fname.split(".")[0]
            for part, n in zip(parts, rows, strict=True):
                p = src.modules[f"{pre}.{stem}.{part}"]
                assert p.A is f.A or np.array_equal(p.A, f.A)
                np.testing.assert_array_equal(p.B, f.B[start:start + n])
                assert p.scale == f.scale and p.rank == f.rank
                assert p.origin == f"{fname} rows {start}:{start + n}"
                np.testing.assert_array_equal(fused_delta(p), full[start:start + n])
                start += n
            assert start == f.d_out
        # o_proj / down_proj are untouched
        for other in ("self_attn.o_proj", "mlp.down_proj"):
            assert src.modules[f"{pre}.{other}"] is not None


def test_split_reproduces_the_fused_lora_output():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((3, 12)), rng.standard_normal((12 + 2 * 6, 3))
    from bridge import LoraModule

    fused = LoraAdapter(config={}, modules={"model.layers.0.self_attn.qkv_proj": LoraModule(
        "model.layers.0.self_attn.qkv_proj", A, B, 0.5)})
    parts = split_fused(fused, layout=HeadLayout(num_heads=4, num_kv_heads=2)).modules
    x = rng.standard_normal(12)
    y = 0.5 * B @ (A @ x)
    got = np.concatenate([parts[f"model.layers.0.self_attn.{p}_proj"].scale *
                          parts[f"model.layers.0.self_attn.{p}_proj"].B @ (A @ x)
                          for p in "qkv"])
    np.testing.assert_allclose(got, y, rtol=1e-12)


def test_split_with_explicit_head_dim():
    from bridge import LoraModule

    # Gemma-like: 2 heads x head_dim 16 on hidden 24, 1 KV head: q 32 + k 16 + v 16 rows.
    m = LoraModule("model.layers.0.self_attn.qkv_proj", np.ones((2, 24)), np.ones((64, 2)), 1.0)
    lay = HeadLayout(num_heads=2, num_kv_heads=1, head_dim=16)
    parts = split_fused(LoraAdapter(config={}, modules={m.name: m}), layout=lay).modules
    assert [p.d_out for p in parts.values()] == [16, 32, 16]  # k, q, v in name order
    with pytest.raises(AdapterError, match="not divisible by num_heads 5; give head_dim"):
        split_fused(LoraAdapter(config={}, modules={m.name: m}), layout=HeadLayout(num_heads=5))


# ------------------------------------------------------------------ refusals
def test_gqa_split_without_layout_is_refused_naming_module_and_fields(tmp_path):
    path = write_expert(tmp_path, "phi3")
    with pytest.raises(AdapterError) as e:
        load_sources([{"adapter_path": str(path)}], llama_target())
    msg = str(e.value)
    assert "model.layers.0.self_attn.qkv_proj" in msg and "32 lora_B rows" in msg
    assert "sources.0.num_heads / num_kv_heads" in msg and "sources.0.config_path" in msg
    assert "\n" not in msg and isinstance(e.value, UserError)


def test_layout_contradicting_the_shapes_is_refused(tmp_path):
    path = write_expert(tmp_path, "phi3")
    with pytest.raises(AdapterError, match=r"qkv_proj: lora_B has 32 rows but the head layout"
                                           r".*gives q \+ k \+ v = 16 \+ 16 \+ 16 = 48"):
        load_sources([{"adapter_path": str(path), "num_heads": 4}], llama_target())
    cfg = write_config(tmp_path, "phi3", hidden_size=20)
    with pytest.raises(AdapterError, match="lora_A has 16 columns but hidden_size is 20"):
        load_sources([{"adapter_path": str(path), "config_path": str(cfg)}], llama_target())
    cfg = write_config(tmp_path, "phi3", intermediate_size=30)
    with pytest.raises(AdapterError, match="gate_up_proj: lora_B has 80 rows but "
                                           "intermediate_size 30"):
        load_sources([{"adapter_path": str(path), "config_path": str(cfg)}], llama_target())


def test_head_layout_config_and_fields_must_agree(tmp_path):
    cfg = write_config(tmp_path, "phi3")
    opts = source_options({"adapter_path": "x", "config_path": str(cfg), "num_kv_heads": 2}, 0)
    lay = head_layout(opts)
    assert (lay.num_heads, lay.num_kv_heads, lay.hidden_size) == (4, 2, 16)
    bad = source_options({"adapter_path": "x", "config_path": str(cfg), "num_kv_heads": 4}, 3)
    with pytest.raises(SourceSpecError, match=r"sources\.3\.num_kv_heads is 4 but .*config"
                                              r"\.json says 2"):
        head_layout(bad)


def test_source_options_refuse_unknown_fields_and_bad_values():
    assert source_options("/a/b", 2).name == "source2"
    with pytest.raises(SourceSpecError, match=r"sources\.1\.num_head: unknown field"):
        source_options({"adapter_path": "x", "num_head": 4}, 1)
    with pytest.raises(SourceSpecError, match=r"sources\.0\.split_fused: expected true or false"):
        source_options({"adapter_path": "x", "split_fused": "yes"}, 0)
    with pytest.raises(SourceSpecError, match=r"sources\.0\.num_heads: expected an integer"):
        source_options({"adapter_path": "x", "num_heads": -1}, 0)


def test_fused_and_part_both_present_is_refused():
    from bridge import LoraModule

    a, b = np.ones((2, 4)), np.ones((12, 2))
    mods = {n: LoraModule(n, a, b if "qkv" in n else b[:4], 1.0)
            for n in ("model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.q_proj")}
    with pytest.raises(AdapterError, match="qkv_proj and .*q_proj are both adapted"):
        split_fused(LoraAdapter(config={}, modules=mods))


# ------------------------------------------------------------------ when to split, match table
def test_split_only_where_the_target_has_the_parts(tmp_path):
    path = write_expert(tmp_path, "phi3")
    target = llama_target(modules=("o_proj", "gate_proj", "up_proj", "down_proj"))
    # No q/k/v in the target: qkv_proj is left fused, so no head layout is needed.
    _, (src,) = load_sources([{"adapter_path": str(path)}], target)
    types = {m.module_type for m in src.modules.values()}
    assert types == {"qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    plan = build_plan(target, [src], block_size=8)
    qkv = [m for m in plan.matches if m.suffix == "self_attn.qkv_proj"]
    assert {m.status for m in qkv} == {"no_type"}


def test_split_fused_off_keeps_fused_and_explains(tmp_path):
    path = write_expert(tmp_path, "phi3")
    target = llama_target()
    _, (src,) = load_sources([{"adapter_path": str(path), "split_fused": False}], target)
    assert "model.layers.0.self_attn.qkv_proj" in src.modules
    plan = build_plan(target, [src], block_size=8, source_names=["phi3"])
    text = plan.describe()
    assert "-x no self_attn.qkv_proj in the target adapter (a fused projection; split_fused " \
           "splits it into q_proj, k_proj, v_proj" in text
    assert {m.status for m in plan.matches if "o_proj" in m.name or "down" in m.name} == {
        "matched", "unaligned"}


def test_match_table_gives_every_reason(tmp_path):
    path = write_expert(tmp_path, "phi3")  # 6 layers, GQA
    # Target: 4 layers, no o_proj anywhere, v_proj only on layers 2..3.
    base = llama_target(modules=("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"))
    vs = llama_target(modules=("v_proj",))
    mods = {**base.modules, **{n: m for n, m in vs.modules.items() if m.layer >= 2}}
    target = LoraAdapter(config=base.config, modules=mods, path="llama_target")
    _, (src,) = load_sources([{"adapter_path": str(path), "num_heads": 4, "num_kv_heads": 2}],
                             target)
    plan = build_plan(target, [src], block_size=8, source_names=["phi3"], transfer_ratio="3/4")
    by = {(m.layer, m.suffix): m for m in plan.matches}
    # Tail alignment: target 0..3 <- source 2..5; ratio 3/4 keeps target 1..3 <- source 3..5.
    assert by[(0, "self_attn.q_proj")].status == "unaligned"
    assert by[(2, "self_attn.q_proj")].status == "ratio"
    m = by[(3, "self_attn.q_proj")]
    assert (m.status, m.target, m.group) == ("matched", "model.layers.1.self_attn.q_proj",
                                             "q_proj_r4")
    assert m.origin == "self_attn.qkv_proj rows 0:16"
    assert by[(3, "self_attn.v_proj")].status == "no_layer"  # target layer 1 has no v_proj
    assert by[(4, "self_attn.v_proj")].status == "matched"
    assert {by[(s, "self_attn.o_proj")].status for s in range(6)} == {"no_type"}
    text = plan.describe()
    for line in (
        "[0] phi3 (6 layers, 42 modules; 30 from splitting 12 fused; 17 matched):",
        "3..5           self_attn.q_proj (self_attn.qkv_proj rows 0:16)   -> layers 1..3 "
        "self_attn.q_proj [q_proj_r4]",
        "0..1           every module (6 types)                            -x no target layer: "
        "tail alignment pairs source layers 2..5 with target layers 0..3",
        "2              every module (6 types)                            -x cut by "
        "transfer_ratio: only source layers 3..5 with target layers 1..3 transfer",
        "3              self_attn.v_proj (self_attn.qkv_proj rows 24:32)  -x target layer 1 "
        "has no self_attn.v_proj",
        "0..5           self_attn.o_proj                                  -x no "
        "self_attn.o_proj in the target adapter",
        "3..5           mlp.up_proj (mlp.gate_up_proj rows 40:80)         -> layers 1..3 "
        "mlp.up_proj [up_proj_r4]",
    ):
        assert line in text, (line, text)
    rep = json.loads(json.dumps(plan.report()))
    assert len(rep["matches"]) == 42
    row = next(r for r in rep["matches"] if r["module"] == "model.layers.0.self_attn.o_proj")
    assert row["status"] == "no_type" and "no self_attn.o_proj" in row["reason"]


def test_split_matches_hf_phi3_with_a_peft_written_adapter(tmp_path):
    """A real PEFT LoRA on a (tiny) HF Phi-3: each part's delta is what Phi3Attention / Phi3MLP
    slice out of the fused projection's LoRA output."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=24,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.Phi3ForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"])
    pm = peft.get_peft_model(base, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    pm.save_pretrained(tmp_path / "phi3_lora")
    _, (src,) = load_sources([{"adapter_path": str(tmp_path / "phi3_lora"),
                               "config_path": str(tmp_path / "base")}], llama_target())
    x = torch.randn(3, 16)
    layer = pm.base_model.model.model.layers[1]
    hd = 16 // 4
    with torch.no_grad():
        for fused, cuts in ((layer.self_attn.qkv_proj, {"self_attn.q_proj": (0, 4 * hd),
                                                        "self_attn.k_proj": (16, 16 + 2 * hd),
                                                        "self_attn.v_proj": (24, 32)}),
                            (layer.mlp.gate_up_proj, {"mlp.gate_proj": (0, 24),
                                                      "mlp.up_proj": (24, 48)})):
            delta = (fused(x) - fused.base_layer(x)).numpy()
            for suffix, (a, b) in cuts.items():
                p = src.modules[f"model.layers.1.{suffix}"]
                ours = p.scale * x.numpy() @ p.A.T @ p.B.T
                np.testing.assert_allclose(ours, delta[:, a:b], rtol=1e-5, atol=1e-5)
    # q = 4 heads x 4, k = v = 2 heads x 4; gate / up halves of 2 x 24.
    assert [src.modules[f"model.layers.0.self_attn.{t}_proj"].d_out for t in "qkv"] == [16, 8, 8]
