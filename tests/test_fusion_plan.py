"""Topology plans (docs/algorithm.md §2): layer maps, suffix matching, groups, buckets, errors,
reports."""

from __future__ import annotations

import json

import jax
import pytest

from hfjax.fusion import FusionError, build_plan, parse_transfer_ratio
from hfjax.fusion.plan import layer_pairs
from hfjax.models.families import ALL_LINEAR
from hfjax.testing.adapters import random_adapter


def adapter(layers: int, *, hidden: int = 8, inter: int = 12, rank: int = 2,
            modules=("q_proj", "v_proj"), seed: int = 0, **kw):
    return random_adapter(layers, hidden, inter, rank, modules=modules, seed=seed, **kw)


@pytest.mark.parametrize(
    ("l_t", "l_s", "expected"),
    [
        (32, 28, {t: t - 4 for t in range(4, 32)}),  # Llama <- Qwen: target 0..3 get nothing
        (28, 32, {t: t + 4 for t in range(28)}),  # deeper source: its first 4 layers unused
        (4, 6, {0: 2, 1: 3, 2: 4, 3: 5}),
        (6, 6, {t: t for t in range(6)}),
    ],
)
def test_tail_alignment(l_t, l_s, expected):
    plan = build_plan(adapter(l_t), [adapter(l_s, seed=1)], block_size=4)
    assert plan.layer_maps == (expected,)
    assert plan.target_layers == l_t and plan.source_layers == (l_s,)
    fused_layers = sorted({m.layer for g in plan.groups for m in g.modules})
    assert fused_layers == sorted(expected)
    for g in plan.groups:
        for m in g.modules:
            (k, src_name), = m.sources
            assert k == 0 and src_name == f"model.layers.{expected[m.layer]}.{m.suffix}"


def test_unfused_modules_listed_with_reason():
    plan = build_plan(adapter(32), [adapter(28, seed=1)], block_size=4)
    assert len(plan.unfused) == 2 * 4  # q and v of layers 0..3
    assert all(f"layers.{i}." in n for n, i in zip(plan.unfused, [0, 0, 1, 1, 2, 2, 3, 3],
                                                      strict=True))
    assert set(plan.unfused_reasons) == {"no source layer maps to this target layer"}
    assert not set(plan.unfused) & set(plan.fused_modules)
    assert len(plan.fused_modules) == 2 * 28


@pytest.mark.parametrize("ratio", ["1/2", 0.5, "0.5"])
def test_transfer_ratio_keeps_deepest_pairs(ratio):
    plan = build_plan(adapter(32), [adapter(28, seed=1)], block_size=4, transfer_ratio=ratio)
    assert plan.layer_maps == ({t: t - 4 for t in range(18, 32)},)  # last 14 of 28 pairs
    assert plan.transfer_ratio == 0.5


def test_transfer_ratio_keeps_at_least_one_pair():
    plan = build_plan(adapter(32), [adapter(28, seed=1)], block_size=4, transfer_ratio=0.01)
    assert plan.layer_maps == ({31: 27},)


def test_parse_transfer_ratio():
    assert parse_transfer_ratio("1/2") == 0.5
    assert parse_transfer_ratio(" 3/4 ") == 0.75
    assert parse_transfer_ratio(1) == 1.0
    assert parse_transfer_ratio("0.25") == 0.25
    for bad in ["a/b", "1/0", "0", 0.0, 1.5, "-1/2", "nan"]:
        with pytest.raises(FusionError, match="transfer_ratio"):
            parse_transfer_ratio(bad)


def test_suffix_matching_source_without_v_proj():
    target = adapter(6)
    full = adapter(6, seed=1)
    q_only = adapter(6, seed=2, modules=("q_proj",))
    plan = build_plan(target, [full, q_only], block_size=4, source_names=["full", "q_only"])
    g = {g.name: g for g in plan.groups}
    assert set(g) == {"q_proj_r2", "v_proj_r2"}
    for m in g["q_proj_r2"].modules:
        assert [k for k, _ in m.sources] == [0, 1]
    for m in g["v_proj_r2"].modules:
        assert [k for k, _ in m.sources] == [0]  # q_only contributes nothing to v_proj
        assert m.n_src_tokens == 2 * 2  # A^T (8 rows) + B (8 rows), block 4


def test_groups_per_module_type_and_rank_in_deterministic_order():
    target = adapter(4, modules=ALL_LINEAR, rank_overrides={"v_proj": 4})
    source = adapter(4, modules=ALL_LINEAR, seed=1, rank_overrides={"v_proj": 4})
    plan = build_plan(target, [source], block_size=4)
    # First appearance in the target's (layer, module path) order.
    assert [g.name for g in plan.groups] == [
        "down_proj_r2", "gate_proj_r2", "up_proj_r2", "k_proj_r2", "o_proj_r2", "q_proj_r2",
        "v_proj_r4"]
    for g in plan.groups:
        assert [m.layer for m in g.modules] == [0, 1, 2, 3]
        assert all(m.module_type == g.module_type and m.rank == g.rank for m in g.modules)
    again = build_plan(adapter(4, modules=ALL_LINEAR, rank_overrides={"v_proj": 4}),
                       [source], block_size=4)
    assert again == plan and hash(again) == hash(plan)


def test_source_order_fixes_token_order():
    t, a, b = adapter(4), adapter(4, seed=1, path="a"), adapter(4, seed=2, path="b")
    ab = build_plan(t, [a, b], block_size=4)
    ba = build_plan(t, [b, a], block_size=4)
    assert ab.source_names == ("a", "b") and ba.source_names == ("b", "a")
    m_ab, m_ba = ab.groups[0].modules[0], ba.groups[0].modules[0]
    assert [k for k, _ in m_ab.sources] == [0, 1] == [k for k, _ in m_ba.sources]


def test_rank_mismatch_names_source_and_module():
    target = adapter(4, rank=2)
    bad = adapter(4, rank=2, seed=1, rank_overrides={"v_proj": 3})
    with pytest.raises(FusionError, match=r"'expert_b'.*model\.layers\.0\.self_attn\.v_proj") as e:
        build_plan(target, [adapter(4, seed=2), bad], block_size=4,
                   source_names=["expert_a", "expert_b"])
    # Every mismatch is summed up in the same line, not only the first one met.
    assert "(4 mismatched pairs: 'expert_b' self_attn.v_proj r3 vs target r2 x4)" in str(e.value)


def test_no_fusable_module_raises():
    with pytest.raises(FusionError, match="no target module can be fused"):
        build_plan(adapter(4), [adapter(4, seed=1, modules=("k_proj",))], block_size=4)
    with pytest.raises(FusionError, match="no source"):
        build_plan(adapter(4), [], block_size=4)


def test_buckets_when_layers_match_fewer_sources():
    # Target 6 layers; source A has 4 (reaches target 2..5), source B has 6 (reaches 0..5).
    target = adapter(6)
    plan = build_plan(target, [adapter(4, seed=1), adapter(6, hidden=12, seed=2)],
                      block_size=4)
    assert plan.layer_maps == ({2: 0, 3: 1, 4: 2, 5: 3}, {t: t for t in range(6)})
    q = plan.group("q_proj_r2")
    assert [[m.layer for m in b.modules] for b in q.buckets] == [[0, 1], [2, 3, 4, 5]]
    b0, b1 = q.buckets
    assert (b0.n_a, b0.n_b, b0.n_t) == (2, 2, 4) == (b1.n_a, b1.n_b, b1.n_t)
    assert b0.n_s == 3 + 3  # source B: hidden 12 -> A^T 3 blocks + B 3 blocks
    assert b1.n_s == 2 + 2 + 6  # source A first, then source B
    assert [m.layer for m in q.modules] == list(range(6))
    assert all(m.n_src_tokens == b.n_s for b in q.buckets for m in b.modules)


def test_report_is_json_and_describe_is_readable():
    plan = build_plan(adapter(6), [adapter(4, seed=1, path="/x/qwen_lora")], block_size=4)
    rep = json.loads(json.dumps(plan.report()))
    assert rep["sources"][0]["layer_map"] == {"2": 0, "3": 1, "4": 2, "5": 3}
    assert rep["num_fused"] == 8 and len(rep["unfused"]) == 4
    assert rep["groups"][0]["buckets"][0]["n_s"] == 4
    text = plan.describe()
    assert "target layers 2..5 -> source layers 0..3" in text
    assert "q_proj_r2" in text and "Left unchanged: 4 module(s)" in text
    assert "no source layer maps to this target layer" in text


def test_plan_is_a_valid_static_jit_argument():
    plan = build_plan(adapter(4), [adapter(4, seed=1)], block_size=4)
    f = jax.jit(lambda x, plan: x * len(plan.fused_modules), static_argnums=1)
    assert int(f(1, plan)) == 8


# (L_t, L_s, ratio, alignment) -> pairs, worked by hand from docs/algorithm.md §11:
# overlap = min(L_t, L_s), keep = min(overlap, max(1, int(overlap * ratio))).
HAND_MAPS = [
    # tail: the first release's map, last `keep` of the overlap.
    (32, 28, 1.0, "tail", [(4 + i, i) for i in range(28)]),
    (28, 32, 0.5, "tail", [(i, 4 + i) for i in range(14, 28)]),  # keep 14 of 28
    (6, 4, 0.01, "tail", [(5, 3)]),  # keep = 1: the deepest pair
    # head / naive: (i, i) from the bottom.
    (5, 3, 1.0, "head", [(0, 0), (1, 1), (2, 2)]),
    (32, 28, 0.5, "naive", [(i, i) for i in range(14)]),
    (4, 6, 0.5, "head", [(0, 0), (1, 1)]),
    # uniform: steps 31/6 and 27/6 give the ties 15.5 -> 16, 4.5 -> 4, 13.5 -> 14, 22.5 -> 22
    # (half to even), keep = int(28 / 4) = 7.
    (32, 28, 0.25, "uniform", [(0, 0), (5, 4), (10, 9), (16, 14), (21, 18), (26, 22),
                               (31, 27)]),
    # keep 3 of overlap 4: steps 3/2 and 9/2: 1.5 -> 2, 4.5 -> 4.
    (4, 10, 0.75, "uniform", [(0, 0), (2, 4), (3, 9)]),
    # keep 3: steps 5/2 and 3/2: 2.5 -> 2 (even), 1.5 -> 2.
    (6, 4, 0.75, "uniform", [(0, 0), (2, 2), (5, 3)]),
    # keep = 1: the last layers of both.
    (5, 9, 0.2, "uniform", [(4, 8)]),
    (32, 28, 0.01, "uniform", [(31, 27)]),
    # keep = overlap = L: the identity.
    (6, 6, 1.0, "uniform", [(i, i) for i in range(6)]),
]


@pytest.mark.parametrize(("l_t", "l_s", "ratio", "alignment", "expected"), HAND_MAPS)
def test_layer_alignments_by_hand(l_t, l_s, ratio, alignment, expected):
    assert layer_pairs(l_t, l_s, ratio, alignment) == expected
    plan = build_plan(adapter(l_t), [adapter(l_s, seed=1)], block_size=4,
                      transfer_ratio=ratio, layer_alignment=alignment)
    assert plan.layer_maps == (dict(expected),)
    assert plan.layer_alignment == alignment
    assert sorted({m.layer for m in plan.groups[0].modules}) == [t for t, _ in expected]
    for m in plan.groups[0].modules:
        (k, src_name), = m.sources
        assert src_name == f"model.layers.{dict(expected)[m.layer]}.{m.suffix}"


def test_uniform_kept_source_layer_outside_the_full_map_is_matched():
    # L_t 4, L_s 10: the full uniform map uses source layers 0, 3, 6, 9; ratio 3/4 keeps
    # source layer 4, which the full map lacks: it must read as matched, not unaligned.
    plan = build_plan(adapter(4), [adapter(10, seed=1)], block_size=4, transfer_ratio=0.75,
                      layer_alignment="uniform")
    assert plan.full_layer_maps == ({0: 0, 1: 3, 2: 6, 3: 9},)
    by_layer = {r.layer: r.status for r in plan.matches}
    assert by_layer[4] == "matched" and by_layer[9] == "matched" and by_layer[0] == "matched"
    assert by_layer[3] == "ratio" and by_layer[6] == "ratio" and by_layer[1] == "unaligned"
    assert "uniform alignment pairs" in plan.describe()


def test_describe_spells_out_a_non_shift_map_and_the_modes():
    plan = build_plan(adapter(32), [adapter(28, seed=1)], block_size=4, transfer_ratio=0.25,
                      layer_alignment="uniform", update_mode="ab_joint")
    text = plan.describe()
    assert "Layer alignment 'uniform'" in text
    assert "pairs (target:source): 0:0, 5:4, 10:9, 16:14, 21:18, 26:22, 31:27" in text
    assert "Update mode 'ab_joint'" in text
    rep = plan.report()
    assert rep["layer_alignment"] == "uniform" and rep["update_mode"] == "ab_joint"
    tail = build_plan(adapter(32), [adapter(28, seed=1)], block_size=4).describe()
    assert "Layer alignment 'tail'" in tail and "pairs (target:source)" not in tail
    assert "Update mode 'b_only'" in tail
    assert hash(plan) != hash(build_plan(adapter(32), [adapter(28, seed=1)], block_size=4,
                                         transfer_ratio=0.25, layer_alignment="uniform"))


@pytest.mark.parametrize(("kw", "field"), [({"layer_alignment": "middle"}, "layer_alignment"),
                                           ({"update_mode": "a_and_b"}, "update_mode")])
def test_unknown_alignment_or_update_mode_is_refused(kw, field):
    with pytest.raises(FusionError, match=rf"^{field}='.*': must be one of "):
        build_plan(adapter(4), [adapter(4, seed=1)], block_size=4, **kw)
