"""The quality protocol's task set, its method names and the budget report, checked on fabricated runs."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality import budgets, tasks
from benchmarks.quality.measure import _rejoin
from benchmarks.quality.runs import Spec, method_name, named_methods, peft_config
from idlora_trl_app.data import sft_tasks

ROOT = Path(__file__).resolve().parents[1]

TARGETS = ["q_proj", "v_proj"]


def _prompt(row: dict) -> str:
    return row["prompt"][0]["content"]


# --------------------------------------------------------------------------------------------- tasks
def test_countries_are_disjoint_by_country_and_ask_for_the_right_code():
    import pycountry  # a dev dependency: a missing one fails, it does not skip
    by_name = {getattr(c, "common_name", None) or c.name: c for c in pycountry.countries}
    seen = {}
    for split in ("train", "validation", "test"):
        rows = tasks.countries(split)
        names = [re.search(r"code of (.+)\? Reply", _prompt(r)).group(1) for r in rows]
        for name, row in zip(names, rows):
            field = "alpha_3" if "three-letter" in _prompt(row) else "alpha_2"
            assert row["answer"] == getattr(by_name[name], field) == row["completion"][0]["content"]
        assert all(names.count(n) == 2 for n in names)  # both codes of every country, in one split only
        seen[split] = set(names)
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["validation"]
    assert not seen["validation"] & seen["test"]
    assert len(seen["test"]) * 2 >= 100 and sum(map(len, seen.values())) == len(pycountry.countries)


def _plain_label(adjective: str) -> str:
    """The label by an independent reading: the built-in lists, else textblob's own pattern analyser."""
    from textblob import TextBlob  # a dev dependency: a missing one fails, it does not skip
    built_in = {**dict.fromkeys(sft_tasks.TRAIN_POSITIVE + sft_tasks.VALIDATION_POSITIVE + sft_tasks.TEST_POSITIVE,
                                "POSITIVE"),
                **dict.fromkeys(sft_tasks.TRAIN_NEGATIVE + sft_tasks.VALIDATION_NEGATIVE + sft_tasks.TEST_NEGATIVE,
                                "NEGATIVE")}
    if adjective in built_in:
        return built_in[adjective]
    polarity = TextBlob(adjective).sentiment.polarity  # averages every sense, adjective or not: the sign is enough
    assert polarity != 0, adjective
    return "POSITIVE" if polarity > 0 else "NEGATIVE"


FLIPPED = {"POSITIVE": "NEGATIVE", "NEGATIVE": "POSITIVE"}
NOUNS = r"(?:" + "|".join(sft_tasks.NOUNS) + r")"
# The review's shapes, written here from the task's description (plain, negated, aspect), not from tasks.py.
PLAIN = (r"(?:The|I found the|In my opinion the|Honestly, this|My friends and I thought the) N (?:was|is) "
         r"?(?P<adj>\w+)\.|What a (?P<adj2>\w+) N!|I found the N (?P<adj3>\w+)\.")
NEGATED = r".*\bnot\b.*? (?P<adj>\w+)(?: N)?\."  # the last word, or the one before the noun
ASPECT = (r"(?:The|I found the|Honestly, the|My friends found the) (?P<n1>\w+)(?: was| is| seemed)? (?P<a1>\w+)[,;]?"
          r"(?: but| and| while| though)? the (?P<n2>\w+),?(?: was| is| seemed)? (?P<a2>\w+)\.")


def _read(prompt: str) -> tuple[str, str, str | None, bool | None]:
    """(kind, deciding adjective, the other adjective and whether the asked noun comes first: aspect reviews only)."""
    review = prompt.split("Review: ")[1]
    asked = re.search(r"negative about the (\w+)\?", prompt)
    if asked:  # the adjective bound to the asked noun decides; the other noun's has the other label
        match = re.fullmatch(ASPECT, review)
        assert match and asked.group(1) in (match["n1"], match["n2"]) and match["n1"] != match["n2"], prompt
        first = asked.group(1) == match["n1"]
        return "aspect", match["a1" if first else "a2"], match["a2" if first else "a1"], first
    text = re.sub(r"\b" + NOUNS + r"\b", "N", review)
    for pattern, kind in ((NEGATED, "negated"), (PLAIN, "plain")):
        match = re.fullmatch(pattern, text)
        if match:
            return kind, next(v for k, v in match.groupdict().items() if v), None, None
    raise AssertionError(f"a review of no known shape: {review!r}")


def test_sentiment_labels_follow_the_lexicon_negation_and_the_asked_noun():
    adjectives, phrasings = {}, {}
    for split in ("train", "validation", "test"):
        rows = tasks.sentiment(split)
        assert len(rows) == len(sft_tasks.sentiment(split))  # the mix of tasks is unchanged
        kinds, asked_first = [], []
        for row in rows:
            kind, adjective, other, first = _read(_prompt(row))
            plain = _plain_label(adjective)
            expected = FLIPPED[plain] if kind == "negated" else plain
            assert row["answer"] == expected == row["completion"][0]["content"], _prompt(row)
            if kind == "aspect":
                assert _plain_label(other) == FLIPPED[plain], _prompt(row)  # the other noun's has the other label
                asked_first.append(first)
            kinds.append(kind)
            adjectives.setdefault(split, set()).update({adjective} | ({other} if other else set()))
            review = _prompt(row).split("Review: ")[1]
            phrasings.setdefault(split, set()).add(re.sub(r"\b(" + "|".join(filter(None, (adjective, other)))
                                                          + r")\b", "A", re.sub(r"\b" + NOUNS + r"\b", "N", review)))
        for kind in ("plain", "negated", "aspect"):
            assert 0.3 < kinds.count(kind) / len(rows) < 0.36, (split, kind)
        assert 0.25 < sum(asked_first) / len(asked_first) < 0.75, split  # the position does not tell the answer
        answers = [r["answer"] for r in rows]
        assert answers.count("POSITIVE") == answers.count("NEGATIVE"), split
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not adjectives[a] & adjectives[b], (a, b)  # disjoint by adjective
        assert not phrasings[a] & phrasings[b], (a, b)  # and by phrasing
    assert len(adjectives["test"]) >= 60  # far more than the 12 built-in test adjectives of protocol-v3


def test_the_lexicon_rule_keeps_clear_adjectives_and_drops_the_rest():
    lexicon = tasks.lexicon()
    assert lexicon["amazing"] == "POSITIVE" and lexicon["abhorrent"] == "NEGATIVE"
    for dropped in ("fucked", "retarded", "sexual", "hazardous", "ridiculous", "abrupt"):  # profanity, EXCLUDED,
        assert dropped not in lexicon, dropped  # an inferred label, two signs across senses, |polarity| below 0.4


def test_protocol_rows_hold_every_task_and_no_prompt_in_two_splits():
    test, validation = tasks.rows("test", per_task=100), tasks.rows("validation", per_task=32)
    for rows, n in ((test, 100), (validation, 32)):
        assert {t: sum(r["task"] == t for r in rows) for t in tasks.TASKS} == dict.fromkeys(tasks.TASKS, n)
    prompts = {split: {_prompt(r) for r in tasks.rows(split)} for split in ("train", "validation", "test")}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]


# ------------------------------------------------------------------------------------------- methods
def test_every_named_method_is_found_again_from_its_stored_run():
    for name, (kind, settings) in named_methods(8).items():
        assert list(settings) == sorted(settings), name  # a Spec's settings are sorted pairs
        assert method_name({"method": kind, "settings": dict(settings)}, 8) == name
    setup = {"steps": 30}
    assert Spec("ID-LoRA", 1e-3, 0).key(setup) != Spec("ID-LoRA", 1e-3, 0, named_methods(8)["ID-LoRA (paper)"][1]).key(
        setup)  # the paper's runs keep their own files when the default changes


def test_the_parameter_matched_lora_has_half_the_rank():
    half = peft_config(Spec("LoRA", 1e-3, 0, named_methods(8)["LoRA r=p/2"][1]), 8, TARGETS)
    full = peft_config(Spec("LoRA", 1e-3, 0), 8, TARGETS)
    assert (half.r, half.lora_alpha, full.r, full.lora_alpha) == (4, 8, 8, 16)
    paper = peft_config(Spec("ID-LoRA", 1e-3, 0, named_methods(8)["ID-LoRA (paper)"][1]), 8, TARGETS)
    assert (paper.r, paper.router_norm, paper.selection) == (32, "none", "pmrc")
    scaled = peft_config(Spec("ID-LoRA", 1e-3, 0, named_methods(8)["ID-LoRA rms, s=8"][1]), 8, TARGETS)
    assert scaled.idlora_alpha / scaled.r == 8 and scaled.router_norm == "rms"


def test_labels_with_commas_are_joined_longest_first():
    wanted = named_methods(8)
    assert _rejoin(["LoRA", "ID-LoRA rms", "s=8", "ID-LoRA rms"], wanted) == ["LoRA", "ID-LoRA rms, s=8",
                                                                              "ID-LoRA rms"]
    with pytest.raises(SystemExit, match="unknown method or ablation 's=9'"):
        _rejoin(["ID-LoRA rms", "s=9"], wanted)


def test_a_stored_run_of_other_rows_under_the_same_name_is_refused(tmp_path):
    from datasets import Dataset

    from benchmarks.quality.runs import Bench

    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}]
    setup = dict(p=8, steps=1, batch=1, data="protocol-test")
    spec = Spec("LoRA", 1e-3, 0)

    def bench(train):
        return Bench(None, None, train, rows, rows, setup, str(tmp_path / "runs"), str(tmp_path / "work"))

    first = bench(Dataset.from_list(rows))
    first._train = lambda spec: {"lr": spec.lr}  # storage is under test here, not training
    first.run(spec)
    assert first.load(spec)["rows_sha"] == first.rows_sha == bench(list(rows)).rows_sha  # a list or a Dataset
    changed = bench(Dataset.from_list([{**rows[0], "completion": [{"role": "assistant", "content": "5"}]}]))
    assert changed.rows_sha != first.rows_sha
    with pytest.raises(SystemExit, match=r"trained on other rows .* task set changed without a new name"):
        changed.load(spec)
    (tmp_path / "runs" / (spec.key(setup) + ".json")).write_text(json.dumps({"lr": 1e-3}))  # from before the check
    assert changed.load(spec) == {"lr": 1e-3}


# ------------------------------------------------------------------------------------------- report
def _write(folder, name: str, lr: float, seed: int, val: float, test: float | None = None, acc: float = 0.5,
           steps: int = 30, batch: int = 4, data: str = tasks.DATA, first: float | None = None,
           by_task: dict | None = None) -> None:
    kind, settings = named_methods(8)[name]
    first = 2.0 + seed if first is None else first  # the loss of the seed's first batch
    record = dict(method=kind, settings=dict(settings), lr=lr, seed=seed, trainable=100, losses=[first, 1.0],
                  setup=dict(p=8, steps=steps, batch=batch, data=data),
                  validation={"nll": dict.fromkeys(tasks.TASKS, val)})
    if test is not None:
        record["test"] = {"nll": {**dict.fromkeys(tasks.TASKS, test), **(by_task or {})},
                          "accuracy": {t: [round(acc * 100), 100] for t in tasks.TASKS}}
    path = folder / f"{name}-{lr}-{seed}-{steps}x{batch}-{data}.json".replace(" ", "_").replace(",", "")
    path.write_text(json.dumps(record))


def test_budget_report_chooses_rates_pairs_by_seed_and_applies_the_rule(tmp_path):
    gaps = {"30x4": -0.1, "60x8": -0.2, "240x8": -0.0005}  # rms minus the paper at each budget (the last: within noise)
    for budget, gap in gaps.items():
        steps, batch = map(int, budget.split("x"))
        for name, val_by_lr in (("LoRA", {1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.45}),
                                ("ID-LoRA (paper)", {5e-4: 0.65, 1e-3: 0.6, 2e-3: 0.7}),
                                ("ID-LoRA rms", {5e-4: 0.35, 1e-3: 0.3, 2e-3: 0.32})):
            for lr, val in val_by_lr.items():
                for seed in range(2):
                    _write(tmp_path, name, lr, seed, val + 0.01 * seed, steps=steps, batch=batch)
            best = min(val_by_lr, key=val_by_lr.get)
            for seed in range(5):
                base = 1.0 + 0.05 * seed  # seeds differ a lot, the pairs little: only pairing separates them
                test = base + (gap + 0.001 * (seed - 2) if name == "ID-LoRA rms" else 0.3 if name == "LoRA" else 0)
                _write(tmp_path, name, best, seed, val_by_lr[best] + 0.01 * seed, test, steps=steps, batch=batch)
    _write(tmp_path, "LoRA", 1e-3, 0, 0.1, data="sft-v2")  # another task set: left out
    data = budgets.summarise(budgets.collect(str(tmp_path)), {"ID-LoRA rms": True})
    assert list(data["budgets"]) == ["30x4", "60x8", "240x8"]  # ordered by examples seen
    entry = data["budgets"]["30x4"]
    lora, paper = entry["methods"]["LoRA"], entry["methods"]["ID-LoRA (paper)"]
    assert (lora["lr"], lora["edge"], paper["lr"], paper["edge"]) == (2e-3, False, 1e-3, False)
    assert lora["seeds"] == [0, 1, 2, 3, 4] and math.isclose(lora["curve"]["0.002"], 0.405)
    d = entry["differences"]["ID-LoRA rms - ID-LoRA (paper)"]["nll"]
    diffs = [-0.1 + 0.001 * (s - 2) for s in range(5)]
    sd = math.sqrt(sum((x - sum(diffs) / 5) ** 2 for x in diffs) / 4)
    assert math.isclose(d["mean"], sum(diffs) / 5) and math.isclose(d["ci"], 2.776 * sd / math.sqrt(5))
    assert d["n"] == 5
    rule = data["rule"]["ID-LoRA rms"]
    assert rule["wins"] == ["30x4", "60x8"] and rule["losses"] == [] and rule["part1"] and rule["passes"]
    assert not data["rule"]["ID-LoRA rms, s=8"]["passes"]  # never run
    refused = budgets.summarise(budgets.collect(str(tmp_path)), {"ID-LoRA rms": False})["rule"]["ID-LoRA rms"]
    assert refused["part1"] and not refused["passes"]  # part 1 alone is not enough
    assert entry["floor"]["sentiment"] == {"at_floor": [], "every_method": False}
    assert entry["paired"]
    doc = budgets.render(data)
    assert "## 240 steps x 8 rows (1920 examples)" in doc and "| ID-LoRA rms | 30x4, 60x8, 240x8 | 30x4, 60x8 |" in doc
    assert "Verdict: ID-LoRA rms becomes the default." in doc
    summary = "\n".join(budgets.brief(data))
    assert "- 30x4: lowest mean test NLL `ID-LoRA rms` (1.000); every other method behind it beyond" in summary
    assert "(edge)" not in summary  # every rate is inside its grid: no mark, and no sentence explaining one
    assert "- 240x8: lowest mean test NLL `ID-LoRA rms` (1.100); tied with it in paired test NLL: `ID-LoRA (paper)`;" \
        in summary  # rms minus the paper: -0.0005 +- 0.002
    same = r"ties \(\+0\.000 ± 0\.000, n=5\)"  # the fabricated accuracies are all equal
    assert re.search(rf"\| 30x4 \| ID-LoRA rms \| 0\.001 \| 100 \| .* \| wins \(-0\.400 ± 0\.00\d, n=5\) "
                     rf"\| {same} \| 5 \|", summary)
    assert re.search(rf"\| 30x4 \| ID-LoRA \(paper\) \| .* \| wins \(-0\.300 ± 0\.000, n=5\) \| {same} \| 5 \|",
                     summary)
    # accuracy: higher is better, so a difference above 0 beyond its interval wins (NLL: it loses)
    up = dict(mean=0.1, ci=0.05, n=5)
    assert budgets.verdict(up, higher_is_better=True).startswith("wins") and budgets.verdict(up).startswith("loses")
    assert budgets.verdict(dict(mean=0.1, ci=0.2, n=5), True).startswith("ties")


def test_a_single_test_seed_is_reported_without_an_interval(tmp_path):
    """A rate scored on one test seed so far (a grid in progress) shows its mean alone, never "± 0.000"."""
    for lr, val in ((5e-4, 0.6), (1e-3, 0.5), (2e-3, 0.6)):
        for seed in range(2):
            _write(tmp_path, "LoRA", lr, seed, val, test=0.75 if (lr, seed) == (1e-3, 0) else None, acc=0.25)
    for seed in range(2):  # one pair so far: its difference shows alone too
        _write(tmp_path, "ID-LoRA (paper)", 1e-3, seed, 0.5, test=0.8 if seed == 0 else None, acc=0.5)
    data = budgets.summarise(budgets.collect(str(tmp_path)), {})
    doc = budgets.render(data).splitlines()
    row = next(line for line in doc if line.startswith("| LoRA |"))
    assert row.startswith("| LoRA | 0.001 | 100 | 0.750 | 0.250 | 0.250 |") and row.endswith("| 1 |") and "±" not in row
    assert "| ID-LoRA (paper) - LoRA | +0.050 | +0.250 | 1 |" in doc
    summary = "\n".join(budgets.brief(data))
    assert "| 30x4 | LoRA | 0.001 | 100 | 0.750 | 0.250 |" in summary
    assert "| 30x4 | ID-LoRA (paper) | 0.001 (edge) |" in summary and "a rate marked (edge) is the best" in summary


def test_paired_differences_are_also_reported_by_task(tmp_path):
    """Where a gap sits: the paired test NLL difference per task, beside the mean over tasks."""
    for seed in range(3):
        _write(tmp_path, "LoRA", 1e-3, seed, 0.5, test=1.0 + 0.1 * seed)
        _write(tmp_path, "ID-LoRA (paper)", 1e-3, seed, 0.5, test=1.0 + 0.1 * seed,
               by_task={"countries": 1.4 + 0.1 * seed + 0.01 * seed})  # behind on countries only
    data = budgets.summarise(budgets.collect(str(tmp_path)), {})
    d = data["budgets"]["30x4"]["differences"]["ID-LoRA (paper) - LoRA"]
    assert math.isclose(d["tasks"]["countries"]["mean"], 0.41) and d["tasks"]["countries"]["n"] == 3
    assert d["tasks"]["arithmetic"] == dict(mean=0.0, ci=0.0, n=3)
    assert math.isclose(d["nll"]["mean"], 0.41 / len(tasks.TASKS))
    doc = budgets.render(data)
    row = next(line for line in doc.splitlines() if line.startswith("| ID-LoRA (paper) - LoRA | +0.000"))
    assert row.split(" | ")[1 + list(tasks.TASKS).index("countries")] == "+0.410 ± 0.025"


def test_a_closed_task_set_is_reported_apart_without_a_plan(tmp_path):
    for data in ("protocol-v3", tasks.DATA):
        for seed in range(5):
            _write(tmp_path, "LoRA", 1e-3, seed, 0.5, 0.4 if data == tasks.DATA else 0.9, data=data)
    assert tasks.DATA != "protocol-v3"
    closed = budgets.summarise(budgets.collect(str(tmp_path), "protocol-v3"), {}, "protocol-v3")
    current = budgets.summarise(budgets.collect(str(tmp_path)), {})
    assert closed["budgets"]["30x4"]["methods"]["LoRA"]["nll"] == [0.9] * 5  # each reads its own runs only
    assert current["budgets"]["30x4"]["methods"]["LoRA"]["nll"] == [0.4] * 5
    doc = budgets.render(closed)
    assert "# Quality against examples seen (protocol-v3, 5 stored runs)" in doc and "## Closed" in doc
    assert "--data protocol-v3" in doc and "still lacks" not in doc  # nothing is planned on a closed task set
    assert "## What the protocol still lacks" in budgets.render(current)
    assert budgets.doc_path("protocol-v3").endswith("quality-budgets-v3.md")
    assert budgets.doc_path(tasks.DATA) == budgets.DOC
    assert "(protocol-v3)" in budgets.brief(closed)[0] and "quality-budgets-v3.md" in "\n".join(budgets.brief(closed))


def test_the_rule_refuses_a_candidate_that_loses_at_one_budget(tmp_path):
    for budget, gap in {"30x4": -0.1, "60x8": -0.2, "240x8": 0.1}.items():
        steps, batch = map(int, budget.split("x"))
        for name, shift in (("ID-LoRA (paper)", 0.0), ("ID-LoRA rms", gap)):
            for seed in range(5):
                _write(tmp_path, name, 1e-3, seed, 0.5, 1.0 + 0.05 * seed + shift + 0.001 * seed,
                       acc=0.99, steps=steps, batch=batch)
    data = budgets.summarise(budgets.collect(str(tmp_path)))
    rule = data["rule"]["ID-LoRA rms"]
    assert rule["losses"] == ["240x8"] and not rule["passes"]
    assert data["budgets"]["60x8"]["floor"]["countries"]["every_method"]  # accuracy 0.99 for both
    assert data["budgets"]["60x8"]["paired"]
    _write(tmp_path, "LoRA", 1e-3, 0, 0.5, steps=60, batch=8, first=9.0)  # another order of rows for seed 0
    data = budgets.summarise(budgets.collect(str(tmp_path)))
    assert not data["budgets"]["60x8"]["paired"] and "pairing is not valid" in budgets.render(data)


def test_the_rules_second_part_reads_the_slow_start_paired_by_seed():
    from benchmarks.quality.slow_start import learns

    def curves(drops: list[float]) -> list[dict]:  # loss 10 at step 0, then a drop of d at 30 and 2d at 120
        return [{"0": 10.0, "30": 10.0 - d, "120": 10.0 - 2 * d} for d in drops]

    lora = [1.0, 2.0, 4.0]
    data = {"steps": [30, 120], "runs": {
        "LoRA r=4": {"rates": {"0.01": curves(lora)}},
        "half": {"rates": {"0.01": curves([0.5 * d for d in lora])}},  # exactly half of LoRA's, seed by seed
        "less": {"rates": {"0.01": curves([0.4 * d for d in lora])}}}}
    assert learns(data, "half") is True and learns(data, "less") is False and learns(data, "never run") is None


def test_the_plan_lists_what_each_budget_lacks_with_a_grid_that_resumes_or_follows_the_last_choice(tmp_path):
    for name, lr in (("LoRA", 2e-3), ("ID-LoRA (paper)", 5e-4)):  # 30x4 complete for two methods
        for seed in range(5):
            _write(tmp_path, name, lr, seed, 0.5, 1.0)
        for other in (lr / 2, lr * 2):
            for seed in range(2):
                _write(tmp_path, name, other, seed, 0.6)
    for seed in range(2):  # 60x8: LoRA one rate begun, the paper one rate below the grid its 30x4 choice centres
        _write(tmp_path, "LoRA", 1e-3, seed, 0.4, steps=60, batch=8)
        _write(tmp_path, "ID-LoRA (paper)", 6.25e-5, seed, 0.4, steps=60, batch=8)
    data = budgets.summarise(budgets.collect(str(tmp_path)), {"ID-LoRA rms, s=8": True, "ID-LoRA rms": False})
    rows = budgets.plan(data)
    plan = {(b, m): (have, command) for b, m, _, have, command in rows}
    assert ("30x4", "LoRA") not in plan and ("30x4", "ID-LoRA (paper)") not in plan
    assert plan["30x4", "DoRA"] == ("nothing", "`--quality-steps 30 --quality-batch 4 --grid "
                                    "0.00025,0.0005,0.001,0.002,0.004 --methods 'DoRA'`")
    # centred on 30x4's choice and widened to what is stored, so the command resumes it and completes the grid
    assert plan["60x8", "LoRA"] == ("2 runs, 1 rate on both grid seeds, 0 test seeds", "`--quality-steps 60 "
                                    "--quality-batch 8 --grid 0.0005,0.001,0.002,0.004,0.008 --methods 'LoRA'`")
    assert "--grid 6.25e-05,0.000125,0.00025,0.0005,0.001,0.002 " in plan["60x8", "ID-LoRA (paper)"][1]
    assert data["budgets"]["60x8"]["methods"]["LoRA"]["edge"]  # one rate is no grid: on both its edges
    _write(tmp_path, "ID-LoRA rms, s=8", 1e-3, 0, 0.4, steps=60, batch=8)  # one grid seed: a run, not yet a rate
    single = budgets.plan(budgets.summarise(budgets.collect(str(tmp_path)), {"ID-LoRA rms, s=8": True}))
    assert [r[3] for r in single if r[:2] == ["60x8", "ID-LoRA rms, s=8"]] == ["1 run, 0 rates on both grid seeds, "
                                                                            "0 test seeds"]
    with pytest.raises(ValueError, match=r"\[0\.0003\] are not 0\.00025 times a power of 2"):
        budgets._span([2.5e-4, 3e-4, 1e-3])  # a rate off the grid's factor of 2 is named, not dropped
    # 3 rates at the largest budget, each grid run scored on test at once there (it trains 9x longer than at 30x4)
    assert "--grid 0.0005,0.001,0.002 --methods 'LoRA' --score-grid-tests`" in plan["240x8", "LoRA"][1]
    assert not any("--score-grid-tests" in command for (b, _), (_, command) in plan.items() if b != "240x8")
    assert ("240x8", "DoRA") not in plan  # DoRA may stay at the two smaller budgets
    assert ("60x8", "ID-LoRA rms, s=8") in plan and ("240x8", "ID-LoRA rms") not in plan
    # a candidate that fails part 2 is run for item 3 only: at the two smaller budgets, after the rule's runs
    assert [r[2] for r in rows if r[1] == "ID-LoRA rms"] == ["item 3 only (fails part 2)"] * 2
    assert rows.index(next(r for r in rows if r[1] == "ID-LoRA rms")) > rows.index(
        next(r for r in rows if r[0] == "240x8"))


def test_a_stored_id_lora_adapter_is_scored_by_a_process_that_trained_nothing(tmp_path, tiny_model_dir):
    """Resuming a grid whose runs are all stored scores the test split first: the process loads an ID-LoRA adapter
    before anything imported `idlora_trl` (which registers the IDLORA type with PEFT). Run in a fresh interpreter:
    this one imported `idlora_trl` long ago."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import idlora_trl  # noqa: F401  (registers IDLORA here, where the adapter is made)

    setup = dict(p=2, steps=1, batch=1, data="protocol-test")
    spec = Spec("ID-LoRA", 1e-3, 0, named_methods(2)["ID-LoRA (paper)"][1])
    config = peft_config(spec, 2, ["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(
        tmp_path / "work" / spec.key(setup))
    script = f"""
import sys
from transformers import AutoModelForCausalLM
from benchmarks.quality.runs import Bench, Spec
assert "idlora_trl" not in sys.modules, "the check needs a process that has not imported idlora_trl"
bench = Bench(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}), None, [], [], [], {setup!r},
              {str(tmp_path / "runs")!r}, {str(tmp_path / "work")!r})
model = bench.saved_adapter(Spec("ID-LoRA", 1e-3, 0, {spec.settings!r}))
print(type(model.peft_config["default"]).__name__)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["IDLoRAConfig"], result.stderr[-2000:]


def _smoke_bench(tmp_path):
    """The protocol's bench at the smoke run's sizes (a tiny random Llama, 2 steps of 4 rows), under `tmp_path`."""
    import argparse

    from benchmarks.quality import measure

    parser = argparse.ArgumentParser()
    measure.add_arguments(parser)
    args = parser.parse_args(["--quality-p", "2", "--quality-steps", "2", "--quality-batch", "4", "--val-per-task",
                              "2", "--test-per-task", "2", "--quality-dir", str(tmp_path / "runs"), "--work-dir",
                              str(tmp_path / "work")])
    args.smoke = True
    return measure.build_bench(args)[0]


def test_recheck_trains_a_stored_run_again_and_flags_a_difference(tmp_path, capsys):
    """`recheck` rebuilds a stored run's bench from its setup alone and trains it again: the same machine agrees to
    the last bit; a stored loss moved by 1e-3 is above the tolerance; a run that logged another number of losses or
    of another task set is refused (status 2)."""
    from benchmarks.quality import recheck

    bench = _smoke_bench(tmp_path)
    spec = Spec("ID-LoRA", 1e-3, 0, named_methods(2)["ID-LoRA (paper)"][1])
    bench.run(spec)
    path = bench.path(spec)
    assert recheck.main([path, "--tolerance", "1e-6"]) == 0, capsys.readouterr().out
    assert "training loss, step" in capsys.readouterr().out

    record = json.loads(Path(path).read_text())
    record["losses"][-1] += 1e-3
    Path(path).write_text(json.dumps(record))
    assert recheck.main([path]) == 1
    assert re.search(r"training loss, step 2 .* \| 1\.0e-03 \|", capsys.readouterr().out)

    record["losses"] = record["losses"][:-1]
    Path(path).write_text(json.dumps(record))
    assert recheck.main([path]) == 2 and "logged 1 losses, this one 2" in capsys.readouterr().err

    record["setup"]["data"] = "protocol-v3"
    Path(path).write_text(json.dumps(record))
    assert recheck.main([path]) == 2 and "task set 'protocol-v3'" in capsys.readouterr().err


def test_grid_runs_trained_here_are_scored_on_test_at_once_and_stored_ones_are_left_alone():
    """`--score-grid-tests`: a grid run trained in this process is scored on test while its adapter is here; a stored
    run is never trained again to be scored; the rate is chosen on validation whatever the test scores say."""
    from benchmarks.common import Clock
    from benchmarks.quality.measure import grid_search

    validation = {1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.6}  # 2e-3 wins on validation ...
    test = {1e-3: 0.1, 2e-3: 0.9, 4e-3: 0.9}  # ... and would lose on test

    class Bench:
        def __init__(self):
            self.stored = {(1e-3, 0): {"validation": {"nll": {"t": validation[1e-3]}}}}
            self.calls = []

        def load(self, spec):
            return self.stored.get((spec.lr, spec.seed))

        def run(self, spec, score_test=False):
            self.calls.append((spec.lr, spec.seed, score_test))
            record = self.stored.setdefault((spec.lr, spec.seed), {"validation": {"nll": {"t": validation[spec.lr]}}})
            if score_test:
                record["test"] = {"nll": {"t": test[spec.lr]}}
            return record

    bench = Bench()
    chosen, curve = grid_search(bench, "LoRA", (), [1e-3, 2e-3, 4e-3], 2, 2.0, 0, Clock(), score_test=True)
    assert chosen == 2e-3 and sorted(curve) == [1e-3, 2e-3, 4e-3]
    assert bench.calls == [(1e-3, 0, False), (1e-3, 1, True), (2e-3, 0, True), (2e-3, 1, True), (4e-3, 0, True),
                           (4e-3, 1, True)]
    assert "test" not in bench.stored[(1e-3, 0)]
    bench.calls.clear()
    grid_search(bench, "LoRA", (), [1e-3, 2e-3, 4e-3], 2, 2.0, 0, Clock())  # resumed: every run stored, none scored
    assert [c[2] for c in bench.calls] == [False] * 6


def test_which_setting_names_the_lowest_the_methods_tied_with_it_and_the_smallest_of_those():
    """Per budget: the lowest mean test NLL, the methods whose paired difference from it has 0 inside its interval
    (B: +0.010 ± 0.023 by hand), not one behind it beyond the interval (C: +0.200) nor one with a single seed (D);
    a method whose best rate is on the edge of its grid is not chosen yet and left out (E, the lowest)."""
    a = [1.0, 1.1, 1.2, 1.3, 1.4]
    methods = {"A": dict(seeds=[0, 1, 2, 3, 4], nll=a, trainable=200),
               "B": dict(seeds=[0, 1, 2, 3, 4], nll=[x + d for x, d in zip(a, (.02, -.01, .02, -.01, .03))],
                         trainable=100),
               "C": dict(seeds=[0, 1, 2, 3, 4], nll=[x + d for x, d in zip(a, (.2, .201, .199, .2, .2))], trainable=50),
               "D": dict(seeds=[0], nll=[0.1], trainable=10),
               "E": dict(seeds=[0, 1, 2, 3, 4], nll=[x - 0.5 for x in a], trainable=10, edge=True)}
    b = budgets.best(methods)
    assert (b["method"], b["tied"], b["fewest"], b["trainable"]) == ("A", ["A", "B"], "B", 100)
    assert math.isclose(b["nll"], 1.2)
    assert budgets.which_setting(b) == ("lowest mean test NLL `A` (1.200); tied with it in paired test NLL: `B`; the "
                                        "fewest parameters among these: `B` (100 trainable).")
    assert budgets.best({"A": methods["A"]}) is None and budgets.which_setting(None) == "not measured yet"


def test_a_run_scored_on_a_machine_without_its_adapter_stores_the_training_it_scored(tmp_path):
    """A grid run stored by an earlier sitting has no adapter on this machine: scoring it trains it again, and the
    stored record must then hold that training's losses and validation (the ones its test scores belong to), with
    its rows' hash, not the earlier sitting's beside the new test scores."""
    import shutil

    bench = _smoke_bench(tmp_path)
    spec = Spec("LoRA", 1e-3, 0)
    trained = bench.run(spec)
    earlier = dict(trained, losses=[9.0] * len(trained["losses"]), validation={"nll": dict.fromkeys(tasks.TASKS, 9.0)})
    del earlier["rows_sha"]  # records from before the check carry none
    Path(bench.path(spec)).write_text(json.dumps(earlier))  # "another machine's" training ...
    shutil.rmtree(tmp_path / "work" / spec.key(bench.setup))  # ... whose adapter is not here
    bench.run(spec, score_test=True)
    scored = json.loads(Path(bench.path(spec)).read_text())
    assert "test" in scored and scored["rows_sha"] == bench.rows_sha
    assert scored["losses"] == trained["losses"] and scored["validation"] == trained["validation"]
