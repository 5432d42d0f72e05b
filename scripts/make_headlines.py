#!/usr/bin/env python3
"""Build the shipped headline-sentiment dataset (Alpaca format) deterministically.

Each example is a synthetic financial news headline built from a company, an
event phrasing and a wrapper template; its label is the sentiment of the event
(``positive``, ``negative`` or ``neutral``).  The test split is held out in
three ways: its companies never occur in train, roughly half of its events use
phrasings that train never uses, and roughly half use wrapper templates that
train never uses.

Usage::

    python scripts/make_headlines.py [--out examples/assets/headlines] [--seed 0]

The vocabulary tables below are shared with ``scripts/build_tiny_base.py``,
which writes unlabeled prose for pretraining the tiny base model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LABELS = ("positive", "negative", "neutral")

INSTRUCTION = (
    "Classify the sentiment of this financial news headline. Answer with one word: positive, negative or neutral."
)

# Fictional company roots. The three pools are disjoint: train, test, and the
# pool used only by the pretraining text of the tiny base.
TRAIN_ROOTS = (
    "Norvale",
    "Brightwater",
    "Kestrel",
    "Ashgrove",
    "Pelham",
    "Corran",
    "Dunmore",
    "Elstow",
    "Fairhaven",
    "Glenrock",
    "Harrowgate",
    "Ivel",
    "Junova",
    "Kilbride",
    "Larkspur",
    "Marlow",
    "Nettleby",
    "Orwell",
    "Penrose",
    "Quarrington",
    "Redfern",
    "Saltash",
    "Thornbury",
    "Ulverton",
    "Vantor",
    "Westbrook",
    "Yarrow",
    "Zephyr",
    "Alderney",
    "Bramwell",
)
TEST_ROOTS = (
    "Calderon",
    "Deverill",
    "Eskmoor",
    "Foxley",
    "Greyling",
    "Halvard",
    "Ingleby",
    "Jorvik",
    "Kinloch",
    "Lindqvist",
    "Morvane",
    "Northcote",
)
PRETRAIN_ROOTS = (
    "Abermoor",
    "Belcastle",
    "Cresswell",
    "Dalgety",
    "Emberly",
    "Fenwick",
    "Galloway",
    "Hollins",
    "Ironbridge",
    "Kelvedon",
    "Lowther",
    "Mirefield",
    "Oakhurst",
    "Pendle",
    "Ravensworth",
    "Stanmore",
    "Tarrant",
    "Upton",
    "Wexcombe",
    "Wyvern",
)

# Sector suffix -> products that sector sells.
SECTORS: dict[str, tuple[str, ...]] = {
    "Motors": ("car", "truck", "electric van"),
    "Pharma": ("drug", "vaccine", "cancer treatment"),
    "Foods": ("snack", "frozen meal", "cereal"),
    "Energy": ("solar panel", "wind turbine", "gas field"),
    "Devices": ("smartwatch", "router", "headset"),
    "Aerospace": ("jet engine", "drone", "aircraft"),
    "Retail": ("store", "clothing line", "online shop"),
    "Systems": ("chip", "server", "software suite"),
    "Mining": ("copper mine", "gold project", "lithium mine"),
    "Telecom": ("mobile plan", "fibre network", "5G service"),
}

CITIES = (
    "London",
    "Frankfurt",
    "Singapore",
    "Toronto",
    "Chicago",
    "Madrid",
    "Oslo",
    "Sydney",
    "Dublin",
    "Zurich",
    "Denver",
    "Lisbon",
)
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
QUARTERS = ("first", "second", "third", "fourth")
PEOPLE = (
    "Anna Weber",
    "Tom Hughes",
    "Priya Nair",
    "Luis Ortega",
    "Mei Chen",
    "Omar Haddad",
    "Sara Lind",
    "James Okafor",
    "Elena Rossi",
    "Ken Sato",
)
BROKERS = ("Hartley Securities", "Bexley Capital", "Marsh Lane Research", "Crofton Partners", "Stonegate Brokers")
CLIENTS = (
    "the navy",
    "a state utility",
    "the city council",
    "a national rail operator",
    "the health ministry",
    "a regional airline",
)
CONFERENCES = ("an investor", "a technology", "an industry", "a healthcare")

# Event concepts per label. Each concept is a tuple of phrasings; when a concept
# has three or more phrasings, the LAST one is held out for the test split.
EVENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "positive": (
        (
            "posts record {q}-quarter profit",
            "reports record profit for {q} quarter",
            "books best {q} quarter in its history",
        ),
        (
            "beats profit forecasts as sales climb {pct}%",
            "tops profit estimates as sales climb {pct}%",
            "smashes earnings expectations",
        ),
        ("raises full-year outlook", "lifts annual profit guidance", "boosts forecast for the year"),
        ("wins {amt} contract from {client}", "lands {amt} order from {client}", "secures {amt} deal with {client}"),
        (
            "shares jump {pct}% on strong demand",
            "stock rises {pct}% after upbeat results",
            "shares soar {pct}% as orders pour in",
        ),
        ("lifts dividend by {pct}%", "raises quarterly dividend by {pct}%"),
        ("gets approval for new {product}", "wins regulatory approval for its {product}"),
        ("net profit rises {pct}%", "quarterly profit climbs {pct}%", "profit surges {pct}% in {q} quarter"),
        ("upgraded to buy at {broker}", "gets buy rating from {broker}"),
        (
            "revenue grows {pct}% on strong {product} sales",
            "sales rise {pct}% on booming {product} demand",
            "revenue jumps {pct}% as {product} sales boom",
        ),
        ("to hire {n} workers as orders boom", "adds {n} jobs on rising demand"),
    ),
    "negative": (
        ("swings to {q}-quarter loss", "posts surprise loss in {q} quarter", "sinks into the red in {q} quarter"),
        (
            "misses revenue forecasts as sales fall {pct}%",
            "falls short of sales estimates",
            "disappoints with weak {q}-quarter sales",
        ),
        ("cuts full-year outlook", "lowers annual profit guidance", "slashes forecast for the year"),
        ("to cut {n} jobs", "plans to lay off {n} workers", "axes {n} jobs amid slump"),
        (
            "shares slump {pct}% on weak demand",
            "stock falls {pct}% after gloomy results",
            "shares plunge {pct}% as orders dry up",
        ),
        ("suspends dividend", "scraps quarterly dividend"),
        ("recalls {n} units of its {product} over safety fault", "recalls {product} after safety complaints"),
        ("net profit falls {pct}%", "quarterly profit drops {pct}%", "profit tumbles {pct}% in {q} quarter"),
        ("downgraded to sell at {broker}", "gets sell rating from {broker}"),
        ("faces probe over accounting errors", "hit by fraud investigation", "under investigation over false accounts"),
        ("loses {amt} contract with {client}", "loses {amt} order from {client}"),
    ),
    "neutral": (
        (
            "to report {q}-quarter results on {month} {day}",
            "sets {month} {day} date for {q}-quarter results",
            "will publish {q}-quarter figures on {month} {day}",
        ),
        ("to hold annual shareholder meeting in {city}", "schedules annual general meeting for {month}"),
        (
            "names {person} as chief financial officer",
            "appoints {person} as finance chief",
            "taps {person} for finance chief role",
        ),
        ("moves headquarters to {city}", "relocates head office to {city}"),
        ("keeps quarterly dividend unchanged", "holds dividend steady at {cents} cents"),
        ("to present at {conf} conference in {city}", "will speak at {conf} conference in {month}"),
        ("files annual report with regulator", "publishes annual report"),
        (
            "shares flat ahead of {q}-quarter results",
            "stock little changed before results",
            "shares steady in quiet trading",
        ),
        ("reaffirms full-year guidance", "keeps annual outlook unchanged", "sticks to forecast for the year"),
        ("names {person} to board of directors", "adds {person} to its board"),
        ("completes move to new {city} office", "opens planned office in {city}"),
    ),
}

TRAIN_WRAPPERS = ("{co} {ev}", "{co} {ev}", "UPDATE: {co} {ev}", "{co} {ev} - filing", "{co} {ev}, report says")
TEST_WRAPPERS = ("{co} {ev}", "{co} {ev}, sources say", "Market wrap: {co} {ev}")


def fill(phrase: str, rng: random.Random, sector: str) -> str:
    """Replace every ``{slot}`` in an event phrasing with a random filler."""
    slots = {
        "q": rng.choice(QUARTERS),
        "pct": str(rng.randint(2, 45)),
        "amt": f"${rng.choice((40, 75, 120, 250, 400, 900))} million",
        "n": str(rng.choice((150, 300, 800, 1200, 2500, 4000))),
        "client": rng.choice(CLIENTS),
        "product": rng.choice(SECTORS[sector]),
        "broker": rng.choice(BROKERS),
        "city": rng.choice(CITIES),
        "month": rng.choice(MONTHS),
        "day": str(rng.randint(1, 28)),
        "person": rng.choice(PEOPLE),
        "cents": str(rng.randint(5, 60)),
        "conf": rng.choice(CONFERENCES),
    }
    return phrase.format(**slots)


def split_phrasings(concept: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (shared phrasings, test-only phrasings) of one event concept."""
    if len(concept) >= 3:
        return concept[:-1], concept[-1:]
    return concept, ()


def make_headline(label: str, split: str, rng: random.Random) -> str:
    """Compose one headline with the given label for the ``train`` or ``test`` split."""
    roots = TRAIN_ROOTS if split == "train" else TEST_ROOTS
    sector = rng.choice(sorted(SECTORS))
    company = f"{rng.choice(roots)} {sector}"
    shared, held_out = split_phrasings(rng.choice(EVENTS[label]))
    if split == "test" and held_out and rng.random() < 0.6:  # noqa: SIM108 - one draw per branch, kept as written
        phrase = rng.choice(held_out)
    else:
        phrase = rng.choice(shared)
    wrappers = TRAIN_WRAPPERS
    if split == "test":
        wrappers = TEST_WRAPPERS[1:] if rng.random() < 0.5 else TEST_WRAPPERS[:1]
    event = fill(phrase, rng, sector)
    return rng.choice(wrappers).format(co=company, ev=event)


def make_split(split: str, per_label: int, rng: random.Random) -> list[dict[str, str]]:
    """Make ``per_label`` unique headlines for each label, shuffled."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for label in LABELS:
        count = 0
        while count < per_label:
            headline = make_headline(label, split, rng)
            if headline in seen:
                continue
            seen.add(headline)
            rows.append({"instruction": INSTRUCTION, "input": headline, "output": label})
            count += 1
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as JSON lines with a trailing newline."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/assets/headlines"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-label", type=int, default=200)
    parser.add_argument("--test-per-label", type=int, default=50)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    train = make_split("train", args.train_per_label, rng)
    test = make_split("test", args.test_per_label, rng)
    overlap = {r["input"] for r in train} & {r["input"] for r in test}
    assert not overlap, f"train/test overlap: {sorted(overlap)[:3]}"

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test examples to {args.out}")


if __name__ == "__main__":
    main()
