"""Metrics for the paper's tasks: UIE extraction F1 (NER / RE / entity typing) and GLUE-style
classification scores.

UIE answers are the replay data's ``output`` strings::

    NER / ET  " genre: scary; year: 1960 s"
              -> {("genre", "scary"), ("year", "1960 s")}
    RE        " Work for: Fred Bauman, Habitat for Humanity"
              -> {("Work for", "Fred Bauman", "Habitat for Humanity")}
    empty     " None" -> set()

Scoring follows InstructUIE's evaluator (the benchmark these datasets and prompts come from):
each answer becomes a **set** of tuples (a tuple repeated in one answer counts once, in the
prediction and in the reference alike — the NYT references do repeat triples), and precision,
recall and F1 are **micro**-averaged over all tuples of all examples. A tuple is correct only if
every field matches exactly after whitespace is collapsed (case-sensitive). Items that do not
parse (no ``type:`` part, no head/tail separator) are dropped, as there. When there are no
predicted (or no reference) tuples at all, precision (recall) is 0. Scores are fractions in
[0, 1]; the paper reports them times 100.

Parsing rules (from the six replay sets):

* text after the first end token (``<|eot_id|>``, ``<|im_end|>``, ``</s>``, ...) is ignored;
* items are separated by ``;`` (empty items, e.g. from a trailing ``;``, are skipped);
* an item's type is the text before its first ``:`` (types never contain one; spans may:
  ``material: Nd : YAG``);
* an RE value splits into head and tail at the first ``", "`` whose comma is not preceded by a
  space: the data is tokenized text, so commas *inside* spans read ``" , "``
  (``Live in: Emily Dickinson, Amherst , Mass``); failing that at the first ``,``;
* ``None`` / ``no relation`` / ``[]`` / nothing at all is the empty answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

END_TOKENS: tuple[str, ...] = (
    "<|eot_id|>", "<|im_end|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>",
)
EMPTY_ANSWERS = frozenset({"", "none", "no relation", "[]", "null"})
UIE_KINDS = ("ner", "re", "et", "auto")

_HEAD_TAIL_SEP = re.compile(r"(?<!\s),\s")


def _normalize(text: str) -> str:
    return " ".join(text.split())


def strip_generation(text: str) -> str:
    """Drop everything from the first end token on, and the surrounding whitespace."""
    cut = len(text)
    for token in END_TOKENS:
        i = text.find(token)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def _items(text: str) -> list[tuple[str, str]]:
    """``(type, value)`` pairs of an answer, normalized, malformed items dropped."""
    text = strip_generation(text)
    if _normalize(text).lower() in EMPTY_ANSWERS:
        return []
    pairs = []
    for item in text.split(";"):
        label, colon, value = item.partition(":")
        label, value = _normalize(label), _normalize(value)
        if colon and label and value:
            pairs.append((label, value))
    return pairs


def _split_head_tail(value: str) -> tuple[str, str] | None:
    match = _HEAD_TAIL_SEP.search(value)
    if match is not None:
        head, tail = value[:match.start()], value[match.end():]
    elif "," in value:
        head, _, tail = value.partition(",")
    else:
        return None
    head, tail = _normalize(head), _normalize(tail)
    return (head, tail) if head and tail else None


def _looks_like_re(pairs: Iterable[tuple[str, str]]) -> bool:
    pairs = list(pairs)
    return bool(pairs) and all(_HEAD_TAIL_SEP.search(v) for _, v in pairs)


def parse_uie(text: str, kind: str = "auto") -> list[tuple[str, ...]]:
    """Parse one UIE answer into tuples, in order, duplicates kept.

    Args:
        text: ``"type: span; type: span"`` (NER, ET) or ``"relation: head, tail; ..."`` (RE),
            possibly with stray spaces, a trailing ``;`` or a trailing end token.
        kind: ``"ner"`` / ``"et"`` -> ``(type, span)`` pairs; ``"re"`` -> ``(relation, head,
            tail)`` triples; ``"auto"`` -> triples when *every* item has a head/tail separator,
            else pairs. ``auto`` decides per answer, so a lone NER item whose span holds
            ``", "`` would read as a triple: pass ``kind`` when you know it
            (:func:`uie_scores` decides ``auto`` once per dataset).
    """
    if kind not in UIE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(UIE_KINDS)}, got {kind!r}")
    pairs = _items(text)
    if kind == "auto":
        kind = "re" if _looks_like_re(pairs) else "ner"
    if kind != "re":
        return list(pairs)
    triples = []
    for relation, value in pairs:
        head_tail = _split_head_tail(value)
        if head_tail is not None:
            triples.append((relation, *head_tail))
    return triples


def infer_uie_kind(references: Iterable[str]) -> str:
    """``"re"`` if every item of every reference has a head/tail separator, else ``"ner"``."""
    pairs = [p for ref in references for p in _items(ref)]
    return "re" if _looks_like_re(pairs) else "ner"


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def uie_scores(predictions: Sequence[str], references: Sequence[str],
               kind: str = "auto") -> dict[str, float]:
    """Micro precision / recall / F1 over tuple sets, and exact match per example.

    Returns:
        ``precision``, ``recall``, ``f1``, ``exact_match`` (fraction of examples whose tuple set
        equals the reference's; two empty answers match), ``n`` (examples) and the counts
        ``n_correct``, ``n_pred``, ``n_gold`` (tuples).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if kind not in UIE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(UIE_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = infer_uie_kind(references)
    tp = n_pred = n_gold = exact = 0
    for pred, ref in zip(predictions, references, strict=True):
        pred_set, gold_set = set(parse_uie(pred, kind)), set(parse_uie(ref, kind))
        tp += len(pred_set & gold_set)
        n_pred += len(pred_set)
        n_gold += len(gold_set)
        exact += pred_set == gold_set
    precision, recall, f1 = _prf(tp, n_pred, n_gold)
    n = len(references)
    return {"precision": precision, "recall": recall, "f1": f1,
            "exact_match": exact / n if n else 0.0, "n": n,
            "n_correct": tp, "n_pred": n_pred, "n_gold": n_gold}


def classification_scores(predictions: Sequence[str], references: Sequence[str],
                          labels: Sequence[str] | None = None,
                          pos_label: str | None = None) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation of label strings (GLUE-style).

    Answers are compared after :func:`strip_generation` and whitespace collapsing
    (case-sensitive); a prediction outside the label set is simply wrong.

    Args:
        labels: the label set (default: the distinct references, sorted).
        pos_label: if given, ``f1`` is the **binary** F1 of this class (MRPC/QQP style);
            otherwise ``f1`` is the **macro** F1 over ``labels`` (classes without predictions
            or references score 0).

    Returns:
        ``accuracy``, ``f1``, ``mcc`` (multiclass Matthews / Gorodkin's R_K over the labels and
        whatever else was predicted; equals the usual binary MCC for two classes; 0 when
        undefined) and ``n``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds = [_normalize(strip_generation(p)) for p in predictions]
    refs = [_normalize(strip_generation(r)) for r in references]
    n = len(refs)
    if n == 0:
        return {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0, "n": 0}
    label_set = [_normalize(x) for x in labels] if labels is not None else sorted(set(refs))
    if pos_label is not None:
        pos_label = _normalize(pos_label)
        if pos_label not in label_set:
            raise ValueError(f"pos_label {pos_label!r} is not one of the labels {label_set}")
    accuracy = sum(p == r for p, r in zip(preds, refs, strict=True)) / n

    def class_f1(label: str) -> float:
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        return _prf(tp, preds.count(label), refs.count(label))[2]

    f1 = class_f1(pos_label) if pos_label is not None else (
        sum(class_f1(lab) for lab in label_set) / len(label_set))
    return {"accuracy": accuracy, "f1": f1, "mcc": _mcc(preds, refs, label_set), "n": n}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of answers equal to their reference after :func:`strip_generation` and
    whitespace collapsing (case-sensitive): the score of free-form answers (0 when empty)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    same = [_normalize(strip_generation(p)) == _normalize(strip_generation(r))
            for p, r in zip(predictions, references, strict=True)]
    return sum(same) / len(same) if same else 0.0


def _mcc(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str]) -> float:
    classes = list(dict.fromkeys([*labels, *refs, *preds]))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for p, r in zip(preds, refs, strict=True):
        confusion[index[r]][index[p]] += 1
    s = len(refs)
    correct = sum(confusion[i][i] for i in range(k))
    true_counts = [sum(row) for row in confusion]
    pred_counts = [sum(confusion[i][j] for i in range(k)) for j in range(k)]
    cov_xy = correct * s - sum(t * p for t, p in zip(true_counts, pred_counts, strict=True))
    cov_xx = s * s - sum(p * p for p in pred_counts)
    cov_yy = s * s - sum(t * t for t in true_counts)
    if cov_xx == 0 or cov_yy == 0:
        return 0.0
    return cov_xy / (cov_xx * cov_yy) ** 0.5
