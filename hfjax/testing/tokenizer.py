"""Tiny per-family byte-level BPE tokenizers (for the demo, the tests and `hfjax.testing.zoo`).

HeteroFusion's point is that the experts come from model families with *different*
tokenizers. Offline, each family gets its own byte-level BPE, trained with the
``tokenizers`` library on the synthetic corpus (:func:`hfjax.testing.tasks.pretraining_corpus`)
with a family-specific vocabulary size, and the family's chat special tokens registered the
way the real family registers them:

- ``llama``: bos ``<|begin_of_text|>``, eos ``<|eot_id|>``, pad ``<|end_of_text|>``, no unk;
  Llama-3 pre-tokenizer regex (digits in runs of up to 3).
- ``qwen2``: no bos, eos ``<|im_end|>``, pad ``<|endoftext|>``, no unk; Qwen2 regex (single
  digits) and NFC normalizer.
- ``mistral``: bos ``<s>``, eos ``</s>``, pad and unk ``<unk>``; GPT-2 byte-level regex.

Choices: llama's eos is ``<|eot_id|>`` (not ``<|end_of_text|>``) because the ``llama3`` chat
template of docs/algorithm.md §8 ends every assistant turn with ``<|eot_id|>``, and LlamaFactory
likewise replaces the eos by the template's stop word; generation must stop there. Pad is always a
token distinct from eos, so masking pad positions never masks the eos target. Calling the
tokenizer with ``add_special_tokens=True`` prepends bos for llama and mistral (like the real
tokenizers) and nothing for qwen2; ``add_special_tokens=False`` adds nothing for any family.
Special tokens sit at the end of the vocabulary for llama and qwen2 and at ids 0-2 (plus the
instruction markers after them) for mistral, again like the real families. transformers 5
does not persist ``add_bos_token``: after loading, the attribute reads ``False`` although the
saved post-processor still prepends bos; rely on ``encode`` behaviour, and do not set
``add_bos_token``/``add_eos_token`` on a loaded tokenizer (that rebuilds the post-processor).
When loaded next to a ``model_type: qwen2`` config.json, ``AutoTokenizer`` returns a
``Qwen2Tokenizer`` (same ids; its ``unk_token`` then defaults to ``<|endoftext|>``).
Byte-level BPE never produces unk, so any text round-trips: ``decode(encode(x)) == x``.

Each tokenizer also carries a ``chat_template`` (Jinja) that renders the docs/algorithm.md §8
templates (``llama3``, ``qwen``, ``mistral``); the training code's own template implementation is
authoritative, this is a convenience for ``apply_chat_template``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

__all__ = [
    "DEFAULT_VOCAB_SIZES",
    "FAMILY_CHAT_TEMPLATES",
    "FAMILY_SPECIAL_TOKENS",
    "FAMILY_TOKEN_ROLES",
    "train_tokenizer",
]

#: The chat/control special tokens of each family (registered as special tokens).
FAMILY_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "llama": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "mistral": ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
}

#: bos/eos/pad/unk of each family (``None``: the family has no such token).
FAMILY_TOKEN_ROLES: dict[str, dict[str, str | None]] = {
    "llama": {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
        "unk_token": None,
    },
    "qwen2": {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
    },
    "mistral": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
    },
}

#: Whether ``add_special_tokens=True`` prepends bos (as the real family tokenizers do).
_ADD_BOS: dict[str, bool] = {"llama": True, "qwen2": False, "mistral": True}

#: Special tokens first (ids 0..k-1) instead of last.
_SPECIALS_FIRST: dict[str, bool] = {"llama": False, "qwen2": False, "mistral": True}

#: Suggested vocabulary sizes: different per family so the families are truly heterogeneous.
DEFAULT_VOCAB_SIZES: dict[str, int] = {"llama": 1024, "qwen2": 1280, "mistral": 768}

#: Jinja chat templates rendering docs/algorithm.md §8's llama3 / qwen / mistral formats.
FAMILY_CHAT_TEMPLATES: dict[str, str] = {
    "llama": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
    "qwen2": (
        "{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}


# Pre-tokenization as in the real families: llama3 splits digits in runs of up to 3, qwen2
# splits every digit (and NFC-normalizes); mistral here uses the GPT-2 byte-level regex. Using
# the real qwen2 pipeline also matters for loading: with a ``model_type: qwen2`` config.json
# in the same folder, ``AutoTokenizer`` builds a ``Qwen2Tokenizer``, which imposes it.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _base_tokenizer(family: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if family == "mistral":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = _LLAMA3_REGEX if family == "llama" else _QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _special(token: str) -> AddedToken:
    return AddedToken(
        token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False
    )


def train_tokenizer(
    corpus: Iterable[str],
    family: str,
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer for ``family`` and save it to ``out_dir``.

    Args:
        corpus: Training texts (e.g. :func:`hfjax.testing.tasks.pretraining_corpus`); iterated once.
        family: ``"llama"``, ``"qwen2"`` or ``"mistral"``.
        vocab_size: Total vocabulary size including the special tokens (an upper bound: a small
            corpus may run out of merges first). Must exceed 256 + number of special tokens.
        out_dir: Directory for ``save_pretrained``; ``AutoTokenizer.from_pretrained(out_dir)``
            loads the result offline.
        min_frequency: BPE merge threshold.
        model_max_length: Stored in the tokenizer config.

    Returns:
        The tokenizer, with the family's bos/eos/pad/unk (see the module docstring) and
        chat template set. Deterministic for a given corpus and arguments.
    """
    if family not in FAMILY_SPECIAL_TOKENS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILY_SPECIAL_TOKENS)}")
    specials = list(FAMILY_SPECIAL_TOKENS[family])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must exceed {len(alphabet) + len(specials)}")

    tok = _base_tokenizer(family)
    specials_first = _SPECIALS_FIRST[family]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if specials_first else vocab_size - len(specials),
        min_frequency=min_frequency,
        special_tokens=[_special(t) for t in specials] if specials_first else [],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Registers them as special added tokens (no-op ids for tokens the trainer already placed).
    tok.add_special_tokens([_special(t) for t in specials])

    roles = FAMILY_TOKEN_ROLES[family]
    role_kwargs: dict[str, Any] = {k: v for k, v in roles.items() if v is not None}
    named = set(role_kwargs.values())
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **role_kwargs,
        extra_special_tokens=[t for t in specials if t not in named],
        add_bos_token=_ADD_BOS[family],
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=FAMILY_CHAT_TEMPLATES[family],
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok
