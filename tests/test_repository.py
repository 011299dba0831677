"""Repository rules: no source file over 400 lines; every folder of the package is in the wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400


def test_no_python_file_over_400_lines():
    files = [p for folder in ("idlora_trl", "idlora_trl_app", "integrations", "tests", "benchmarks", "examples")
             for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 40
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, f"files over {LIMIT} lines: {long}"


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
