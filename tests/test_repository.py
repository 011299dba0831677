"""Repository rules: every Python module states its one job in its docstring; every folder of the package is in
the wheel.

One job per file is checked as far as a machine can honestly check it: each module opens with a docstring whose
first sentence says what the module does (not empty, not a placeholder, not a grab bag), and no two modules say
the same. Whether the code below keeps to that sentence is for review; the size tripwire only prompts the look.
"""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("idlora_trl", "idlora_trl_app", "integrations", "tests", "benchmarks", "examples")

# Fewer words name a thing without saying what the module does with it ("Helpers.", "The config module.").
MIN_WORDS = 4
PLACEHOLDER = re.compile(r"\b(todo|tbd|fixme|xxx|placeholder|lorem ipsum)\b", re.IGNORECASE)
# Words that announce several unrelated jobs in one file.
GRAB_BAG = re.compile(r"\b(misc|miscellaneous|various|assorted|utils|utilities|stuff|etc|and more|and so on)\b",
                      re.IGNORECASE)
# Not the rule: the largest module is about 400 lines today, and one that grows half as long again has usually
# taken on a second job. Past this, look for it and split; raise the number (saying why) only if the module's one
# job really needs the length.
TRIPWIRE_LINES = 600


def modules() -> list[Path]:
    files = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 40
    return files


def first_sentence(path: Path) -> str:
    """The docstring's first sentence (up to a full stop before a capital, or the end of the first paragraph)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)[0]


def test_every_module_opens_with_the_job_it_does():
    bad = {}
    for path in modules():
        sentence = first_sentence(path)
        if len(sentence.split()) < MIN_WORDS or PLACEHOLDER.search(sentence) or GRAB_BAG.search(sentence):
            bad[str(path.relative_to(ROOT))] = sentence
    assert not bad, f"a module's docstring must open with the one job it does (one sentence, {MIN_WORDS}+ words, " \
                    f"no placeholder, no grab bag): {bad}"


def test_no_two_modules_state_the_same_job():
    seen: dict[str, str] = {}
    same = []
    for path in modules():
        key = first_sentence(path).lower().rstrip(".")
        if key in seen:
            same.append((seen[key], str(path.relative_to(ROOT))))
        seen.setdefault(key, str(path.relative_to(ROOT)))
    assert not same, f"modules stating the same job (merge them, or say how they differ): {same}"


def test_a_module_past_the_tripwire_is_split():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > TRIPWIRE_LINES}
    assert not long, f"over {TRIPWIRE_LINES} lines (see TRIPWIRE_LINES): {long}"


def test_every_folder_of_the_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by hand (the library, the app, and integrations/ mapped into
    idlora_trl.integrations): a folder
    missing from the list is missing from a built wheel (`idlora-trl` would fail to import its CLI), although an
    editable install still finds it. Folders holding only data files (the Axolotl examples) count too."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {"idlora_trl": ROOT / "idlora_trl", "idlora_trl_app": ROOT / "idlora_trl_app",
             "idlora_trl.integrations": ROOT / "integrations"}
    on_disk = set()
    for package, folder in roots.items():
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and "__pycache__" not in path.parts and any(f.is_file() for f in path.iterdir()):
                on_disk.add(".".join([package, *path.relative_to(folder).parts]))
    assert set(setuptools["packages"]) == on_disk
    assert not any(p == "benchmarks" or p.startswith("benchmarks.") for p in setuptools["packages"])  # not shipped
    for package, patterns in setuptools["package-data"].items():
        assert package in on_disk and patterns, package


def test_installing_the_library_without_extras_brings_no_matplotlib():
    """`pip install idlora-trl` installs what the library needs; the picture of a run (matplotlib) is the `plot`
    extra. Walks the installed metadata: the requirements of idlora-trl and of each of them, extras left out."""
    import re
    from importlib import metadata

    seen, stack = set(), ["idlora-trl"]
    while stack:
        name = stack.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # an optional platform dependency that is not installed here
            continue
        stack += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requirements if "extra ==" not in r]
    assert {"torch", "peft", "trl", "transformers"} <= seen  # the walk reaches the real dependencies
    assert "matplotlib" not in seen
    assert "matplotlib" in {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]
                            for r in metadata.requires("idlora-trl") if 'extra == "plot"' in r}
