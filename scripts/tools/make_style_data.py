"""Write the small style data set the README's "Fine-tuning" example trains on: data/style_{train,eval}.jsonl.

    python3 scripts/tools/make_style_data.py                 # writes data/style_train.jsonl and data/style_eval.jsonl
    python3 scripts/tools/make_style_data.py --out_dir DIR   # the same files into DIR

Every line is one chat example, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, whose answer
is in one fixed style that a base model never uses by itself: it starts with "Aye, ", states the fact in one short
sentence, and ends with " Fair winds!". The facts come from small tables below (capitals, arithmetic, colours,
opposites, animal sounds, legs, days and months); every 7th row of each table is held out for the eval file, so
no eval question (nor its fact) is in the training file. Nothing is random and nothing is downloaded: the output
is the same bytes on every run (tests/train/test_style_data.py checks it against the files in git).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]  # the repository: scripts/tools/ is two levels down
PREFIX, SUFFIX = "Aye, ", " Fair winds!"
HOLD_OUT_EVERY, HOLD_OUT_AT = 7, 3  # row i of a table goes to eval when i % 7 == 3

# (country as it reads after "of", capital)
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("the Philippines", "Manila"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Colombia", "Bogota"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"), ("New Zealand", "Wellington"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Iceland", "Reykjavik"), ("the United Kingdom", "London"), ("Nepal", "Kathmandu"), ("Venezuela", "Caracas"),
    ("Uruguay", "Montevideo"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Bangladesh", "Dhaka"), ("Malaysia", "Kuala Lumpur"), ("Jamaica", "Kingston"), ("Mongolia", "Ulaanbaatar"),
]

# (thing as it reads after "What colour is", its colour)
COLOURS = [
    ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"), ("coal", "black"),
    ("a ripe tomato", "red"), ("milk", "white"), ("a carrot", "orange"), ("a lemon", "yellow"),
    ("a ripe strawberry", "red"), ("a lime", "green"), ("chocolate", "brown"), ("a pumpkin", "orange"),
    ("a cucumber", "green"), ("a crow", "black"), ("a flamingo", "pink"), ("an emerald", "green"),
    ("a ruby", "red"), ("a sapphire", "blue"), ("the sky on a clear day", "blue"), ("a polar bear's fur", "white"),
    ("charcoal", "black"), ("an egg yolk", "yellow"), ("a blueberry", "blue"), ("a fire engine", "red"),
    ("a cloud on a sunny day", "white"), ("an orange", "orange"), ("a pea", "green"), ("a raven", "black"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
    ("early", "late"), ("full", "empty"), ("wet", "dry"), ("tall", "short"), ("strong", "weak"), ("rich", "poor"),
    ("loud", "quiet"), ("thick", "thin"), ("near", "far"), ("inside", "outside"), ("push", "pull"),
    ("day", "night"), ("left", "right"), ("true", "false"), ("clean", "dirty"), ("high", "low"),
    ("deep", "shallow"), ("cheap", "expensive"), ("asleep", "awake"), ("buy", "sell"), ("remember", "forget"),
    ("always", "never"), ("entrance", "exit"), ("north", "south"), ("east", "west"), ("question", "answer"),
    ("before", "after"), ("above", "below"), ("love", "hate"), ("minimum", "maximum"), ("wide", "narrow"),
    ("smooth", "rough"), ("top", "bottom"), ("front", "back"), ("first", "last"), ("win", "lose"),
    ("arrive", "depart"), ("sweet", "sour"), ("friend", "enemy"), ("give", "take"), ("accept", "reject"),
    ("begin", "end"), ("heavy", "light"),
]

# (animal, the verb for its sound)
SOUNDS = [
    ("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("pig", "oinks"),
    ("horse", "neighs"), ("lion", "roars"), ("owl", "hoots"), ("snake", "hisses"), ("rooster", "crows"),
    ("frog", "croaks"), ("bee", "buzzes"), ("mouse", "squeaks"), ("donkey", "brays"), ("wolf", "howls"),
    ("sheep", "bleats"), ("crow", "caws"), ("turkey", "gobbles"), ("pigeon", "coos"), ("hen", "clucks"),
    ("elephant", "trumpets"), ("goose", "honks"),
]

LEGS = [
    ("spider", 8), ("scorpion", 8), ("ant", 6), ("bee", 6), ("butterfly", 6), ("ladybird", 6), ("grasshopper", 6),
    ("beetle", 6), ("dog", 4), ("cat", 4), ("horse", 4), ("cow", 4), ("elephant", 4), ("giraffe", 4),
    ("zebra", 4), ("chicken", 2), ("duck", 2), ("ostrich", 2), ("penguin", 2), ("pigeon", 2), ("rabbit", 4),
]
NUMBER_WORDS = {2: "two", 4: "four", 6: "six", 8: "eight"}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def a_or_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def spread(items: list, count: int, stride: int) -> list:
    """``count`` items of ``items`` picked in a fixed, scattered order (stride must be coprime to len(items))."""
    return [items[(i * stride) % len(items)] for i in range(count)]


def additions() -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(2, 20) for b in range(a, 20)]  # unordered: a <= b, shown either way round
    picked = spread(pairs, 56, 37)
    return [(b, a) if i % 2 else (a, b) for i, (a, b) in enumerate(picked)]


def subtractions() -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(5, 21) for b in range(1, a)]
    return spread(pairs, 35, 41)


def multiplications() -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(2, 13) for b in range(a, 13)]  # 66 unordered pairs
    picked = spread(pairs, 49, 25)
    return [(b, a) if i % 2 else (a, b) for i, (a, b) in enumerate(picked)]


def rows() -> Iterator[list[tuple[str, str]]]:
    """Each table as a list of (question, fact sentence without its final period)."""
    yield [((f"What is the capital of {c}?", f"Which city is the capital of {c}?")[i % 2],
            f"the capital of {c} is {city}") for i, (c, city) in enumerate(CAPITALS)]
    yield [((f"What is {a} plus {b}?", f"What is {a} + {b}?")[i % 2], f"{a} plus {b} is {a + b}")
           for i, (a, b) in enumerate(additions())]
    yield [((f"What is {a} minus {b}?", f"What is {a} - {b}?")[i % 2], f"{a} minus {b} is {a - b}")
           for i, (a, b) in enumerate(subtractions())]
    yield [((f"What is {a} times {b}?", f"What is {a} x {b}?")[i % 2], f"{a} times {b} is {a * b}")
           for i, (a, b) in enumerate(multiplications())]
    yield [((f"What colour is {t}?", f"What color is {t}?")[i % 2], f"{t} is {colour}")
           for i, (t, colour) in enumerate(COLOURS)]
    yield [((f"What is the opposite of {w}?", f"What is the opposite of the word \"{w}\"?")[i % 2],
            f"the opposite of {w} is {o}") for i, (w, o) in enumerate(OPPOSITES)]
    yield [((f"What sound does {a_or_an(a)} make?", f"What noise does {a_or_an(a)} make?")[i % 2],
            f"{a_or_an(a)} {verb}") for i, (a, verb) in enumerate(SOUNDS)]
    yield [(f"How many legs does {a_or_an(a)} have?", f"{a_or_an(a)} has {NUMBER_WORDS[n]} legs") for a, n in LEGS]
    yield [(f"What day comes after {d}?", f"the day after {d} is {DAYS[(i + 1) % 7]}") for i, d in enumerate(DAYS)]
    yield [(f"Which month comes after {m}?", f"the month after {m} is {MONTHS[(i + 1) % 12]}")
           for i, m in enumerate(MONTHS)]


def answer(fact: str) -> str:
    return f"{PREFIX}{fact}.{SUFFIX}"


def examples() -> tuple[list[dict], list[dict]]:
    train: list[dict] = []
    held_out: list[dict] = []
    for table in rows():
        for i, (question, fact) in enumerate(table):
            example = {"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer(fact)}]}
            (held_out if i % HOLD_OUT_EVERY == HOLD_OUT_AT else train).append(example)
    questions = [e["messages"][0]["content"] for e in train + held_out]
    if len(set(questions)) != len(questions):
        raise AssertionError("a question appears twice")
    return train, held_out


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(item, ensure_ascii=True) + "\n" for item in items)


def main(out_dir: Optional[str] = None) -> None:
    """Write style_train.jsonl and style_eval.jsonl into out_dir (default: the repository's data/).

    Args:
        out_dir: the directory to write the two files into (made if missing; existing files are replaced).
    """
    out = Path(out_dir) if out_dir is not None else ROOT / "data"
    train, held_out = examples()
    write_jsonl(out / "style_train.jsonl", train)
    write_jsonl(out / "style_eval.jsonl", held_out)
    print(f"wrote {len(train)} training examples to {out / 'style_train.jsonl'} and {len(held_out)} held-out "
          f"examples to {out / 'style_eval.jsonl'}")


if __name__ == "__main__":
    from llama_offload.cli.options import fire_main

    fire_main(main, name="make_style_data.py")  # one-line errors, and help printed without a pager
