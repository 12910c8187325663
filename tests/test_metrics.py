"""UIE extraction scores and classification scores, against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hfjax.eval.metrics import (
    classification_scores,
    infer_uie_kind,
    parse_uie,
    strip_generation,
    uie_scores,
)

UIE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "uie_sample300"


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def test_parse_ner_pairs_in_order_with_duplicates():
    assert parse_uie(" genre: scary; year: 1960 s") == [("genre", "scary"), ("year", "1960 s")]
    assert parse_uie("a: x; a: x", kind="ner") == [("a", "x"), ("a", "x")]


@pytest.mark.parametrize("text", [
    " genre: scary; year: 1960 s",
    "genre:scary;year:1960 s",
    "  genre :  scary ;   year:   1960   s ; ",
    "genre: scary; year: 1960 s;<|eot_id|>",
    "genre: scary; year: 1960 s<|im_end|>\n<|im_start|>user junk: more",
    "genre: scary; year: 1960 s</s>",
])
def test_parse_is_robust_to_spaces_trailing_separator_and_end_tokens(text):
    assert parse_uie(text, kind="ner") == [("genre", "scary"), ("year", "1960 s")]


@pytest.mark.parametrize("text", ["", "   ", " None", "none<|eot_id|>", "[]", "no relation", ";"])
def test_parse_empty_answers(text):
    assert parse_uie(text) == [] and parse_uie(text, kind="re") == []


def test_parse_keeps_colons_inside_spans_and_drops_malformed_items():
    assert parse_uie("material: Nd : YAG", kind="ner") == [("material", "Nd : YAG")]
    assert parse_uie("creative work: Hebrews 12:1-4") == [("creative work", "Hebrews 12:1-4")]
    assert parse_uie("genre: scary; year; : x; title:", kind="ner") == [("genre", "scary")]


def test_parse_re_triples_split_head_tail_at_the_unspaced_comma():
    # the data is tokenized text: commas inside spans read " , "
    assert parse_uie(" Live in: Emily Dickinson, Amherst , Mass", kind="re") == [
        ("Live in", "Emily Dickinson", "Amherst , Mass")]
    assert parse_uie("Work for: Gerald McEntee, American Federation of State , County", "re") == [
        ("Work for", "Gerald McEntee", "American Federation of State , County")]
    assert parse_uie("Kill: A , B, C", kind="re") == [("Kill", "A , B", "C")]
    assert parse_uie("Kill: A,B", kind="re") == [("Kill", "A", "B")]  # fallback: first comma
    assert parse_uie("Kill: A B; Kill: C, D", kind="re") == [("Kill", "C", "D")]  # no separator
    # auto: triples only when every item has a head/tail separator
    assert parse_uie(" Work for: Fred Bauman, Habitat for Humanity; Kill: A, B") == [
        ("Work for", "Fred Bauman", "Habitat for Humanity"), ("Kill", "A", "B")]
    assert parse_uie("person: Pankaj Kumar, IAS; group: X") == [
        ("person", "Pankaj Kumar, IAS"), ("group", "X")]
    with pytest.raises(ValueError, match="kind"):
        parse_uie("a: b", kind="ee")


def test_strip_generation():
    assert strip_generation("  a: b <|eot_id|><|eot_id|>") == "a: b"
    assert strip_generation("x</s>y<|im_end|>") == "x"


# --------------------------------------------------------------------------------------------
# UIE scores
# --------------------------------------------------------------------------------------------
REFS = [" genre: scary; year: 1960 s", " title: half baked", " actor: jackie gleason"]


def test_uie_perfect_and_reordered():
    s = uie_scores(REFS, REFS, kind="ner")
    assert (s["precision"], s["recall"], s["f1"], s["exact_match"], s["n"]) == (1, 1, 1, 1, 3)
    reordered = ["year: 1960 s;genre:  scary;", "title: half baked<|eot_id|>",
                 "actor: jackie gleason"]
    assert uie_scores(reordered, REFS)["f1"] == 1.0


def test_uie_partial_by_hand():
    preds = [" genre: scary; year: 1970 s",      # 1 of 2 right, 1 wrong
             " title: half baked; genre: comedy",  # 1 right, 1 extra
             " None"]                              # 1 missed
    s = uie_scores(preds, REFS, kind="ner")
    # tp = 2, predicted = 4, gold = 4
    assert (s["n_correct"], s["n_pred"], s["n_gold"]) == (2, 4, 4)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(0.5) and s["exact_match"] == 0.0
    preds[1] = "title: half baked"
    s = uie_scores(preds, REFS, kind="ner")
    p, r = 2 / 3, 2 / 4
    assert s["precision"] == pytest.approx(p) and s["recall"] == pytest.approx(r)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["exact_match"] == pytest.approx(1 / 3)


def test_uie_empty_prediction_and_empty_reference():
    s = uie_scores(["", "", ""], REFS)
    assert (s["precision"], s["recall"], s["f1"], s["exact_match"]) == (0, 0, 0, 0)
    s = uie_scores(["genre: x", "None"], ["None", "None"], kind="ner")
    assert s["n_gold"] == 0 and s["n_pred"] == 1 and s["recall"] == 0 and s["f1"] == 0
    assert s["exact_match"] == 0.5  # two empty answers match
    assert uie_scores([], [])["n"] == 0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        uie_scores(["a", "b"], ["a"])


def test_uie_duplicates_count_once_on_both_sides():
    ref = [" a: x; a: x; b: y"]
    assert uie_scores(["a: x; b: y"], ref, "ner")["f1"] == 1.0
    s = uie_scores(["a: x; a: x; a: x"], ref, "ner")
    assert (s["n_correct"], s["n_pred"], s["n_gold"]) == (1, 1, 2)


def test_uie_relation_scores_and_auto_kind():
    refs = [" Work for: Fred Bauman, Habitat for Humanity; Work for: Fred Bauman, Yakima",
            " Live in: Emily Dickinson, Amherst , Mass"]
    preds = ["Work for: Fred Bauman, Yakima; Work for: Habitat for Humanity, Fred Bauman",
             "Live in:Emily Dickinson,  Amherst , Mass<|eot_id|>"]
    assert infer_uie_kind(refs) == "re"
    s = uie_scores(preds, refs)  # auto -> re: head/tail order matters
    assert (s["n_correct"], s["n_pred"], s["n_gold"]) == (2, 3, 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert infer_uie_kind([" person: Pankaj Kumar, IAS", " group: X"]) == "ner"
    assert uie_scores(["e: a"], ["e: a"], kind="et")["f1"] == 1.0


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------
def test_classification_binary_by_hand():
    refs = ["pos"] * 6 + ["neg"] * 4
    preds = ["pos"] * 4 + ["neg"] * 2 + ["neg"] * 3 + ["pos"]  # TP 4, FN 2, TN 3, FP 1
    tp, fn, tn, fp = 4, 2, 3, 1
    s = classification_scores(preds, refs, labels=["neg", "pos"], pos_label="pos")
    assert s["accuracy"] == pytest.approx(0.7) and s["n"] == 10
    assert s["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert s["mcc"] == pytest.approx(mcc)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    macro = classification_scores(preds, refs)
    assert macro["f1"] == pytest.approx((2 * tp / (2 * tp + fp + fn) + f1_neg) / 2)
    assert macro["mcc"] == pytest.approx(mcc)


def test_classification_normalizes_and_handles_invalid_predictions():
    refs = ["yes", "no", "yes", "no"]
    preds = [" yes<|eot_id|>", "no </s>", "maybe", "yes"]
    s = classification_scores(preds, refs)
    assert s["accuracy"] == pytest.approx(0.5)
    # yes: tp 1, pred 2, gold 2 -> f1 .5 ; no: tp 1, pred 1, gold 2 -> f1 2/3
    assert s["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert classification_scores(refs, refs)["mcc"] == pytest.approx(1.0)
    assert classification_scores(["yes"] * 4, refs)["mcc"] == 0.0  # undefined -> 0
    assert classification_scores(["no", "yes", "no", "yes"], refs)["mcc"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="pos_label"):
        classification_scores(preds, refs, pos_label="true")


def test_classification_multiclass_mcc_by_hand():
    refs = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "c", "a"]
    # confusion rows=true: a:[1,1,0] b:[0,2,0] c:[1,0,1]; c=4, s=6, t=[2,2,2], p=[2,3,1]
    num = 4 * 6 - (2 * 2 + 2 * 3 + 2 * 1)
    den = math.sqrt((36 - (4 + 9 + 1)) * (36 - 12))
    assert classification_scores(preds, refs)["mcc"] == pytest.approx(num / den)


# --------------------------------------------------------------------------------------------
# the real replay references, when present
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not UIE_DIR.is_dir(), reason="shared/data/uie_sample300 absent")
def test_real_references_score_perfectly_against_themselves_and_kind_is_inferred():
    for path in sorted(UIE_DIR.glob("*.json")):
        refs = [r["output"] for r in json.loads(path.read_text(encoding="utf-8"))]
        kind = infer_uie_kind(refs)
        assert kind == ("re" if path.name.startswith("RE_") else "ner"), path.name
        s = uie_scores(refs, refs)
        assert s["f1"] == 1.0 and s["exact_match"] == 1.0 and s["n"] == 300
        for ref in refs:
            tuples = parse_uie(ref, kind)
            assert tuples or ref.strip() == "None"
