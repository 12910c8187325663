"""Chat templates for the replay data, token-for-token as the original pipeline builds them.

The original HeteroFusion trains through LlamaFactory (its repository vendors a late-2024
LlamaFactory, the 0.9.1 line, whose ``_register_template`` appends the tokenizer's EOS, after
``replace_eos``, to every assistant turn). One Alpaca record becomes one user turn and one
assistant turn:

    llama3  prompt   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{U}<|eot_id|>
                     <|start_header_id|>assistant<|end_header_id|>\\n\\n     (one line, no break)
            response {output}<|eot_id|>
    qwen    prompt   <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
                     <|im_start|>user\\n{U}<|im_end|>\\n<|im_start|>assistant\\n
            response {output}<|im_end|>
    mistral prompt   <s>[INST] {U} [/INST]
            response {output}</s>
    gemma   prompt   <bos><start_of_turn>user\n{U}<end_of_turn>\n<start_of_turn>model\n
            response {output}<eos>                          (Gemma 2 and Gemma 3)
    olmo    prompt   <|endoftext|><|user|>\n{U}<|assistant|>\n  (the EOS id first; OLMo 2)
            response {output}<|endoftext|>

Qwen3 uses the qwen template. gemma and olmo close the response with the tokenizer's EOS, as
LlamaFactory does for them (gemma: ``efficient_eos``, the EOS appended once after the
response; olmo: the default ``{content}`` + EOS assistant turn); olmo's prompt starts with the
EOS id (its ``format_prefix={"eos_token"}``), not a BOS.

How the ids are made matters as much as the text, and follows LlamaFactory's
``Template._encode``: the prompt is a list of *elements* (the BOS or EOS id; the system block;
the user block) and the response is ``[output, END]``; every string element is tokenized on its
own with ``tokenizer.encode(text, add_special_tokens=False)`` (so special-token text such as
``<|im_start|>`` becomes its single id, and SentencePiece tokenizers add their word-boundary
prefix per element exactly as they do there), and BOS/END are appended as ids. An empty string
element is skipped. The end token is looked up by its text (``<|eot_id|>``, ``<|im_end|>``) or is
the tokenizer's EOS (mistral), which is what ``replace_eos`` produces in LlamaFactory.

Later LlamaFactory releases (0.9.2+) changed two of these: qwen's assistant turn became
``{output}<|im_end|>\\n`` (a supervised trailing newline) and mistral's became
``[INST] {U}[/INST]`` + `` {output}</s>``. This module follows docs/algorithm.md §8, which matches
the version the original ships.

Example (shapes only)::

    t = get_template("qwen")
    prompt_ids, response_ids = t.encode(tokenizer, user_message(record), record["output"])
    # prompt_ids: list[int] (labels -100), response_ids: list[int] ending in <|im_end|>'s id
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

_CONTENT = "{content}"


@dataclass(frozen=True)
class SpecialId:
    """A prompt element that is the tokenizer's BOS or EOS id, not text."""

    which: str  # "bos" | "eos"


BOS, EOS = SpecialId("bos"), SpecialId("eos")
Element = str | SpecialId


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the templates use."""

    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A single-turn chat format: prompt = [BOS] + system + user blocks; response = output + END.

    Attributes:
        name: registry name (``"llama3"``, ``"qwen"``, ``"mistral"``, ``"gemma"``, ``"olmo"``).
        user: the user block; ``{content}`` is replaced by the user message.
        system: the system block; ``{content}`` is replaced by ``default_system``. Only used
            when ``default_system`` is non-empty.
        default_system: the system prompt the original trained with ("" = none).
        bos: prepend the tokenizer's BOS id (LlamaFactory's ``format_prefix={"bos_token"}``);
            skipped, as there, when the tokenizer has no BOS.
        eos_prefix: prepend the tokenizer's EOS id instead (``format_prefix={"eos_token"}``,
            OLMo).
        end_token: text of the token closing the response; ``None`` = the tokenizer's EOS.
        special_tokens: token texts in the blocks that must be single tokens of the tokenizer
            (checked by :meth:`check_tokenizer`, so a template/tokenizer mix-up fails loudly).
    """

    name: str
    user: str
    system: str = ""
    default_system: str = ""
    bos: bool = False
    eos_prefix: bool = False
    end_token: str | None = None
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.user.count(_CONTENT) != 1:
            raise ValueError(f"template {self.name!r}: user block needs exactly one {_CONTENT}")
        if self.default_system and self.system.count(_CONTENT) != 1:
            raise ValueError(f"template {self.name!r}: system block needs exactly one {_CONTENT}")

    # -- text ----------------------------------------------------------------------------
    def prompt_elements(self, user: str) -> list[Element]:
        """The prompt's elements in order; `BOS` / `EOS` stand for those ids."""
        elements: list[Element] = [BOS] if self.bos else [EOS] if self.eos_prefix else []
        if self.default_system:
            elements.append(self.system.replace(_CONTENT, self.default_system))
        elements.append(self.user.replace(_CONTENT, user))
        return elements

    def render(self, tokenizer: Tokenizer, user: str, response: str) -> tuple[str, str]:
        """The prompt and response as text (BOS/END spelled with the tokenizer's token text)."""
        prompt = "".join(e if isinstance(e, str) else _special_text(tokenizer, e)
                         for e in self.prompt_elements(user))
        end_text = self.end_token if self.end_token is not None else tokenizer.eos_token
        if end_text is None:
            raise ValueError(f"template {self.name!r}: the tokenizer has no EOS token")
        return prompt, response + end_text

    # -- ids -----------------------------------------------------------------------------
    def end_id(self, tokenizer: Tokenizer) -> int:
        """The id appended after the response."""
        if self.end_token is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(f"template {self.name!r}: the tokenizer has no EOS token")
            return int(tokenizer.eos_token_id)
        return _single_id(tokenizer, self.end_token, self.name)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise ``ValueError`` unless every special token of the template is one known token."""
        for token in self.special_tokens:
            _single_id(tokenizer, token, self.name)
        self.end_id(tokenizer)

    def encode(self, tokenizer: Tokenizer, user: str, response: str) -> tuple[list[int], list[int]]:
        """``(prompt_ids, response_ids)`` as LlamaFactory's ``encode_oneturn`` builds them."""
        prompt_ids: list[int] = []
        for element in self.prompt_elements(user):
            if isinstance(element, SpecialId):
                sid = _special_id(tokenizer, element)
                if sid is not None:
                    prompt_ids.append(sid)
            elif element:
                prompt_ids.extend(tokenizer.encode(element, add_special_tokens=False))
        response_ids = []
        if response:
            response_ids.extend(tokenizer.encode(response, add_special_tokens=False))
        response_ids.append(self.end_id(tokenizer))
        return [int(i) for i in prompt_ids], [int(i) for i in response_ids]

    def encode_prompt(self, tokenizer: Tokenizer, user: str) -> list[int]:
        """The prompt ids alone (generation input); equal to ``encode(...)[0]``."""
        return self.encode(tokenizer, user, "")[0]

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Ids that end a generated answer: the end token, and the tokenizer's EOS if distinct."""
        ids = [self.end_id(tokenizer)]
        if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
            ids.append(int(tokenizer.eos_token_id))
        return ids


def _special_id(tokenizer: Tokenizer, e: SpecialId) -> int | None:
    """The BOS / EOS id, or None (skipped, as LlamaFactory does) when the tokenizer lacks it."""
    sid = tokenizer.bos_token_id if e.which == "bos" else tokenizer.eos_token_id
    return None if sid is None else int(sid)


def _special_text(tokenizer: Tokenizer, e: SpecialId) -> str:
    if _special_id(tokenizer, e) is None:
        return ""
    return (tokenizer.bos_token if e.which == "bos" else tokenizer.eos_token) or ""


def _single_id(tokenizer: Tokenizer, token: str, template: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (unk is not None and token_id == unk):
        raise ValueError(
            f"template {template!r}: the tokenizer has no token {token!r} "
            "(is this the right template for this model?)"
        )
    return int(token_id)


_LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>")

TEMPLATES: dict[str, ChatTemplate] = {
    "llama3": ChatTemplate(
        name="llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        bos=True,
        end_token="<|eot_id|>",
        special_tokens=_LLAMA3_SPECIALS,
    ),
    "qwen": ChatTemplate(
        name="qwen",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        end_token="<|im_end|>",
        special_tokens=_QWEN_SPECIALS,
    ),
    "mistral": ChatTemplate(
        name="mistral",
        user="[INST] {content} [/INST]",
        bos=True,
        end_token=None,
    ),
    "gemma": ChatTemplate(
        name="gemma",
        user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        bos=True,
        end_token=None,
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
    ),
    "olmo": ChatTemplate(
        name="olmo",
        user="<|user|>\n{content}<|assistant|>\n",
        eos_prefix=True,
        end_token=None,
    ),
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The registered template ``name`` (a :class:`ChatTemplate` is passed through)."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}; known templates: {known}") from None


def user_message(record: Mapping[str, Any]) -> str:
    """The user turn of an Alpaca record: ``instruction + "\\n" + input``.

    As LlamaFactory's alpaca converter: only non-empty parts are joined, so an empty ``input``
    gives the instruction alone (no trailing newline). ``history`` is ignored (the original's
    dataset registration maps no history column).
    """
    parts = [record.get("instruction") or "", record.get("input") or ""]
    return "\n".join(p for p in parts if p)
