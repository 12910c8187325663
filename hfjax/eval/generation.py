"""Batched greedy answers for Alpaca records, as the original's evaluation generates them.

::

    answers = generate_answers(model, tokenizer, records, template="llama3", adapter=lora)
    # records: [{"instruction", "input", "output"?}, ...]  ->  answers: list[str], same order

Each record's prompt is the chat template's prompt for ``instruction + "\\n" + input``
(`ChatTemplate.encode_prompt`, the training prompt without the response). Prompts are sorted
by length (longest first) and cut into batches; each batch is LEFT-padded to a power-of-two
length bucket (at least ``MIN_BUCKET``) and, when short, filled up to ``batch_size`` with
copies of its first row, so `jax.jit` sees a handful of shapes only. Decoding is greedy with
the template's stop ids as EOS; only the new tokens are decoded (special tokens skipped, as
LlamaFactory's predict does), cut at the first stop id, then `strip_generation`. Answers come
back in the input order.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hfjax.eval.metrics import strip_generation
from hfjax.models.model import Decoder, as_adapter_tree
from hfjax.training.templates import ChatTemplate, get_template, user_message

MIN_BUCKET = 16


def prompt_bucket(length: int, min_bucket: int = MIN_BUCKET) -> int:
    """The padded prompt length: the smallest power of two ``>= max(length, min_bucket)``."""
    size = 1
    while size < max(length, min_bucket):
        size *= 2
    return size


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 (B, length), prompts right-aligned."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt of length {len(p)} does not fit in {length}")
        if p:
            ids[row, length - len(p):] = p
            mask[row, length - len(p):] = 1
    return ids, mask


def _decode(tokenizer: Any, new_ids: np.ndarray, stop_ids: Sequence[int]) -> str:
    ids = [int(t) for t in new_ids]
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:i]
            break
    return strip_generation(tokenizer.decode(ids, skip_special_tokens=True))


def generate_answers(model: Decoder, tokenizer: Any, records: Sequence[Mapping[str, Any]], *,
                     template: str | ChatTemplate, adapter: Any = None, batch_size: int = 8,
                     max_new_tokens: int = 64, progress: bool = True) -> list[str]:
    """Greedy answers to ``records`` (see the module docstring), in input order.

    Args:
        model: the base model.
        tokenizer: its Hugging Face tokenizer.
        records: Alpaca records (``instruction``, optional ``input``).
        template: a chat template name (``"llama3"``, ``"qwen"``, ``"mistral"``) or object.
        adapter: a `bridge.LoraAdapter` or an adapter pytree (checked against the model).
        batch_size: prompts per generate call.
        max_new_tokens: generation length limit.
        progress: show a progress bar over batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tpl = get_template(template)
    tpl.check_tokenizer(tokenizer)
    stop_ids = tuple(tpl.stop_ids(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    tree = as_adapter_tree(adapter, model.config)
    prompts = [tpl.encode_prompt(tokenizer, user_message(r)) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    answers: list[str] = [""] * len(prompts)
    if not prompts:
        return answers
    batch_size = min(batch_size, len(prompts))

    from tqdm.auto import tqdm

    n_batches = -(-len(order) // batch_size)
    with tqdm(total=n_batches, disable=not progress, desc="generate", unit="batch",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [prompts[i] for i in idx]
            rows += [rows[0]] * (batch_size - len(rows))  # fixed batch shape: fewer compiles
            length = prompt_bucket(max(len(p) for p in rows))
            ids, mask = left_pad(rows, length, pad_id)
            out = model.generate(ids, max_new_tokens, tree, mask, eos_token_id=stop_ids,
                                 pad_token_id=pad_id)
            for row, i in enumerate(idx):
                answers[i] = _decode(tokenizer, out[row, length:], stop_ids)
            bar.update(1)
    return answers
