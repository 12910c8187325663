"""Deterministic synthetic UIE-style tasks (the demo's and the tests' replay and eval data).

The HeteroFusion paper fuses LoRA experts trained on universal-information-extraction (UIE)
tasks: NER (MIT-Movie, TweetNER7), relation extraction (CoNLL04, NYT) and entity typing
(FindVehicle, FabNER). This module generates small, fully synthetic look-alikes of such tasks
from built-in vocabularies so the demo and the tests need no
downloads.

Records are Alpaca dicts ``{"instruction", "input", "output", "history": []}`` in the style of
the replay data (docs/algorithm.md §8): ``instruction`` holds a task prompt, ``Option: ...`` (the
label
set), ``Text: ...`` (the input again) and ends with ``\\nAnswer:``; ``output`` starts with a space
and is ``type: span; type: span`` (NER, entity typing) or ``relation: head, tail; ...``
(relation extraction). Every span occurs verbatim in ``input``.

All tasks share the same prompt families, output grammar and (partly) vocabularies, so that
transfer between them is plausible, but each has its own label set.

Public API: :data:`TASKS`, :func:`make_task`, :func:`make_splits`, :func:`write_task_files`,
:func:`pretraining_corpus`, :func:`parse_output`.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfjax.atomic import write_json_atomic

__all__ = [
    "SPLITS",
    "TASKS",
    "TaskSpec",
    "format_example",
    "make_splits",
    "make_task",
    "parse_output",
    "pretraining_corpus",
    "write_task_files",
]

SPLITS: tuple[str, ...] = ("train", "replay", "test")

# --------------------------------------------------------------------------------------------
# Vocabularies. Spans never contain ":" , ";" or "," so that outputs parse unambiguously.
# --------------------------------------------------------------------------------------------

# fmt: off

FIRST_NAMES = (
    "Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Keira", "Luca", "Maya", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Samir", "Tara",
    "Umar", "Vera", "Wes", "Ximena", "Yusuf", "Zoe", "Anton", "Bianca", "Chen", "Dalia",
)
LAST_NAMES = (
    "Abbott", "Barros", "Castell", "Dorsey", "Eklund", "Ferraro", "Galvez", "Holm", "Ivanova",
    "Jansen", "Kowal", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinlan",
    "Rahman", "Sato", "Tanaka", "Ulrich", "Varga", "Weller", "Xu", "Yilmaz", "Zamora",
    "Brandt", "Costa", "Duval", "Engel",
)
#: City -> the country it is in (keeps "located in" facts consistent across the corpus).
CITY_COUNTRY: dict[str, str] = {
    "Lisbon": "Portugal", "Oslo": "Norway", "Nairobi": "Kenya", "Denver": "United States",
    "Kyoto": "Japan", "Porto": "Portugal", "Austin": "United States", "Lyon": "France",
    "Perth": "Australia", "Quito": "Ecuador", "Seville": "Spain", "Tallinn": "Estonia",
    "Tucson": "United States", "Utrecht": "Netherlands", "Valencia": "Spain",
    "Winnipeg": "Canada", "Zagreb": "Croatia", "Bergen": "Norway", "Cairo": "Egypt",
    "Dublin": "Ireland", "Geneva": "Switzerland", "Hanoi": "Vietnam", "Krakow": "Poland",
    "Leeds": "United Kingdom", "Cape Town": "South Africa", "San Jose": "United States",
}
CITIES = tuple(CITY_COUNTRY)
COUNTRIES = tuple(sorted(set(CITY_COUNTRY.values()))) + (
    "Chile", "Peru", "Ghana", "Iceland", "Mexico", "New Zealand", "South Korea", "Brazil",
    "Morocco",
)
ORG_PREFIXES = (
    "Northwind", "Bluepeak", "Ironleaf", "Suncrest", "Quantix", "Redwood", "Silverline",
    "Orbital", "Greenfield", "Nimbus", "Cobalt", "Starling", "Harbor", "Vertex", "Lumen",
    "Atlas",
)
ORG_SUFFIXES = (
    "Labs", "Systems", "Bank", "Motors", "Media", "Foods", "Energy", "Group", "Airlines",
    "Robotics", "Pharma", "Studios",
)
PRODUCT_BRANDS = ("Zenix", "Pixelon", "Aero", "Novaphone", "Kestrel", "Orca", "Tempo", "Vivid")
PRODUCT_LINES = ("Pad", "Buds", "Watch", "Book", "Cam", "Drone", "Beam", "Note")
PRODUCT_TIERS = ("", " Pro", " Mini", " Max", " Lite")
EVENTS = (
    "Summer Music Festival", "Global Tech Summit", "Winter Games", "Robotics Expo",
    "Harvest Fair", "Open Chess Championship", "Film Awards Night", "Startup Week",
    "Space Week", "Book Fair", "Design Biennale", "Marathon Weekend",
)
SPORTS_TEAMS = (
    "Red Falcons", "Iron Wolves", "Blue Herons", "Northern Stags", "Golden Bears",
    "River Otters", "Storm Riders", "Silver Foxes", "Thunder Hawks", "Mountain Lions",
)
BANDS = (
    "The Velvet Owls", "Paper Comets", "Glass Anchors", "The Midnight Ferns", "Copper Tides",
    "Static Gardens", "The Hollow Pines", "Lunar Parade", "Wild Semaphore", "Quiet Engines",
)

# Movie task (lower-cased queries, in the spirit of MIT-Movie).
GENRES = (
    "comedy", "horror", "thriller", "romantic comedy", "documentary", "science fiction",
    "western", "musical", "animated", "war", "mystery", "fantasy", "crime drama", "adventure",
)
TITLE_ADJECTIVES = (
    "silent", "broken", "golden", "hidden", "crimson", "lonely", "frozen", "electric", "wild",
    "secret", "burning", "distant",
)
TITLE_NOUNS = (
    "harbor", "empire", "garden", "signal", "river", "mirror", "kingdom", "voyage", "echo",
    "orchard", "lantern", "storm", "compass", "island",
)
CHARACTER_ROLES = ("captain", "detective", "agent", "professor", "doctor", "sergeant")
CHARACTER_NAMES = ("vega", "rook", "lune", "moss", "hale", "orin", "kade", "sable", "quill", "brix")
RATINGS = ("pg", "pg 13", "nc 17", "g")

# Vehicle task (in the spirit of FindVehicle).
COLORS = (
    "red", "dark blue", "silver", "black", "white", "pearl white", "forest green", "yellow",
    "orange", "matte grey",
)
CAR_BRANDS = ("Ferrol", "Kanto", "Virex", "Marlin", "Solano", "Brisk", "Tavor", "Ostra")
CAR_MODELS = (
    "Coupe 300", "Trail X", "Metro 2", "Ranger S", "Vista GT", "Nomad", "Pulse 5", "Summit",
    "Breeze Hybrid", "Atlas Four",
)
DIRECTIONS = ("left", "right", "straight ahead", "towards us", "away from us", "north", "south")
SPEED_UNITS = ("km/h", "kilometers per hour", "mph")
# fmt: on


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _org(rng: random.Random) -> str:
    return f"{rng.choice(ORG_PREFIXES)} {rng.choice(ORG_SUFFIXES)}"


def _product(rng: random.Random) -> str:
    return (
        f"{rng.choice(PRODUCT_BRANDS)} {rng.choice(PRODUCT_LINES)} {rng.randint(2, 15)}"
        f"{rng.choice(PRODUCT_TIERS)}"
    )


def _year(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return f"{rng.randrange(1950, 2020, 10)} s"
    return str(rng.randint(1950, 2023))


def _title(rng: random.Random) -> str:
    adj, noun = rng.choice(TITLE_ADJECTIVES), rng.choice(TITLE_NOUNS)
    noun2 = rng.choice(TITLE_NOUNS)
    form = rng.randrange(3)
    if form == 0:
        return f"the {adj} {noun}"
    if form == 1:
        return f"{adj} {noun}"
    return f"{noun} of the {adj} {noun2}" if noun != noun2 else f"the last {noun}"


def _speed(rng: random.Random) -> str:
    return f"{rng.randint(20, 180)} {rng.choice(SPEED_UNITS)}"


def _event(rng: random.Random) -> str:
    event = rng.choice(EVENTS)
    return f"{event} {rng.randint(2015, 2025)}" if rng.random() < 0.3 else event


#: Slot name -> sampler. Slot names are used in text templates as ``{slot}``.
_SAMPLERS: dict[str, Callable[[random.Random], str]] = {
    "person": _person,
    "org": _org,
    "city": lambda r: r.choice(CITIES),
    "country": lambda r: r.choice(COUNTRIES),
    "location": lambda r: r.choice(CITIES + COUNTRIES),
    "product": _product,
    "event": _event,
    "team": lambda r: r.choice(SPORTS_TEAMS),
    "band": lambda r: r.choice(BANDS),
    "genre": lambda r: r.choice(GENRES),
    "year": _year,
    "title": _title,
    "lperson": lambda r: _person(r).lower(),
    "character": lambda r: f"{r.choice(CHARACTER_ROLES)} {r.choice(CHARACTER_NAMES)}",
    "rating": lambda r: r.choice(RATINGS),
    "color": lambda r: r.choice(COLORS),
    "brand": lambda r: r.choice(CAR_BRANDS),
    "model": lambda r: r.choice(CAR_MODELS),
    "direction": lambda r: r.choice(DIRECTIONS),
    "speed": _speed,
}


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------

_SLOT_RE = re.compile(r"\{(\w+?)(\d*)\}")


def _fill(template: str, rng: random.Random, slot_labels: Mapping[str, str]) -> tuple[str, list]:
    """Fill ``template``'s ``{slot}`` / ``{slotN}`` placeholders.

    Returns the text and the list of ``(key, label, value)`` in order of appearance; ``key`` is
    ``slotN`` (the same key reuses the same value), ``label`` is ``slot_labels[slot]``.
    Distinct keys of the same slot get distinct values where possible; ``{countryN}`` is the
    country of ``{cityN}`` when both appear.
    """
    values: dict[str, str] = {}
    spans: list[tuple[str, str, str]] = []
    used: set[str] = set()

    def repl(m: re.Match[str]) -> str:
        slot, idx = m.group(1), m.group(2)
        key = f"{slot}{idx}" if idx else f"{slot}@{m.start()}"
        if key not in values:
            city = values.get(f"city{idx}") if idx else None
            if slot == "country" and city is not None:
                value = CITY_COUNTRY[city]
            else:
                value = _SAMPLERS[slot](rng)
                for _ in range(10):
                    if value not in used:
                        break
                    value = _SAMPLERS[slot](rng)
            used.add(value)
            values[key] = value
            spans.append((key, slot_labels[slot], value))
        return values[key]

    text = _SLOT_RE.sub(repl, template)
    return text, spans


@dataclass(frozen=True)
class TaskSpec:
    """A synthetic task.

    Attributes:
        name: Task name (file prefix and dataset-name prefix).
        kind: ``"ner"``, ``"re"`` or ``"et"``.
        labels: The option list (in the fixed order shown in every instruction).
        templates: Text templates. For NER/ET a string with ``{slot}`` placeholders; for RE a
            ``(template, [(relation, head_key, tail_key), ...])`` pair with numbered slots.
        slot_labels: Slot name -> label (the type written in the output).
        description: One line for humans.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    templates: tuple[Any, ...]
    slot_labels: Mapping[str, str]
    description: str

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """Draw one record (may repeat inputs; :func:`make_task` deduplicates)."""
        template = rng.choice(self.templates)
        if self.kind == "re":
            text_t, relations = template
            text, spans = _fill(text_t, rng, self.slot_labels)
            by_key = {k: v for k, _, v in spans}
            pairs = [(rel, by_key[h], by_key[t]) for rel, h, t in relations]
            output = " " + "; ".join(f"{rel}: {h}, {t}" for rel, h, t in pairs)
        else:
            text, spans = _fill(template, rng, self.slot_labels)
            output = " " + "; ".join(f"{label}: {value}" for _, label, value in spans)
        prompt = rng.choice(_PROMPTS[self.kind])
        instruction = f"{prompt}\nOption: {', '.join(self.labels)} \nText: {text} \n"
        if self.kind == "et":  # entity typing lists the entities after the text
            instruction += f" Entities: {', '.join(v for _, _, v in spans)} \n"
        instruction += "Answer:"
        return {"instruction": instruction, "input": text, "output": output, "history": []}


_NER_FORMAT = 'Output format is "type1: word1; type2: word2". '
_RE_FORMAT = 'The output format is "relation1: word1, word2; relation2: word3, word4". '
_PROMPTS: dict[str, tuple[str, ...]] = {
    "ner": (
        "Extract every entity word in the text that belongs to one of the given categories."
        + _NER_FORMAT,
        "Identify the entity words in the text and label each with a category from the options."
        + _NER_FORMAT,
        "List the entity mentions in the text that match the listed categories." + _NER_FORMAT,
    ),
    "re": (
        "Extract the pairs of phrases in the text that are linked by one of the given relations. "
        + _RE_FORMAT,
        "Read the sentence and list the subject and object of every relation from the options. "
        + _RE_FORMAT,
        "Find the word pairs in the text connected by a listed relationship. " + _RE_FORMAT,
    ),
    "et": (
        "Given options, assign a category to each of the listed entity words." + _NER_FORMAT,
        "Tell me the type of every entity word listed after the text." + _NER_FORMAT,
        "Classify each listed entity word into one of the option categories." + _NER_FORMAT,
    ),
}

MOVIE = TaskSpec(
    name="movie",
    kind="ner",
    labels=("genre", "year", "title", "director", "actor", "character", "rating"),
    templates=(
        "show me a {genre} movie from {year}",
        "any {genre} films directed by {director}",
        "what {genre} movie from {year} stars {actor}",
        "who directed {title}",
        "is {title} rated {rating}",
        "find movies with {actor} and {actor}",
        "which film has {actor} playing {character}",
        "i want to watch a {rating} {genre} movie with {actor}",
        "did {director} make a {genre} movie in {year}",
        "who played {character} in {title}",
        "list {genre} movies starring {actor} from {year}",
        "was {title} directed by {director}",
        "what year did {title} come out",
        "give me the cast of {title} from {year}",
        "is there a {genre} movie where {character} fights crime",
        "{actor} movies directed by {director} rated {rating}",
    ),
    slot_labels={
        "genre": "genre",
        "year": "year",
        "title": "title",
        "director": "director",
        "actor": "actor",
        "character": "character",
        "rating": "rating",
    },
    description="NER over lower-cased movie queries (MIT-Movie-like).",
)

NEWS = TaskSpec(
    name="news",
    kind="ner",
    labels=("person", "location", "organization", "product", "event"),
    templates=(
        "{person} announced that {organization} will open a new office in {location} .",
        "Just got the new {product} from {organization} and it is amazing !",
        "Huge crowds at the {event} in {location} today",
        "{organization} unveils the {product} at the {event}",
        "{person} and {person} spoke at the {event} about the future of {organization}",
        "Can't believe {person} left {organization} for a startup in {location}",
        "Reviewing the {product} : battery life is great , camera is meh",
        "{person} spotted in {location} wearing a {organization} jacket",
        "Breaking : {organization} recalls the {product} after complaints in {location}",
        "Tickets for the {event} sold out in minutes , says {person}",
        "Is the {product} worth it ? {person} thinks so",
        "{organization} shares rise after {person} praises the {product}",
    ),
    slot_labels={
        "person": "person",
        "location": "location",
        "organization": "organization",
        "product": "product",
        "event": "event",
    },
    description="NER over tweet/news-like sentences (TweetNER7-like).",
)

RELATION = TaskSpec(
    name="relation",
    kind="re",
    labels=("works for", "born in", "lives in", "located in", "founded by"),
    templates=(
        (
            "{person1} , who works for {org1} , was born in {city1} .",
            [("works for", "person1", "org1"), ("born in", "person1", "city1")],
        ),
        (
            "{org1} is headquartered in {city1} , {country1} .",
            [("located in", "org1", "city1"), ("located in", "city1", "country1")],
        ),
        ("{org1} was founded by {person1} in {year1} .", [("founded by", "org1", "person1")]),
        (
            "{person1} moved to {city1} last year and now lives there with {person2} .",
            [("lives in", "person1", "city1"), ("lives in", "person2", "city1")],
        ),
        (
            "Born in {city1} , {person1} joined {org1} as an engineer .",
            [("born in", "person1", "city1"), ("works for", "person1", "org1")],
        ),
        (
            "{person1} , a spokesperson for {org1} , said it will expand beyond {country1} .",
            [("works for", "person1", "org1")],
        ),
        (
            "{city1} , a city in {country1} , hosts the offices of {org1} .",
            [("located in", "city1", "country1"), ("located in", "org1", "city1")],
        ),
        (
            "{person1} , who lives in {city1} , met {person2} to discuss the merger .",
            [("lives in", "person1", "city1")],
        ),
        (
            "The analyst {person1} of {org1} lives in {city1} .",
            [("works for", "person1", "org1"), ("lives in", "person1", "city1")],
        ),
        (
            "{org1} , founded by {person1} and {person2} , is based in {city1} .",
            [
                ("founded by", "org1", "person1"),
                ("founded by", "org1", "person2"),
                ("located in", "org1", "city1"),
            ],
        ),
        (
            "{person1} was born in {country1} but has lived in {city1} since {year1} .",
            [("born in", "person1", "country1"), ("lives in", "person1", "city1")],
        ),
        (
            "Engineers at {org1} , which {person1} founded , praised {person2} .",
            [("founded by", "org1", "person1")],
        ),
    ),
    slot_labels={
        "person": "person",
        "org": "organization",
        "city": "city",
        "country": "country",
        "year": "year",
    },
    description="Relation extraction between people, organizations and places (CoNLL04-like).",
)

TYPING = TaskSpec(
    name="typing",
    kind="et",
    labels=(
        "athlete",
        "musician",
        "scientist",
        "politician",
        "city",
        "country",
        "sports team",
        "band",
    ),
    templates=(
        "Striker {athlete} scored twice as the {team} beat the {team} .",
        "The physicist {scientist} won a prize for her work on superconductors in {city} .",
        "{musician} , lead singer of {band} , performed in {city} last night .",
        "Senator {politician} visited {country} to discuss trade .",
        "{scientist} published a paper with {scientist} on battery chemistry .",
        "{politician} criticised the stadium plans of the {team} .",
        "{band} announced a world tour starting in {city1} , {country1} .",
        "The tennis star {athlete} moved to {country} after the season .",
        "Guitarist {musician} left {band} to record a solo album .",
        "Minister {politician} met the chemist {scientist} in {city} .",
        "The {team} signed goalkeeper {athlete} from {country} .",
        "Drummer {musician} and sprinter {athlete} grew up in {city} .",
    ),
    slot_labels={
        "athlete": "athlete",
        "musician": "musician",
        "scientist": "scientist",
        "politician": "politician",
        "city": "city",
        "country": "country",
        "team": "sports team",
        "band": "band",
    },
    description="Entity typing of the listed entities into fine-grained types.",
)

VEHICLE = TaskSpec(
    name="vehicle",
    kind="ner",
    labels=("color", "brand", "model", "direction", "speed"),
    templates=(
        "I saw a {color} {brand} {model} driving {direction} at {speed}",
        "There is a {color} {brand} heading {direction}",
        "A {brand} {model} passed us going {speed}",
        "Look at that {color} {model} turning {direction}",
        "The {color} {brand} {model} in the left lane is doing {speed}",
        "A {brand} {model} and a {color} {brand} are moving {direction}",
        "Camera caught a {color} {brand} at {speed} going {direction}",
    ),
    slot_labels={
        "color": "color",
        "brand": "brand",
        "model": "model",
        "direction": "direction",
        "speed": "speed",
    },
    description="NER over traffic descriptions (FindVehicle-like).",
)

# Slots named after labels need samplers; alias them.
_SAMPLERS.update(
    {
        "director": _SAMPLERS["lperson"],
        "actor": _SAMPLERS["lperson"],
        "organization": _org,
        "athlete": _person,
        "musician": _person,
        "scientist": _person,
        "politician": _person,
    }
)

#: All synthetic tasks by name.
TASKS: dict[str, TaskSpec] = {t.name: t for t in (MOVIE, NEWS, RELATION, TYPING, VEHICLE)}


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (string seeding is stable across processes)."""
    return random.Random(":".join(str(p) for p in parts))


def _unique_records(
    spec: TaskSpec, n: int, rng: random.Random, exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    budget = 100 * n + 1000
    while len(out) < n:
        if budget == 0:
            raise ValueError(f"task {spec.name!r}: could not draw {n} distinct inputs")
        budget -= 1
        rec = spec.sample(rng)
        if rec["input"] in seen or rec["input"] in exclude:
            continue
        seen.add(rec["input"])
        out.append(rec)
    return out


def make_task(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Generate ``n`` records of task ``name`` with pairwise distinct ``input`` texts.

    Deterministic in ``(name, n, seed)``; the first ``k`` records do not depend on ``n``.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return _unique_records(TASKS[name], n, _rng("task", name, seed))


def make_splits(
    name: str, *, n_train: int, n_replay: int, n_test: int, seed: int, n_val: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Train/replay/test (and, with ``n_val``, val) splits of task ``name``, disjoint by
    ``input`` text.

    Drawn from one deduplicated stream in the order test, val, replay, train, so the test
    (and val, replay) sets for a seed do not change when ``n_train`` changes, and
    ``n_val=0`` gives the splits of earlier versions (no ``"val"`` key). The val split is
    where settings are chosen; the test split is scored once.
    """
    recs = make_task(name, n_test + n_val + n_replay + n_train, seed)
    a, b, c = n_test, n_test + n_val, n_test + n_val + n_replay
    splits = {"test": recs[:a], "val": recs[a:b], "replay": recs[b:c], "train": recs[c:]}
    inputs = [r["input"] for s in splits.values() for r in s]
    assert len(set(inputs)) == len(inputs), "splits overlap"
    return {k: splits[k] for k in (*SPLITS, "val") if k != "val" or n_val}


def write_task_files(
    out_dir: str | os.PathLike[str],
    splits_by_task: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
) -> dict[str, dict[str, str]]:
    """Write ``<task>_<split>.json`` (JSON lists) and a LlamaFactory ``dataset_info.json``.

    Args:
        out_dir: Output directory (created if missing).
        splits_by_task: ``{task_name: {split_name: records}}``, e.g. from :func:`make_splits`.

    Returns:
        The dataset info written: ``{"<task>_<split>": {"file_name": "<task>_<split>.json"}}``.
        An existing ``dataset_info.json`` is replaced, not merged. Every file is written
        atomically (temporary file in ``out_dir`` + rename).
    """
    out = Path(out_dir)
    info: dict[str, dict[str, str]] = {}
    for task, splits in splits_by_task.items():
        for split, records in splits.items():
            ds_name = f"{task}_{split}"
            file_name = f"{ds_name}.json"
            write_json_atomic(out / file_name, [dict(r) for r in records], indent=1,
                              ensure_ascii=False)
            info[ds_name] = {"file_name": file_name}
    write_json_atomic(out / "dataset_info.json", info, indent=1, ensure_ascii=False)
    return info


def format_example(record: Mapping[str, Any]) -> str:
    """Plain-text rendering of a record: user message (docs/algorithm.md §8) + newline + output."""
    return f"{record['instruction']}\n{record['input']}\n{record['output']}"


_GENERIC_TEMPLATES = (
    "{person} lives in {city} and works for {org} .",
    "{org} opened a new office in {city1} , {country1} .",
    "The {genre} film {title} was released in {year} .",
    "{person} bought a {color} {brand} {model} in {city} .",
    "The {team} play their home games in {city} .",
    "{band} released a new album produced by {person} .",
    "{person} presented the {product} at the {event} .",
    "Many people in {country} enjoy {genre} movies .",
    "{person} wrote a book about {org} and its founder {person} .",
    "The road from {city} to {city} is busy on weekends .",
    "{person} said the {product} is cheaper in {country} .",
    "{director} directed {title} , starring {actor} as {character} .",
)
_GENERIC_LABELS = {k: k for k in _SAMPLERS}


_COPY_SLOTS = ("person", "org", "city", "country", "product", "team", "band", "title", "lperson",
               "character", "color", "brand", "model", "speed", "year", "genre", "event")


def _copy_document(rng: random.Random, specs: Sequence[TaskSpec],
                   exclude_inputs: Collection[str]) -> str | None:
    """One copy-heavy document: sentences, then a verbatim repeat or a list of their spans.

    ``"<s1> <s2> || <s1> <s2>"`` (the text again) or ``"<s1> <s2>\nMentions: a, b, c"``
    (every slot value in order of appearance, without labels): next-token prediction on these
    rewards attending back to an earlier occurrence and copying it, the skill exact-span
    extraction needs and a few hundred steps of plain text do not teach a tiny model. No task
    label or answer format appears, so no task is taught here.
    """
    texts: list[str] = []
    spans: list[str] = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            text, filled = _fill(rng.choice(_GENERIC_TEMPLATES), rng, _GENERIC_LABELS)
            values = [v for _, _, v in filled]
        else:
            spec = rng.choice(specs)
            template = rng.choice(spec.templates)
            text_t = template[0] if spec.kind == "re" else template
            text, filled = _fill(text_t, rng, spec.slot_labels)
            values = [v for _, _, v in filled]
        if text in exclude_inputs:
            return None
        texts.append(text)
        spans.extend(values)
    body = " ".join(texts)
    kind = rng.randrange(3)
    if kind == 0 or not spans:
        return f"{body} || {body}"
    if kind == 1:
        return f"{body}\nMentions: {', '.join(spans)}"
    # Names in a random order, repeated: only copying predicts the second half.
    pool = [_SAMPLERS[slot](rng) for slot in rng.choices(_COPY_SLOTS, k=rng.randint(4, 10))]
    seq = " ".join(pool)
    return f"{seq} || {seq}"


def pretraining_corpus(
    n_docs: int,
    seed: int,
    *,
    task_fraction: float = 0.2,
    copy_fraction: float = 0.0,
    exclude_inputs: Collection[str] = (),
) -> list[str]:
    """Generic synthetic text to briefly pretrain the tiny base models (and train tokenizers).

    Each document is either 2-6 sentences drawn from generic templates and from the task text
    generators (same vocabularies as the tasks), or, with probability ``task_fraction``, a
    formatted task example (:func:`format_example`) of a random task, or, with probability
    ``copy_fraction``, a copy-heavy document (a verbatim repeat or a list of the sentences'
    spans; see ``_copy_document``). Sentences or examples whose text is in
    ``exclude_inputs`` (e.g. the test inputs) are skipped. Deterministic in ``(n_docs, seed,
    task_fraction, copy_fraction)`` and ``exclude_inputs``; ``copy_fraction=0`` gives exactly
    the corpus of earlier versions.
    """
    if not 0.0 <= task_fraction + copy_fraction <= 1.0 or min(task_fraction, copy_fraction) < 0:
        raise ValueError(f"task_fraction {task_fraction} + copy_fraction {copy_fraction} must "
                         "be fractions summing to at most 1")
    rng = _rng("pretrain", seed)
    specs = [TASKS[k] for k in sorted(TASKS)]
    docs: list[str] = []
    while len(docs) < n_docs:
        if copy_fraction and rng.random() < copy_fraction:
            doc = _copy_document(rng, specs, exclude_inputs)
            if doc is not None:
                docs.append(doc)
            continue
        if rng.random() < task_fraction / (1.0 - copy_fraction):
            rec = rng.choice(specs).sample(rng)
            if rec["input"] in exclude_inputs:
                continue
            docs.append(format_example(rec))
            continue
        sentences: list[str] = []
        for _ in range(rng.randint(2, 6)):
            if rng.random() < 0.5:
                text, _ = _fill(rng.choice(_GENERIC_TEMPLATES), rng, _GENERIC_LABELS)
            else:
                text = rng.choice(specs).sample(rng)["input"]
                if text in exclude_inputs:
                    continue
            sentences.append(text)
        if sentences:
            docs.append(" ".join(sentences))
    return docs


def parse_output(output: str, kind: str = "ner") -> list[tuple[str, ...]]:
    """Parse an output string into tuples.

    ``kind`` ``"ner"``/``"et"``: ``" type: span; type: span"`` -> ``[(type, span), ...]``;
    ``"re"``: ``" rel: head, tail; ..."`` -> ``[(rel, head, tail), ...]``. Malformed parts
    (e.g. from model generations) are skipped; ``" None"`` or empty gives ``[]``.
    """
    result: list[tuple[str, ...]] = []
    for part in output.strip().split(";"):
        part = part.strip()
        if ":" not in part:
            continue
        label, _, value = part.partition(":")
        label, value = label.strip(), value.strip()
        if not label or not value:
            continue
        if kind == "re":
            head, sep, tail = value.partition(",")
            if not sep or not head.strip() or not tail.strip():
                continue
            result.append((label, head.strip(), tail.strip()))
        else:
            result.append((label, value))
    return result
