"""The ID-LoRA section of a saved adapter's README.md (its model card).

PEFT writes README.md when an adapter is saved, then the adapter's config; `IDLoRAConfig.save_pretrained` then adds
(or replaces) this section, so every saved adapter and Trainer checkpoint says what it is, its settings, and that
loading it needs idlora-trl: without `import idlora_trl`, PEFT does not know the method and stops with
`KeyError: 'IDLORA'`.
"""

from __future__ import annotations

import os

BEGIN, END = "<!-- idlora-trl: model card section -->", "<!-- /idlora-trl -->"
SETTINGS = ("r", "num_clusters", "rank_boost", "idlora_alpha", "router", "router_norm", "selection", "distance",
            "seed")


def section(config) -> str:
    targets = config.target_modules  # PEFT stores the resolved full names: show each kind once
    if isinstance(targets, (set, list, tuple)):
        kinds = sorted({name.rsplit(".", 1)[-1] for name in targets})
        targets = f"{', '.join(kinds)} ({len(targets)} modules)" if len(kinds) < len(targets) else ", ".join(kinds)
    settings = ", ".join(f"`{name}={getattr(config, name)!r}`" for name in SETTINGS)
    return "\n".join([
        BEGIN, "## ID-LoRA adapter", "",
        "This is an [ID-LoRA](https://arxiv.org/abs/2602.20727) adapter (PEFT method `IDLORA`), trained with "
        "[idlora-trl](https://pypi.org/project/idlora-trl/): frozen skeleton rows of each adapted weight, one shared "
        "low-rank matrix `B` and a router `T`; the `[k, r]` index tables are saved with the weights, so loading "
        "never clusters again.", "",
        f"Settings: {settings}; adapted modules: {targets}.", "",
        "Loading it needs idlora-trl, which registers ID-LoRA with PEFT when it is imported:", "",
        "```bash", "pip install idlora-trl", "```", "",
        "```python", "import idlora_trl  # registers ID-LoRA with PEFT", "from peft import PeftModel", "",
        'model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")', "```", "",
        "Without `import idlora_trl`, PEFT does not know the method and stops with `KeyError: 'IDLORA'`.", END])


def write_section(directory: str, config) -> None:
    """Add the section to `directory`/README.md, or replace the one an earlier save wrote."""
    path = os.path.join(directory, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section(config) + rest.split(END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section(config) + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
