"""The quality protocol's task set: the three built-in tasks, sentiment made harder by negation and by adjectives
from a real lexicon, and country codes from real data.

Round 1 of the protocol trained and scored on the main job's data (`idlora_trl_app.data`, "sft-v2"). At 60 steps
of 8 rows sentiment sat at its floor for every run (validation answer NLL 0.002-0.011), so at the larger budgets
it could tell nothing. "protocol-v3" negated half of sentiment; at 240 steps of 8 rows sentiment sat at its floor
again (test accuracy 0.99 for LoRA and ID-LoRA): twelve common test adjectives, once the model reads "not", are
no test. This set ("protocol-v4") keeps the three built-in tasks and changes two things:

- **sentiment** keeps the built-in instruction, nouns and review templates (each split its own), and draws its
  adjectives from a real lexicon as well as the built-in lists: the English adjectives of the pattern subjectivity
  lexicon (De Smedt & Daelemans, PDDL; shipped as `en/en-sentiment.xml` in the `textblob` package, MIT; `pip install
  textblob`) whose every sense has the same sign of polarity, mean |polarity| >= 0.4 and mean subjectivity >= 0.5,
  without a sense the lexicon tags with confidence below 0.9 (its inferred ones, where most of its surprising labels
  are: "hazardous" positive), marks as profanity or gives no WordNet sense (slang), and without the two words of
  `EXCLUDED`. The splits are disjoint by adjective (a hash of the word), so a test adjective never occurs in training
  and the model must know what it means. A third of the rows are plain, a third negated, which flips the label ("The
  movie was not great." -> NEGATIVE, "The movie was not awful." -> POSITIVE; the convention of SST-style binary
  labels), and a third ask about one of two things a review judges oppositely (aspect-based sentiment: "... positive
  or negative about the service? Review: The meal was superb, but the service was awful." -> NEGATIVE; the asked one
  comes first or second at random), so the model must read the whole sentence and bind each adjective to its noun,
  not match a word or a position. A first draft contrasted two clauses of which the last decided; checked at 240
  steps of 8 rows (1e-3, seed 0) before any protocol run, LoRA reached test accuracy 0.96 on sentiment (validation
  NLL 0.008) and ID-LoRA 0.94 (0.025), at the floor for one method and near it for the other, so the position-based
  clause gave way to the aspect. Checked the same way, the aspect version puts sentiment at 0.83 for LoRA (validation
  NLL 0.084) and 0.77 for ID-LoRA (0.083): off the floor for both, and apart. Each split keeps the built-in split's
  size, so the mix of tasks stays as it was. The lexicon's labels are its own (a few still surprise: "challenging" is
  positive); that is the ceiling of real data, the same for every method.
- **countries** (since v3, real data this project did not write): "What is the ISO 3166-1 alpha-3 code of
  Germany?" -> "DEU", and the alpha-2 code likewise. The data is the ISO 3166-1 table shipped in the `pycountry`
  package (LGPL-2.1, from Debian's iso-codes; `pip install pycountry`). The splits are disjoint by country: a test
  country's codes never occur in training, so the model must read the name and use what it knows of it (the
  first letters are often, not always, the code: Germany is DEU, Spain ESP).

The main job's built-in data is unchanged.
"""
from __future__ import annotations

import hashlib
import os
import random

from idlora_trl_app.data import sft_rows, sft_tasks

DATA = "protocol-v4"
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


# ------------------------------------------------------------------------------------------ sentiment
NEGATION_TEMPLATES = {
    "train": ["The {noun} was not {adj}.", "I did not find the {noun} {adj}.", "It was not a {adj} {noun}."],
    "validation": ["In my opinion the {noun} was not {adj}."],
    "test": ["Honestly, this {noun} is not {adj}.", "My friends and I did not think the {noun} was {adj}."],
}
# Two nouns, two adjectives of opposite labels; the question names one noun, whose adjective decides. Either clause
# may be the one asked about, so neither the position nor the first adjective found tells the answer.
ASPECT_TEMPLATES = {
    "train": ["The {noun} was {adj}, but the {other_noun} was {other}.",
              "I found the {noun} {adj} and the {other_noun} {other}.",
              "The {noun} was {adj}; the {other_noun}, {other}."],
    "validation": ["The {noun} seemed {adj}, while the {other_noun} seemed {other}."],
    "test": ["Honestly, the {noun} is {adj}, though the {other_noun} is {other}.",
             "My friends found the {noun} {adj} but the {other_noun} {other}."],
}
ASPECT_INSTRUCTION = ("Is this review positive or negative about the {noun}? Reply with POSITIVE or NEGATIVE.\n"
                      "Review: ")
REVIEW_TEMPLATES = {"train": sft_tasks.TRAIN_REVIEW_TEMPLATES, "validation": sft_tasks.VALIDATION_REVIEW_TEMPLATES,
                    "test": sft_tasks.TEST_REVIEW_TEMPLATES}
BUILT_IN = {"train": (sft_tasks.TRAIN_POSITIVE, sft_tasks.TRAIN_NEGATIVE),
            "validation": (sft_tasks.VALIDATION_POSITIVE, sft_tasks.VALIDATION_NEGATIVE),
            "test": (sft_tasks.TEST_POSITIVE, sft_tasks.TEST_NEGATIVE)}
LEXICON_SPLITS = {"test": 0.25, "validation": 0.10}  # share of the lexicon's adjectives per held-out split
MIN_POLARITY, MIN_SUBJECTIVITY, MIN_CONFIDENCE = 0.4, 0.5, 0.9
EXCLUDED = {"retarded", "sexual"}  # a slur the lexicon does not mark; a word that judges nothing in a review
FLIP = {"POSITIVE": "NEGATIVE", "NEGATIVE": "POSITIVE"}


def lexicon() -> dict[str, str]:
    """{adjective: "POSITIVE" | "NEGATIVE"} from the pattern lexicon in `textblob`, by the rule in the docstring."""
    import importlib.util
    import xml.etree.ElementTree as ET
    from collections import defaultdict

    spec = importlib.util.find_spec("textblob")  # found, not imported: textblob's own import needs nltk
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("benchmarks: the quality protocol's sentiment task needs the lexicon in textblob "
                         "(pip install textblob, or pip install -e '.[dev]')")
    path = os.path.join(spec.submodule_search_locations[0], "en", "en-sentiment.xml")
    senses, rejected = defaultdict(list), set()
    for word in ET.parse(path).getroot().iter("word"):
        form = word.get("form")
        if word.get("pos") != "JJ" or not (form.isalpha() and form.islower()):
            continue
        confidence = float(word.get("confidence") or word.get("reliability") or 0)
        if (word.get("label") or not word.get("wordnet_id") or "expletive" in word.get("sense", "")
                or confidence < MIN_CONFIDENCE):
            rejected.add(form)
        senses[form].append((float(word.get("polarity")), float(word.get("subjectivity"))))
    out = {}
    for form, values in senses.items():
        polarity = sum(p for p, _ in values) / len(values)
        subjectivity = sum(s for _, s in values) / len(values)
        one_sign = all(p >= 0 for p, _ in values) or all(p <= 0 for p, _ in values)
        if (form not in rejected and form not in EXCLUDED and one_sign and abs(polarity) >= MIN_POLARITY
                and subjectivity >= MIN_SUBJECTIVITY):
            out[form] = "POSITIVE" if polarity > 0 else "NEGATIVE"
    return out


def adjectives(split: str) -> dict[str, str]:
    """{adjective: label} of `split`: its built-in adjectives and its share of the lexicon's (disjoint by word)."""
    built_in = {adj: label for label, words in zip(("POSITIVE", "NEGATIVE"), BUILT_IN[split]) for adj in words}
    every_built_in = {adj for pair in BUILT_IN.values() for words in pair for adj in words}
    test, validation = LEXICON_SPLITS["test"], LEXICON_SPLITS["validation"]
    out = dict(built_in)
    for adj, label in lexicon().items():
        if adj in every_built_in:
            continue  # a built-in adjective stays in its built-in split
        u = int(hashlib.sha1(f"sentiment-{adj}".encode()).hexdigest()[:8], 16) / 16 ** 8
        if split == ("test" if u < test else "validation" if u < test + validation else "train"):
            out[adj] = label
    return out


def sentiment(split: str) -> list[dict]:
    """Reviews of `split`'s adjectives, as many as the built-in split has (so the mix of tasks stays): the answers
    alternate POSITIVE and NEGATIVE, the kinds cycle plain, negated, aspect, and each label's adjectives are used in
    turn (every one once before any twice)."""
    rng = random.Random(f"protocol-sentiment-{split}")
    by_label = {label: sorted(adj for adj, lab in adjectives(split).items() if lab == label) for label in FLIP}
    for words in by_label.values():
        rng.shuffle(words)
    used = {label: 0 for label in FLIP}

    def take(label: str) -> str:
        used[label] += 1
        return by_label[label][(used[label] - 1) % len(by_label[label])]

    rows = []
    for i in range(len(sft_tasks.sentiment(split))):
        answer, kind = ("POSITIVE", "NEGATIVE")[i % 2], ("plain", "negated", "aspect")[i // 2 % 3]
        noun, instruction = rng.choice(sft_tasks.NOUNS), sft_tasks.SENTIMENT_INSTRUCTION
        if kind == "plain":
            review = rng.choice(REVIEW_TEMPLATES[split]).format(noun=noun, adj=take(answer))
        elif kind == "negated":
            review = rng.choice(NEGATION_TEMPLATES[split]).format(noun=noun, adj=take(FLIP[answer]))
        else:  # the asked noun's clause comes first or second at random
            other_noun = rng.choice([n for n in sft_tasks.NOUNS if n != noun])
            asked = dict(noun=noun, adj=take(answer))
            other = dict(noun=other_noun, adj=rng.choice(by_label[FLIP[answer]]))
            first, second = (asked, other) if rng.random() < 0.5 else (other, asked)
            review = rng.choice(ASPECT_TEMPLATES[split]).format(noun=first["noun"], adj=first["adj"],
                                                                other_noun=second["noun"], other=second["adj"])
            instruction = ASPECT_INSTRUCTION.format(noun=noun)
        rows.append(_row("sentiment", instruction + review, answer))
    rng.shuffle(rows)
    return rows


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
