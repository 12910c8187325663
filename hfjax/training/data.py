"""Replay data: Alpaca JSON files -> masked token ids -> bucketed, shuffled numpy batches.

Pipeline (docs/algorithm.md §7-8)::

    records  = load_alpaca(resolve_dataset("mit-movie_sample300", data_root))
    examples = encode_dataset(records, tokenizer, "llama3", cutoff_len=1024, name="mit-movie")
    # Example.input_ids: int32[T]   prompt ids + response ids (incl. the end token), T <= cutoff
    # Example.labels:    int32[T]   -100 on the prompt, the response ids on the response
    buckets  = length_buckets(1024)              # (32, 64, 128, 256, 512, 1024)
    for batch in iterate_batches(examples, batch_size=1, epoch=e, seed=42, buckets=buckets,
                                 pad_id=tokenizer.pad_token_id or 0, start=resume_batch):
        batch["input_ids"]       # int32[B, L], L = smallest bucket >= the longest example
        batch["attention_mask"]  # int32[B, L], 1 on tokens, 0 on right padding
        batch["labels"]          # int32[B, L], -100 on prompt and padding

Truncation follows LlamaFactory's supervised processor for one turn: ``infer_seqlen`` splits
``cutoff_len`` between prompt and response, then the prompt keeps its head and the response its
head (so a long response can lose its end token, as in the original). All datasets are pooled
and the pool is permuted once per epoch by ``epoch_order(n, epoch, seed)``.

Datasets may carry a role (the later release's ``type`` / ``ratio``, docs/algorithm.md §11)::

    ReplaySet.load(["tweet", "movie"], root, tok, "llama3", 1024,
                   roles=["main", "replay:0.5"], seed=42)
    # tweet (300 records) whole, then int(0.5 * 300) = 150 movie records drawn by (seed, name)
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfjax.errors import UserError
from hfjax.training.templates import ChatTemplate, Tokenizer, get_template, user_message

IGNORE_INDEX = -100


class DataError(UserError):
    """A replay data file or dataset name is unusable; the message names the file and problem."""


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def _read_records(path: Path, text: str) -> list[Any]:
    """The records of a JSON list (``.json``) or of one JSON object per line (``.jsonl``)."""
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    return records


def load_alpaca(path: str | Path, *, nonempty_output: bool = False) -> list[dict[str, str]]:
    """Read and validate an Alpaca file: a JSON list (``.json``) or JSON lines (``.jsonl``).

    Every record must be an object with string ``instruction`` and ``output``; ``input`` is
    optional (a string or null). Other keys (``history``) are dropped. ``nonempty_output``
    also refuses an empty ``output`` (training data: nothing to supervise).

    Returns:
        one ``{"instruction", "input", "output"}`` dict per record, in file order.

    Raises:
        DataError: naming the file (and record index, from 0) on any problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    data = _read_records(path, text)
    if not data:
        raise DataError(f"{path}: no records")
    records = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                got = "missing" if key not in rec else type(rec[key]).__name__
                raise DataError(f"{path}: record {i}: {key!r} must be a string ({got})")
        if nonempty_output and not rec["output"].strip():
            raise DataError(f"{path}: record {i}: 'output' is empty (nothing to train on)")
        inp = rec.get("input")
        if inp is not None and not isinstance(inp, str):
            raise DataError(f"{path}: record {i}: 'input' must be a string or null")
        records.append({"instruction": rec["instruction"], "input": inp or "",
                        "output": rec["output"]})
    return records


def _known_datasets(root: Path, info: Mapping[str, Any]) -> list[str]:
    names = set(info)
    names.update(p.stem for ext in ("*.json", "*.jsonl") for p in root.glob(ext)
                 if p.name != "dataset_info.json")
    return sorted(names)


def resolve_dataset(name: str, data_root: str | Path) -> Path:
    """The JSON / JSONL file of dataset ``name`` under ``data_root``.

    Looks up ``data_root/dataset_info.json`` (LlamaFactory's registry, ``{name: {"file_name":
    ...}}``) when it exists and lists ``name``; otherwise ``data_root/<name>.json``, then
    ``data_root/<name>.jsonl`` (``name`` may already end in ``.json`` / ``.jsonl``).

    Raises:
        DataError: when nothing matches, listing the datasets that exist.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a directory")
    info_path = root / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{info_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(info, dict):
            raise DataError(f"{info_path}: expected an object of datasets")
    if name in info:
        entry = info[name]
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(file_name, str):
            raise DataError(f"{info_path}: dataset {name!r} has no 'file_name'")
        path = root / file_name
        if not path.is_file():
            raise DataError(f"{info_path}: dataset {name!r} points to missing file {path}")
        return path
    for candidate in (root / f"{name}.json", root / f"{name}.jsonl", root / name):
        if candidate.suffix in (".json", ".jsonl") and candidate.is_file():
            return candidate
    known = _known_datasets(root, info)
    raise DataError(
        f"{root}: unknown dataset {name!r}; available: {', '.join(known) if known else 'none'}"
    )


# --------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------
def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Lengths ``(source, target)`` kept after truncating to ``cutoff_len`` (LlamaFactory).

    A short target (``2·target < cutoff``) is kept whole and the source takes the rest; else a
    short source is kept whole and the target takes the rest; else both are cut in proportion
    to their lengths (target share rounded down).
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


@dataclass
class Example:
    """One tokenized record: ``input_ids`` and ``labels`` (int32, same length) and its dataset."""

    input_ids: np.ndarray
    labels: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_supervised(self) -> int:
        """Number of tokens that carry a label."""
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def _encode_record(record: Mapping[str, Any], tokenizer: Tokenizer, tpl: ChatTemplate,
                   cutoff_len: int, name: str) -> tuple[Example, int]:
    """The example and its length before truncation."""
    prompt_ids, response_ids = tpl.encode(tokenizer, user_message(record), record["output"])
    full = len(prompt_ids) + len(response_ids)
    source_len, target_len = infer_seqlen(len(prompt_ids), len(response_ids), cutoff_len)
    prompt_ids, response_ids = prompt_ids[:source_len], response_ids[:target_len]
    input_ids = np.asarray(prompt_ids + response_ids, dtype=np.int32)
    labels = np.asarray([IGNORE_INDEX] * len(prompt_ids) + response_ids, dtype=np.int32)
    return Example(input_ids=input_ids, labels=labels, source=name), full


def encode_example(record: Mapping[str, Any], tokenizer: Tokenizer,
                   template: str | ChatTemplate, cutoff_len: int, name: str = "") -> Example:
    """Tokenize one Alpaca record: prompt masked with -100, both parts cut by ``infer_seqlen``."""
    return _encode_record(record, tokenizer, get_template(template), cutoff_len, name)[0]


def encode_dataset(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
                   template: str | ChatTemplate, cutoff_len: int, name: str = "") -> list[Example]:
    """Tokenize ``records`` (see :func:`encode_example`); ``name`` tags each example's source."""
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    tpl = get_template(template)
    tpl.check_tokenizer(tokenizer)
    return [encode_example(r, tokenizer, tpl, cutoff_len, name) for r in records]


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
def length_buckets(cutoff_len: int, min_len: int = 32) -> tuple[int, ...]:
    """Padded lengths: powers of two (from ``min_len`` rounded up to one) below ``cutoff_len``,
    then ``cutoff_len`` itself.

    ``length_buckets(1024) == (32, 64, 128, 256, 512, 1024)``;
    ``length_buckets(300) == (32, 64, 128, 256, 300)``. Few shapes keep jit recompiles few.
    """
    if cutoff_len < 1 or min_len < 1:
        raise ValueError(f"cutoff_len and min_len must be >= 1, got {cutoff_len}, {min_len}")
    buckets = []
    size = 1 << max(0, math.ceil(math.log2(min_len)))
    while size < cutoff_len:
        buckets.append(size)
        size *= 2
    buckets.append(cutoff_len)
    return tuple(buckets)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= length``; ``ValueError`` if ``length`` exceeds them all."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch, the last partial batch included."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return -(-n_examples // batch_size)


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The permutation of ``range(n)`` used in ``epoch`` — a pure function of ``(seed, epoch)``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n)


def collate(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad ``examples`` to ``length``: ``input_ids``, ``attention_mask``, ``labels``."""
    n = len(examples)
    input_ids = np.full((n, length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((n, length), dtype=np.int32)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int32)
    for row, ex in enumerate(examples):
        t = len(ex)
        if t > length:
            raise ValueError(f"example of length {t} does not fit in {length}")
        input_ids[row, :t] = ex.input_ids
        attention_mask[row, :t] = 1
        labels[row, :t] = ex.labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(examples: Sequence[Example], *, batch_size: int, epoch: int, seed: int,
                    buckets: Sequence[int], pad_id: int, start: int = 0,
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yield the batches of one epoch, in ``epoch_order``, from batch index ``start`` on.

    Each batch is right-padded to the smallest bucket holding its longest example. The last
    batch may be smaller than ``batch_size``. ``start`` lets a resumed run skip the batches it
    has already consumed: ``list(iterate_batches(..., start=k)) == full_list[k:]``.
    """
    if not examples:
        return
    total = num_batches(len(examples), batch_size)
    if not 0 <= start <= total:
        raise ValueError(f"start must be in [0, {total}], got {start}")
    order = epoch_order(len(examples), epoch, seed)
    for b in range(start, total):
        chunk = [examples[int(i)] for i in order[b * batch_size:(b + 1) * batch_size]]
        length = bucket_for(max(len(ex) for ex in chunk), buckets)
        yield collate(chunk, length, pad_id)


# --------------------------------------------------------------------------------------------
# the replay set
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetRole:
    """What one listed dataset is in the mix (the later release's ``type`` / ``ratio``).

    ``main`` sets are taken whole and concatenated first; a ``replay`` set follows, whole
    (``ratio`` None, written ``replay:all``) or ``floor(ratio x main records)`` of its records
    sampled without replacement (written ``replay:0.5``; all of them when it has no more).
    The rules (ratio > 0, at least one main) are `hfjax.config.components.DataSpec.check`'s.
    """

    kind: str  # "main" or "replay"
    ratio: float | None = None  # replay share of the main records; None = every record

    @classmethod
    def parse(cls, text: str) -> DatasetRole:
        """``"main"``, ``"replay:all"`` or ``"replay:<number>"``; `ValueError` saying why not."""
        kind, sep, amount = str(text).strip().partition(":")
        if kind == "main" and not sep:
            return cls("main")
        if kind != "replay" or not amount.strip():
            raise ValueError("must be main, replay:all or replay:<ratio>")
        if amount.strip().lower() == "all":
            return cls("replay")
        try:
            return cls("replay", float(amount))
        except ValueError:
            raise ValueError(f"replay ratio {amount.strip()!r} is not a number or 'all'") from None

    def __str__(self) -> str:
        if self.kind == "main":
            return "main"
        return "replay:all" if self.ratio is None else f"replay:{self.ratio:g}"


def replay_count(ratio: float | None, n_main: int, n_available: int) -> int:
    """Records a replay set contributes: all for ``ratio`` None, else ``int(ratio x n_main)``
    (floored, as the later release's trainer), at most ``n_available``."""
    if ratio is None:
        return n_available
    return min(int(ratio * n_main), n_available)


def sample_indices(n_available: int, count: int, seed: int, name: str) -> np.ndarray:
    """``count`` distinct record indices of dataset ``name``, in file order; a pure function
    of ``(seed, name)`` so that one dataset's sample does not move when another's ratio does."""
    if count >= n_available:
        return np.arange(n_available)
    key = zlib.crc32(name.encode("utf-8"))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key])))
    return np.sort(rng.choice(n_available, size=count, replace=False))


@dataclass
class ReplaySet:
    """The pooled replay examples of several datasets, with per-dataset statistics.

    ``stats[name]`` holds ``n`` (records used), ``tokens`` (total length), ``min_len``,
    ``mean_len``, ``max_len``, ``mean_response_len`` (supervised tokens per example) and
    ``n_truncated`` (records cut by ``cutoff_len``); :attr:`totals` the same over the pool.
    ``usage[name]`` is ``(role, records available, records used)``.
    """

    examples: list[Example]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    usage: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def totals(self) -> dict[str, float]:
        """:attr:`stats` over the whole pool."""
        n_truncated = sum(int(s["n_truncated"]) for s in self.stats.values())
        return _length_stats(self.examples, n_truncated)

    @classmethod
    def load(cls, names: Sequence[str], data_root: str | Path, tokenizer: Tokenizer,
             template: str | ChatTemplate, cutoff_len: int,
             roles: Sequence[DatasetRole | str] = (), seed: int = 0) -> ReplaySet:
        """Resolve, read, validate and tokenize the datasets in ``names``.

        Without ``roles`` every dataset is pooled whole, in the order given. With ``roles``
        (one per name, checked by `DataSpec.check`) the main sets come first, in order, then
        each replay set whole or sampled (see `DatasetRole`, `sample_indices` with ``seed``).
        Every record must have a non-empty ``output``.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise DataError(f"{data_root}: no replay datasets given")
        if cutoff_len < 1:
            raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{data_root}: dataset(s) listed twice: {', '.join(dupes)}")
        parsed = [r if isinstance(r, DatasetRole) else DatasetRole.parse(r) for r in roles]
        if parsed and len(parsed) != len(names):
            raise ValueError(f"{len(parsed)} roles for {len(names)} datasets")
        tpl = get_template(template)
        tpl.check_tokenizer(tokenizer)
        records = {n: load_alpaca(resolve_dataset(n, data_root), nonempty_output=True)
                   for n in names}
        if parsed:
            order = [(n, r) for n, r in zip(names, parsed, strict=True) if r.kind == "main"]
            order += [(n, r) for n, r in zip(names, parsed, strict=True) if r.kind != "main"]
        else:
            order = [(n, None) for n in names]
        n_main = sum(len(records[n]) for n, r in order if r is not None and r.kind == "main")
        examples: list[Example] = []
        stats: dict[str, dict[str, float]] = {}
        usage: dict[str, tuple[str, int, int]] = {}
        for name, role in order:
            available = records[name]
            chosen = available
            if role is not None and role.kind == "replay":
                count = replay_count(role.ratio, n_main, len(available))
                chosen = [available[int(i)] for i in sample_indices(len(available), count,
                                                                     seed, name)]
            encoded, n_truncated, lost = [], 0, []
            for rec in chosen:
                ex, full = _encode_record(rec, tokenizer, tpl, cutoff_len, name)
                encoded.append(ex)
                n_truncated += full > len(ex)
                if not np.any(ex.labels[1:] != IGNORE_INDEX):  # no token left to predict
                    lost.append(full)
            if lost:
                raise DataError(
                    f"{resolve_dataset(name, data_root)}: {len(lost)} of {len(chosen)} "
                    f"example(s) lose every response token to truncation at "
                    f"cutoff_len={cutoff_len} (they need {min(lost)}-{max(lost)} tokens); "
                    "raise cutoff_len")
            stats[name] = _length_stats(encoded, n_truncated)
            usage[name] = (str(role) if role is not None else "pooled", len(available),
                           len(chosen))
            examples.extend(encoded)
        return cls(examples=examples, stats=stats, usage=usage)

    def summary(self) -> str:
        """A small table: per dataset its role, records available and used, and lengths."""
        lines = [f"{'dataset':<40} {'role':<12} {'avail':>5} {'used':>5} {'mean':>7} "
                 f"{'max':>5} {'resp':>6} {'trunc':>5}"]
        rows = [(n, s, *self.usage.get(n, ("", s["n"], s["n"]))) for n, s in self.stats.items()]
        total_avail = sum(int(r[3]) for r in rows)
        for name, s, role, avail, used in [*rows,
                                           ("(all)", self.totals, "", total_avail, len(self))]:
            lines.append(f"{name:<40} {role:<12} {avail:>5.0f} {used:>5.0f} "
                         f"{s['mean_len']:>7.1f} {s['max_len']:>5.0f} "
                         f"{s['mean_response_len']:>6.1f} {s['n_truncated']:>5.0f}")
        return "\n".join(lines)


def _length_stats(examples: Sequence[Example], n_truncated: int) -> dict[str, float]:
    lengths = np.array([len(ex) for ex in examples], dtype=np.int64)
    response = np.array([ex.n_supervised for ex in examples], dtype=np.int64)
    if lengths.size == 0:
        return {"n": 0, "tokens": 0, "min_len": 0, "mean_len": 0.0, "max_len": 0,
                "mean_response_len": 0.0, "n_truncated": 0}
    return {"n": int(lengths.size), "tokens": int(lengths.sum()), "min_len": int(lengths.min()),
            "mean_len": float(lengths.mean()), "max_len": int(lengths.max()),
            "mean_response_len": float(response.mean()), "n_truncated": int(n_truncated)}
