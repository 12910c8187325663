"""hfjax.tools: lora_from_delta (SVD of a full fine-tune) and merge_full (LoRA into its base).

Contracts: the adapter a delta becomes loads in PeftModel and its delta is the truncated SVD
(exact at full rank, Eckart-Young optimal below it); a merged checkpoint loads in
transformers with the logits of PeftModel.merge_and_unload; both stream (peak memory far below
the model) and write atomically.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from bridge import AdapterError, CheckpointError, load_adapter, open_checkpoint  # noqa: E402
from bridge.checkpoint import save_checkpoint  # noqa: E402
from hfjax import cli  # noqa: E402
from hfjax.errors import UserError  # noqa: E402
from hfjax.models.config import ModelConfig  # noqa: E402
from hfjax.models.key_tables import hf_shape, key_table  # noqa: E402
from hfjax.testing.hf_models import load_hf_model, make_hf_model, make_peft_adapter, torch_logits  # noqa: E402
from hfjax.tools import lora_from_delta, merge_full  # noqa: E402
from hfjax.tools._shared import linear_modules  # noqa: E402

# The modules themselves (hfjax.tools re-exports functions of the same names).
lfd_mod = importlib.import_module("hfjax.tools.lora_from_delta")
merge_mod = importlib.import_module("hfjax.tools.merge_full")
FAMILIES = ("llama", "qwen2")
DELTA_RANK = 4
IDS = np.random.default_rng(0).integers(3, 96, size=(2, 9))


def _linear_weights(ckpt_dir: Path) -> dict[str, str]:
    """PEFT module name -> HF weight key, from the key table of the checkpoint's family."""
    cfg = ModelConfig.from_hf(ckpt_dir)
    return {name: spec.hf for name, spec in linear_modules(cfg).items()}


def _make_tuned(base: Path, out: Path, *, seed: int, rank: int = DELTA_RANK,
                touch_norm: bool = False) -> Path:
    """``base`` with a random rank-``rank`` delta on every linear weight (and a changed norm)."""
    rng = np.random.default_rng(seed)
    weights = set(_linear_weights(base).values())
    with open_checkpoint(base) as ckpt:
        tensors = {}
        for key in ckpt.keys():
            w = ckpt.get(key, np.float32)
            if key in weights:
                d_out, d_in = w.shape
                b = rng.standard_normal((d_out, rank), dtype=np.float32)
                a = rng.standard_normal((rank, d_in), dtype=np.float32)
                w = w + 0.05 * (b @ a)
            if touch_norm and key == "model.norm.weight":
                w = w + 0.5
            tensors[key] = w
        save_checkpoint(out, tensors, ckpt.config)
    return out


def _truncated(delta: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    k = min(rank, len(s))
    best = (u[:, :k] * s[:k]) @ vt[:k]
    return best, float(np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(delta))


def _peft_deltas(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), adapter).eval()
    out = {}
    for name in _linear_weights(base):
        layer = pm.get_submodule(f"base_model.model.{name}")
        if not hasattr(layer, "get_delta_weight"):  # not adapted: a plain torch Linear
            continue
        with torch.no_grad():
            out[name] = layer.get_delta_weight("default").float().numpy()
    return out


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory):
    """(family, base dir, tuned dir with a rank-4 delta, tuned dir that also changes a norm)."""
    root = tmp_path_factory.mktemp(request.param)
    base = make_hf_model(request.param, root / "base", seed=1)
    tuned = _make_tuned(base, root / "tuned", seed=2)
    tuned_norm = _make_tuned(base, root / "tuned_norm", seed=2, touch_norm=True)
    return request.param, base, tuned, tuned_norm


# ------------------------------------------------------------------------------------------
# lora_from_delta
# ------------------------------------------------------------------------------------------


def test_exact_rank_reconstructs_the_fine_tune(models, tmp_path):
    family, base, tuned, _ = models
    report = lora_from_delta(base, tuned, tmp_path / "lora", rank=DELTA_RANK, alpha=8)
    assert report["model_type"] == family and report["scale"] == 2.0
    assert set(report["modules"]) == set(_linear_weights(base))
    for m in report["modules"].values():
        assert m["rel_error"] < 1e-5 and m["energy_kept"] > 1 - 1e-9 and m["delta_norm"] > 0
    assert report["not_captured"] == {}
    on_disk = json.loads((tmp_path / "lora" / lfd_mod.REPORT_NAME).read_text())
    assert on_disk["modules"] == report["modules"]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (DELTA_RANK, 8)

    # PEFT applies it as the fine-tune itself: same logits, which differ from the base's.
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), tmp_path / "lora").eval()
    got, want = torch_logits(pm, IDS), torch_logits(load_hf_model(tuned), IDS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - torch_logits(load_hf_model(base), IDS)).max() > 1e-2


def test_lower_rank_is_the_svd_optimum(models, tmp_path):
    _, base, tuned, _ = models
    rank, alpha = 2, 16
    report = lora_from_delta(base, tuned, tmp_path / "lora", rank=rank, alpha=alpha,
                             target_modules="q_proj,down_proj,v_proj")
    assert report["target_modules"] == ["q_proj", "v_proj", "down_proj"]  # key-table order
    peft_delta = _peft_deltas(base, tmp_path / "lora")
    keys = _linear_weights(base)
    assert set(report["modules"]) == {n for n in keys if n.endswith(("q_proj", "v_proj",
                                                                     "down_proj"))}
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for name, m in report["modules"].items():
            delta = t.get(keys[name], np.float32) - b.get(keys[name], np.float32)
            best, err = _truncated(delta, rank)
            np.testing.assert_allclose(peft_delta[name], best, atol=1e-5)
            assert m["rel_error"] == pytest.approx(err, rel=1e-4)
            assert m["energy_kept"] == pytest.approx(1 - err**2, rel=1e-4)
            assert 0.05 < m["rel_error"] < 1.0
    others = [n for n in keys if n not in report["modules"]]
    assert others and not set(others) & set(peft_delta)


def test_rank_above_a_module_side_pads_with_zeros(models, tmp_path):
    _, base, tuned, _ = models
    report = lora_from_delta(base, tuned, tmp_path / "lora", rank=40, dtype="bfloat16")
    adapter = load_adapter(tmp_path / "lora")
    m = adapter.modules["model.layers.0.self_attn.q_proj"]  # 32 x 32: only 32 directions
    assert m.A.shape == (40, 32) and str(m.A.dtype) == "bfloat16"
    assert not np.any(np.asarray(m.A[32:], np.float32))
    assert report["modules"][m.name]["rank"] == 32
    assert max(x["rel_error"] for x in report["modules"].values()) < 2e-2  # bf16 rounding


def test_changes_a_lora_cannot_carry_are_reported(models, tmp_path, capsys):
    _, base, _, tuned_norm = models
    rc = cli.main(["lora-from-delta", "--base", str(base), "--tuned", str(tuned_norm),
                   "--out", str(tmp_path / "lora"), "--rank", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.norm.weight" in printed and "relative error" in printed
    report = json.loads((tmp_path / "lora" / lfd_mod.REPORT_NAME).read_text())
    assert list(report["not_captured"]) == ["model.norm.weight"]
    assert report["lora_alpha"] == 3.0 and report["scale"] == 1.0


def test_lora_from_delta_refuses_bad_input(models, tmp_path):
    _, base, tuned, _ = models
    out = tmp_path / "lora"
    for kw, field in (({"rank": 0}, "rank"), ({"rank": 2, "target_modules": ["qproj"]},
                                                "target_modules"),
                      ({"rank": 2, "dtype": "int8"}, "dtype"), ({"rank": 2, "alpha": -1}, "alpha")):
        with pytest.raises(UserError, match=field):
            lora_from_delta(base, tuned, out, **kw)
    other = make_hf_model(models[0], tmp_path / "wide", hidden_size=48)
    with pytest.raises(CheckpointError, match=r"config.json: hidden_size=48") as e:
        lora_from_delta(base, other, out, rank=2)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not a directory"):
        lora_from_delta(base, tmp_path / "missing", out, rank=2)
    assert not out.exists()


def test_lora_from_delta_error_midway_leaves_nothing(models, tmp_path, monkeypatch):
    _, base, tuned, _ = models
    out = tmp_path / "lora"
    calls = []
    real = lfd_mod.svd_factors

    def failing(delta, rank, scale):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(delta, rank, scale)

    monkeypatch.setattr(lfd_mod, "svd_factors", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        lora_from_delta(base, tuned, out, rank=2)
    assert not out.exists() and _no_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------
# merge_full
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """A plain random LoRA and an rsLoRA with a rank pattern (a per-module scale), for the base."""
    _, base, _, _ = models
    root = tmp_path_factory.mktemp("adapters")
    plain = make_peft_adapter(base, root / "plain", r=4, alpha=8, seed=3)
    patterned = make_peft_adapter(base, root / "patterned", r=4, alpha=8, seed=4,
                                  target_modules=["q_proj", "v_proj", "down_proj"],
                                  use_rslora=True, rank_pattern={"down_proj": 2})
    return plain, patterned


def _peft_merged_logits(base: Path, adapter: Path) -> np.ndarray:
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), adapter).eval()
    return torch_logits(pm.merge_and_unload(), IDS)


@pytest.mark.parametrize("which", ["plain", "patterned"])
def test_merge_full_matches_peft_merge_and_unload(models, adapters, tmp_path, which):
    _, base, _, _ = models
    adapter = dict(zip(("plain", "patterned"), adapters, strict=True))[which]
    src = tmp_path / "base"
    shutil.copytree(base, src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    report = merge_full(src, adapter, tmp_path / "merged")
    assert report["merged"] == len(load_adapter(adapter).modules)
    assert "tokenizer_config.json" in report["copied"]
    assert (tmp_path / "merged" / "tokenizer_config.json").read_text() == \
        '{"model_max_length": 128}\n'
    got = torch_logits(load_hf_model(tmp_path / "merged"), IDS)
    want = _peft_merged_logits(base, adapter)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - torch_logits(load_hf_model(base), IDS)).max() > 1e-2


def test_merge_full_dtype_and_shards(models, adapters, tmp_path, capsys):
    _, base, _, _ = models
    out = tmp_path / "merged"
    merge_mod.merge_full(base, adapters[0], out, dtype="bfloat16", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    with open_checkpoint(out) as ckpt:
        assert {str(ckpt.dtype(k)) for k in ckpt.keys()} == {"bfloat16"}
        assert ckpt.config["dtype"] == "bfloat16"
    model = load_hf_model(out)  # sharded, bf16 on disk, read back as float32
    want = _peft_merged_logits(base, adapters[0])
    assert np.abs(torch_logits(model, IDS) - want).max() < 0.1 * np.abs(want).max()

    rc = cli.main(["merge-full", "--base", str(base), "--adapter", str(adapters[0]),
                   "--out", str(tmp_path / "cli")])
    assert rc == 0 and "merged" in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_merge_full_refuses_a_mismatched_adapter(models, adapters, tmp_path, capsys):
    _, base, _, _ = models
    wide = make_hf_model("llama", tmp_path / "wide", hidden_size=48)
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: .*_proj: LoRA is") as e:
        merge_full(wide, adapters[0], tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="dtype"):
        merge_full(base, adapters[0], tmp_path / "out", dtype="int4")
    rc = cli.main(["merge-full", "--base", str(wide), "--adapter", str(adapters[0]),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "adapter_model.safetensors" in err


def test_merge_full_error_midway_leaves_nothing(models, adapters, tmp_path, monkeypatch):
    _, base, _, _ = models
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")  # an existing output survives a failure
    calls = []
    real = merge_mod._merged

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(merge_mod, "_merged", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_full(base, adapters[0], out, max_shard_bytes=10_000)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _no_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Streaming: peak memory is a few tensors, not the model
# ------------------------------------------------------------------------------------------


def _numpy_checkpoint(out: Path, *, seed: int, base: Path | None = None) -> int:
    """A ~40 MB random Llama checkpoint (or ``base`` + a full-rank delta); its size in bytes."""
    import transformers

    hf = transformers.LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                  tie_word_embeddings=False).to_dict()
    cfg = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(seed)
    ref = open_checkpoint(base) if base is not None else None

    def tensors():
        for spec in key_table(cfg):
            w = 0.02 * rng.standard_normal(hf_shape(spec, cfg), dtype=np.float32)
            yield spec.hf, w if ref is None else ref.get(spec.hf) + w

    save_checkpoint(out, tensors(), hf, max_shard_bytes=8 << 20)
    if ref is not None:
        ref.close()
    return sum(4 * int(np.prod(hf_shape(s, cfg))) for s in key_table(cfg))


# Run in a child process: one BLAS thread (the SVDs crawl when threads fight over busy cores),
# peaks measured from a clean start. tracemalloc sees every numpy array; VmHWM is the RSS peak.
_STREAM_CHECK = """
import json, sys, tracemalloc
from pathlib import Path
from hfjax.models.config import ModelConfig
from hfjax.tools import lora_from_delta, merge_full

def hwm_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

root, tool = Path(sys.argv[1]), sys.argv[2]
ModelConfig.from_hf(root / "base")  # imports transformers' config classes before measuring
before = hwm_kb()
tracemalloc.start()
if tool == "lora_from_delta":
    lora_from_delta(root / "base", root / "tuned", root / "lora", rank=8,
                    target_modules=["q_proj", "o_proj"])
else:
    merge_full(root / "base", root / "lora", root / "merged", max_shard_bytes=16 << 20)
print(json.dumps({"traced_peak": tracemalloc.get_traced_memory()[1],
                  "rss_peak_extra": (hwm_kb() - before) * 1024}))
"""


def test_both_tools_stream_tensor_by_tensor(tmp_path):
    import os

    size = _numpy_checkpoint(tmp_path / "base", seed=0)
    _numpy_checkpoint(tmp_path / "tuned", seed=1, base=tmp_path / "base")
    assert size > 30e6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for tool in ("lora_from_delta", "merge_full"):
        proc = subprocess.run([sys.executable, "-c", _STREAM_CHECK, str(tmp_path), tool],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak = json.loads(proc.stdout.strip().splitlines()[-1])
        msg = f"{tool}: peaks {peak} for a {size / 1e6:.0f} MB model"
        assert peak["traced_peak"] < 0.2 * size, msg  # a few tensors, not a shard or the model
        assert peak["rss_peak_extra"] < 0.5 * size, msg
    with open_checkpoint(tmp_path / "merged") as ckpt:
        assert len(list(tmp_path.glob("merged/model-*.safetensors"))) >= 3
        assert len(ckpt) == len(key_table(ModelConfig.from_hf(ckpt.config)))


# ------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M (slow)
# ------------------------------------------------------------------------------------------

_MEASURE = """
import json, sys, time
from hfjax.models.config import ModelConfig
from hfjax.tools import merge_full

def hwm():  # this process's peak RSS in KiB; ru_maxrss would carry the parent's over exec
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

ModelConfig.from_hf(sys.argv[1])  # imports transformers' config classes before measuring
before = hwm()
t = time.perf_counter()
merge_full(sys.argv[1], sys.argv[2], sys.argv[3])
sec = time.perf_counter() - t
peak = hwm()
print(json.dumps({"seconds": sec, "peak_rss_kb": peak, "rss_before_kb": before}))
"""


@pytest.mark.slow
def test_merge_full_on_smollm2(tmp_path_factory):
    import os

    pytest.importorskip("gguf")
    from bridge.gguf import convert_gguf, smollm2_gguf

    try:
        gguf_file = smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    cache = os.environ.get("HFJAX_REALWEIGHTS_DIR")
    root = tmp_path_factory.mktemp("smollm2_merge")
    base = convert_gguf(gguf_file, (Path(cache) if cache else root) / "smollm2-135m-instruct")
    adapter = make_peft_adapter(base, root / "lora", r=8, alpha=16, seed=0)
    out = root / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OPENBLAS_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - t
    with open_checkpoint(out) as ckpt:
        size = sum(int(np.prod(ckpt.shape(k))) * ckpt.dtype(k).itemsize for k in ckpt.keys())
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer came along
    ids = np.asarray([tok("The capital of France is")["input_ids"]])
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), adapter).eval()
    want = torch_logits(pm.merge_and_unload(), ids)
    got = torch_logits(load_hf_model(out), ids)
    base_diff = np.abs(torch_logits(load_hf_model(base), ids) - want).max()
    diff = float(np.abs(got - want).max())
    extra_mb = (stats["peak_rss_kb"] - stats["rss_before_kb"]) / 1024
    print(f"\nmerge-full SmolLM2-135M + rank-8 LoRA: max|logit diff| {diff:.2e} "
          f"(LoRA moves logits by {base_diff:.2f}); merge {stats['seconds']:.1f} s "
          f"({wall:.1f} s with imports); peak RSS {stats['peak_rss_kb'] / 1024:.0f} MiB, "
          f"{extra_mb:.0f} MiB above the imports, model {size / 2**20:.0f} MiB")
    assert diff <= 1e-4 and base_diff > 1e-2
    assert extra_mb * 2**20 < 0.5 * size  # the largest tensor (embeddings) is 22% of it


# ------------------------------------------------------------------------------------------
# bridge.checkpoint_stream on its own
# ------------------------------------------------------------------------------------------


def test_stream_checkpoint_round_trips_through_safetensors(tmp_path):
    import ml_dtypes
    from safetensors.torch import load_file

    from bridge.checkpoint_stream import stream_checkpoint

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "b": np.arange(7, dtype=np.int64),
        "c": np.zeros((0, 4), np.float32),
        "d": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "e": np.float32(1.5) * np.ones((), np.float32),
    }
    layout = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    stream_checkpoint(tmp_path / "one", layout, tensors.items(), {"x": 1})
    stream_checkpoint(tmp_path / "many", layout, tensors.items(), {"x": 1}, max_shard_bytes=40)
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) >= 3
    for name in ("one", "many"):
        with open_checkpoint(tmp_path / name) as ckpt:
            assert ckpt.config == {"x": 1}
            for k, v in tensors.items():
                got = ckpt.get(k)
                assert got.dtype == v.dtype and got.shape == v.shape
                np.testing.assert_array_equal(got.reshape(-1).view(np.uint8),
                                              v.reshape(-1).view(np.uint8))
    loaded = load_file(tmp_path / "one" / "model.safetensors")  # the reference reader agrees
    assert loaded["a"].dtype == torch.bfloat16 and loaded["b"].tolist() == list(range(7))


def test_stream_checkpoint_refuses_tensors_off_the_layout(tmp_path):
    from bridge.checkpoint_stream import stream_checkpoint

    layout = [("a", (2,), np.float32), ("b", (3,), np.float32)]
    bad_runs = (
        [("b", np.zeros(3, np.float32)), ("a", np.zeros(2, np.float32))],  # order
        [("a", np.zeros(2, np.float32)), ("b", np.zeros(4, np.float32))],  # shape
        [("a", np.zeros(2, np.float64)), ("b", np.zeros(3, np.float32))],  # dtype
        [("a", np.zeros(2, np.float32))],                                  # too few
        [("a", np.zeros(2, np.float32)), ("b", np.zeros(3, np.float32)),
         ("c", np.zeros(1, np.float32))],                                  # too many
    )
    for run in bad_runs:
        with pytest.raises(CheckpointError, match="out"):
            stream_checkpoint(tmp_path / "out", layout, iter(run), {})
        assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []
