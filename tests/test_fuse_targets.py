"""Fusion end to end with each newer family as the target (Qwen3, Gemma 2, Gemma 3, OLMo 2).

One short run per family (4 optimizer steps) on a tiny transformers-built target, with a
Llama (for Qwen3) or Qwen2 source of another shape. The exported adapter must load in PEFT on
the target and compute what we compute; fused modules change, the others stay bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest

import hfjax
from bridge import load_adapter, save_adapter
from hfjax.testing import tasks
from hfjax.testing.hf_models import load_hf_model, make_hf_model, torch_logits
from hfjax.testing.models import model_config, random_lora
from hfjax.testing.tokenizer import train_tokenizer
from hfjax.testing.zoo import SMALL, tiny_fuse_config
from hfjax.training.fuse_loop import run_fusion

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

# target family -> (tokenizer family, chat template, source family)
TARGETS = {
    "qwen3": ("qwen2", "auto", "llama"),  # "auto" -> qwen, from the family table
    "gemma2": ("llama", "llama3", "qwen2"),
    "gemma3_text": ("llama", "llama3", "qwen2"),
    "olmo2": ("llama", "llama3", "qwen2"),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Tokenizers, one source adapter per source family, and the replay data (shared)."""
    root = tmp_path_factory.mktemp("targets")
    corpus = tasks.pretraining_corpus(200, seed=0)
    toks = {f: train_tokenizer(corpus, f, 320, root / f"tok_{f}") for f in ("llama", "qwen2")}
    sources = {f: save_adapter(random_lora(model_config(SMALL[f], toks[f]), r=4, alpha=8,
                                           seed=11, target_modules=("q_proj", "v_proj",
                                                                    "down_proj")),
                               root / f"lora_{f}") for f in ("llama", "qwen2")}
    splits = {name: {"replay": tasks.make_splits(name, n_train=0, n_replay=8, n_test=0,
                                                 seed=3)["replay"]}
              for name in ("movie", "relation")}
    tasks.write_task_files(root / "data", splits)
    return root, toks, sources


@pytest.fixture(scope="module", params=sorted(TARGETS))
def fused(request, shared, tmp_path_factory):
    family = request.param
    root, toks, sources = shared
    tok_family, template, src_family = TARGETS[family]
    tok = toks[tok_family]
    base = make_hf_model(family, root / f"base_{family}", seed=1, vocab_size=len(tok),
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(base)
    model = hfjax.from_pretrained(base, dtype="float32")
    # q/v fused (the sources have them), k_proj not (they do not): two groups to compile,
    # and still an unfused module that must stay bit-identical.
    target = save_adapter(random_lora(model.config, r=4, alpha=8, seed=10,
                                      target_modules=("q_proj", "k_proj", "v_proj")),
                          root / f"lora_{family}")
    src = sources[src_family]  # the config's two source slots, then one source kept
    paths = {"base_llama": base, "target_adapter": target, "data": root / "data",
             "qwen_adapter": src, "mistral_adapter": src}
    cfg = tiny_fuse_config(paths, tmp_path_factory.mktemp(f"run_{family}"))
    cfg.target.template = template
    cfg.sources = ({"name": src_family, "adapter_path": str(src)},)
    cfg.train.epochs = 1
    cfg.data.min_bucket = cfg.data.cutoff_len = 128  # one bucket: one compilation
    cfg.train.checkpoint_every = 100  # one checkpoint, at the end
    return family, base, target, model, run_fusion(cfg, progress=False)


def test_fusion_with_new_target_family(fused):
    family, base, target_dir, model, res = fused
    lm = [h["lm_loss"] for h in res.history]
    assert res.steps == 4 and np.isfinite(lm).all(), (family, lm)
    assert res.report["run"]["compilations"] == 1
    target, out = load_adapter(target_dir), load_adapter(res.adapter_dir)
    fused_names = set(res.report["alpha_times_delta_B_fro"])
    assert fused_names and list(out.modules) == list(target.modules)
    assert fused_names < set(target.modules)  # some module left unfused
    for name, m in target.modules.items():
        np.testing.assert_array_equal(out.modules[name].A, m.A)
        same = np.array_equal(out.modules[name].B, m.B)
        assert same == (name not in fused_names), (family, name)
    # The exported adapter loads in PEFT on the target and computes what we compute.
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), str(res.adapter_dir)).eval()
    ids = np.arange(5, 29)[None]
    ours = np.asarray(model(ids, adapter=out))
    err = np.abs(ours - torch_logits(pm, ids)).max()
    assert err <= 1e-4, f"{family}: exported adapter vs PEFT, max abs logit error {err:.2e}"
    moved = np.abs(ours - np.asarray(model(ids, adapter=target))).max()
    assert moved > 1e-4
    print(f"{family}: lm_loss {lm[0]:.4f} -> {lm[-1]:.4f}; exported vs PEFT {err:.1e}; "
          f"{len(fused_names)} modules fused, logits moved by {moved:.2e}")
