"""The quality protocol's task set: the three built-in tasks, sentiment made harder by negation, and country codes
from real data.

Round 1 of the protocol trained and scored on the main job's data (`idlora_trl_app.data`, "sft-v2"). At 60 steps
of 8 rows sentiment sat at its floor for every run (validation answer NLL 0.002-0.011), so at the larger budgets
it could tell nothing. This set ("protocol-v3") keeps the three built-in tasks and changes two things:

- **sentiment** mixes the built-in rows with as many negated ones and keeps a random half of the union (the
  built-in split's size, so the mix of tasks stays as it was); negation flips the label ("The movie was
  not great." -> NEGATIVE, "The movie was not awful." -> POSITIVE; the convention of SST-style binary labels).
  Each split has its own negation phrasings, as it has its own adjectives and templates, so the model must read
  the sentence, not match a word.
- **countries** (new, real data this project did not write): "What is the ISO 3166-1 alpha-3 code of Germany?"
  -> "DEU", and the alpha-2 code likewise. The data is the ISO 3166-1 table shipped in the `pycountry` package
  (LGPL-2.1, from Debian's iso-codes; `pip install pycountry`). The splits are disjoint by country: a test
  country's codes never occur in training, so the model must read the name and use what it knows of it (the
  first letters are often, not always, the code: Germany is DEU, Spain ESP).

The main job's built-in data is unchanged.
"""
from __future__ import annotations

import hashlib
import random

from idlora_trl_app.data import sft_rows, sft_tasks

DATA = "protocol-v3"
TASKS = ("arithmetic", "sentiment", "instructions", "countries")

# ------------------------------------------------------------------------------------------- countries
COUNTRY_SPLITS = {"test": 50, "validation": 16}  # countries per held-out split (two items each); train: the rest
COUNTRY_QUESTIONS = {
    "alpha_3": "What is the three-letter ISO 3166-1 code of {name}? Reply with the code only.",
    "alpha_2": "What is the two-letter ISO 3166-1 code of {name}? Reply with the code only.",
}


def countries(split: str) -> list[dict]:
    try:
        import pycountry
    except ImportError as error:
        raise SystemExit("benchmarks: the quality protocol's countries task needs pycountry "
                         "(pip install pycountry, or pip install -e '.[dev]')") from error
    # A fixed split per country, from a hash of its code (not pycountry's order, which may change).
    table = sorted(pycountry.countries, key=lambda c: hashlib.sha1(f"countries-{c.alpha_2}".encode()).hexdigest())
    test, validation = COUNTRY_SPLITS["test"], COUNTRY_SPLITS["validation"]
    chosen = {"test": table[:test], "validation": table[test:test + validation],
              "train": table[test + validation:]}[split]
    rows = []
    for country in chosen:
        name = getattr(country, "common_name", None) or country.name
        for field, question in COUNTRY_QUESTIONS.items():
            rows.append(_row("countries", question.format(name=name), getattr(country, field)))
    random.Random(f"countries-{split}").shuffle(rows)
    return rows


# ------------------------------------------------------------------------------------ negated sentiment
NEGATION_TEMPLATES = {
    "train": ["The {noun} was not {adj}.", "I did not find the {noun} {adj}.", "It was not a {adj} {noun}."],
    "validation": ["In my opinion the {noun} was not {adj}."],
    "test": ["Honestly, this {noun} is not {adj}.", "My friends and I did not think the {noun} was {adj}."],
}
FLIP = {"POSITIVE": "NEGATIVE", "NEGATIVE": "POSITIVE"}


def sentiment(split: str) -> list[dict]:
    """Half of the built-in sentiment rows and their negated counterparts, shuffled together."""
    positive, negative = {"train": (sft_tasks.TRAIN_POSITIVE, sft_tasks.TRAIN_NEGATIVE),
                          "validation": (sft_tasks.VALIDATION_POSITIVE, sft_tasks.VALIDATION_NEGATIVE),
                          "test": (sft_tasks.TEST_POSITIVE, sft_tasks.TEST_NEGATIVE)}[split]
    rows = list(sft_tasks.sentiment(split))
    for label, adjectives in (("POSITIVE", positive), ("NEGATIVE", negative)):
        for adj in adjectives:
            for noun in sft_tasks.NOUNS:
                for template in NEGATION_TEMPLATES[split]:
                    question = sft_tasks.SENTIMENT_INSTRUCTION + template.format(noun=noun, adj=adj)
                    rows.append(_row("sentiment", question, FLIP[label]))
    random.Random(f"protocol-sentiment-{split}").shuffle(rows)
    return rows[:len(rows) // 2]  # the built-in split's size, so the mix of tasks stays as it was


def _row(task: str, question: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}], "task": task, "answer": answer}


# ------------------------------------------------------------------------------------------------- set
def rows(split: str, per_task: int | None = None) -> list[dict]:
    """The protocol's rows of `split`, interleaved round-robin across tasks (every prefix is balanced)."""
    lists = [sft_rows(split, tasks="arithmetic")[:per_task], sentiment(split)[:per_task],
             sft_rows(split, tasks="instructions")[:per_task], countries(split)[:per_task]]
    out = []
    for i in range(max(len(task_rows) for task_rows in lists)):
        out.extend(task_rows[i] for task_rows in lists if i < len(task_rows))
    return out


def dataset(split: str = "train"):
    from datasets import Dataset

    return Dataset.from_list(rows(split))
