"""The built-in SFT tasks: arithmetic word problems, sentiment, and short instructions with checkable outputs.

Every task is generated deterministically in code (no files, no downloads) and has three splits that share
no item: `train`, `validation` (for choosing hyper-parameters) and `test` (at least 100 items per task). The
validation and test splits are each built from their own held-out words (and, for sentiment, held-out
templates), so a model can only score on them by generalising, and tuning on validation never sees a test word.
Each row is TRL's conversational prompt-completion format plus two bookkeeping columns:

    {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}],
     "task": "sentiment", "answer": "POSITIVE"}

`answer` is what evaluation compares with (`idlora_trl_app.evaluation.normalise`); it equals the completion except
for arithmetic, whose completion shows the calculation ("4 + 6 = 10") and whose answer is the result ("10").
"""

from __future__ import annotations

import random

# ------------------------------------------------------------------------------------------ arithmetic
# Small numbers and two operations, so that SmolLM2-135M can get them right; the question and its answer
# differ per item, the names and objects of the test split never occur in training. The completion writes the
# calculation before the result ("4 + 6 = 10"): a 135M model adds far more reliably when it states the
# operands first (SmolLM2 gets 26 of 32 one-digit sums right that way, and almost none as a bare number).
# The `answer` column is the result alone, and evaluation reads the number after the last "=".
TRAIN_NAMES = ["Tom", "Anna", "Ben", "Lucy", "Omar", "Mia", "Sam", "Nora", "Leo", "Zoe", "Ivan", "Ella"]
VALIDATION_NAMES = ["Carl", "Dana", "Emil", "Gina"]
TEST_NAMES = ["Paul", "Rosa", "Hugo", "Iris", "Kofi", "Maya"]
TRAIN_OBJECTS = ["apples", "books", "pencils", "stamps", "marbles", "cookies", "shells", "coins"]
VALIDATION_OBJECTS = ["balls", "plates", "shirts"]
TEST_OBJECTS = ["oranges", "cards", "stickers", "candles"]
# Shares of each operation's shuffled number pairs: test first, then validation, then train.
ARITHMETIC_SHARES = {"test": (0.0, 0.4), "validation": (0.4, 0.55), "train": (0.55, 1.0)}

ARITHMETIC_TEMPLATES = {
    "add": "{name} has {a} {obj}. {name} gets {b} more {obj}. How many {obj} does {name} have now?",
    "sub": "{name} has {a} {obj} and gives {b} of them away. How many {obj} does {name} have left?",
}
ARITHMETIC_SUFFIX = " Answer with the calculation and its result."


def _arithmetic_item(op: str, a: int, b: int, name: str, obj: str) -> tuple[str, str, str]:
    question = ARITHMETIC_TEMPLATES[op].format(name=name, obj=obj, a=a, b=b) + ARITHMETIC_SUFFIX
    result = a + b if op == "add" else a - b
    return question, f"{a} {'+' if op == 'add' else '-'} {b} = {result}", str(result)


def arithmetic(split: str, seed: int = 0) -> list[dict]:
    # Two generators: the split of the number pairs must not depend on how many names a split has drawn.
    pair_rng, rng = random.Random(f"arithmetic-{seed}"), random.Random(f"arithmetic-{split}-{seed}")
    names, objects = {"train": (TRAIN_NAMES, TRAIN_OBJECTS), "validation": (VALIDATION_NAMES, VALIDATION_OBJECTS),
                      "test": (TEST_NAMES, TEST_OBJECTS)}[split]
    pairs = {"add": [(a, b) for a in range(1, 21) for b in range(1, 10)],
             "sub": [(a, b) for a in range(6, 21) for b in range(1, 6)]}
    rows = []
    for op, op_pairs in pairs.items():
        pair_rng.shuffle(op_pairs)
        # Each split takes its own share of the number pairs: no calculation is in two splits.
        low, high = ARITHMETIC_SHARES[split]
        for a, b in op_pairs[round(low * len(op_pairs)):round(high * len(op_pairs))]:
            question, completion, answer = _arithmetic_item(op, a, b, rng.choice(names), rng.choice(objects))
            rows.append(_row("arithmetic", question, answer, completion))
    return rows


# ------------------------------------------------------------------------------------------- sentiment
# As in feasibility note §1d: held-out adjectives AND held-out templates, so the model must use what it
# knows about words, not memorise them.
TRAIN_POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "charming",
                  "brilliant", "pleasant"]
TRAIN_NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring", "disappointing", "poor", "nasty",
                  "annoying", "miserable"]
VALIDATION_POSITIVE = ["splendid", "terrific", "fabulous", "impressive"]
VALIDATION_NEGATIVE = ["dull", "lousy", "pathetic", "tedious"]
TEST_POSITIVE = ["amazing", "marvelous", "enjoyable", "outstanding", "beautiful", "perfect"]
TEST_NEGATIVE = ["bad", "unpleasant", "disgusting", "mediocre", "painful", "worthless"]
NOUNS = ["movie", "book", "meal", "hotel", "concert", "phone", "service", "game"]
TRAIN_REVIEW_TEMPLATES = ["The {noun} was {adj}.", "What a {adj} {noun}!", "I found the {noun} {adj}."]
VALIDATION_REVIEW_TEMPLATES = ["In my opinion the {noun} was {adj}."]
TEST_REVIEW_TEMPLATES = ["Honestly, this {noun} is {adj}.", "My friends and I thought the {noun} was {adj}."]
SENTIMENT_INSTRUCTION = "Is this review positive or negative? Reply with POSITIVE or NEGATIVE.\nReview: "


def sentiment(split: str, seed: int = 0) -> list[dict]:
    positive, negative, templates = {
        "train": (TRAIN_POSITIVE, TRAIN_NEGATIVE, TRAIN_REVIEW_TEMPLATES),
        "validation": (VALIDATION_POSITIVE, VALIDATION_NEGATIVE, VALIDATION_REVIEW_TEMPLATES),
        "test": (TEST_POSITIVE, TEST_NEGATIVE, TEST_REVIEW_TEMPLATES)}[split]
    rows = []
    for label, adjectives in (("POSITIVE", positive), ("NEGATIVE", negative)):
        for adj in adjectives:
            for noun in NOUNS:
                for template in templates:
                    rows.append(_row("sentiment", SENTIMENT_INSTRUCTION + template.format(noun=noun, adj=adj), label))
    random.Random(f"sentiment-{seed}").shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------- instructions
# Exact, checkable outputs that a 135M model learns in a few steps (copying and simple formatting;
# reversing or spelling words is not among them: hard at the token level). Held-out words only in test.
TRAIN_WORDS = ["river", "garden", "window", "pencil", "rocket", "castle", "forest", "basket", "candle", "silver",
               "market", "planet", "bridge", "anchor", "dragon", "island", "jacket", "kitten", "ladder", "meadow",
               "needle", "orange", "pepper", "rabbit", "saddle", "tunnel", "violin", "wallet", "yogurt", "zipper",
               "harbor", "pillow"]
VALIDATION_WORDS = ["barrel", "beaver", "cherry", "collar", "donkey", "feather", "goblet", "hornet", "insect",
                    "lizard", "magnet", "noodle", "oyster", "pebble", "quiver", "raisin"]
TEST_WORDS = ["butter", "cactus", "engine", "falcon", "helmet", "lemon", "mirror", "puzzle", "statue", "turtle",
              "velvet", "walnut", "carpet", "guitar", "pocket", "sponge", "bottle", "button", "camera", "cotton",
              "flower", "hammer", "kettle", "ribbon", "mitten", "muffin", "napkin", "parrot", "salmon", "spider",
              "teapot", "tomato", "wizard", "blanket"]
INSTRUCTIONS = {
    "upper": ("Reply with the word \"{w}\" in capital letters.", lambda w: w.upper()),
    "repeat": ("Repeat the word \"{w}\" three times, separated by spaces.", lambda w: " ".join([w] * 3)),
    "brackets": ("Write the word \"{w}\" inside square brackets.", lambda w: f"[{w}]"),
}


def instructions(split: str, seed: int = 0) -> list[dict]:
    words = {"train": TRAIN_WORDS, "validation": VALIDATION_WORDS, "test": TEST_WORDS}[split]
    rows = [_row("instructions", template.format(w=word), make(word))
            for word in words for template, make in INSTRUCTIONS.values()]
    random.Random(f"instructions-{seed}").shuffle(rows)
    return rows


def _row(task: str, question: str, answer: str, completion: str | None = None) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": completion or answer}], "task": task, "answer": answer}


TASKS = {"arithmetic": arithmetic, "sentiment": sentiment, "instructions": instructions}
