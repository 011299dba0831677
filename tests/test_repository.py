"""Repository rules: no source file over 400 lines."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400


def test_no_python_file_over_400_lines():
    files = [p for folder in ("idlora_trl", "integrations", "tests", "benchmarks", "examples")
             for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 40
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, f"files over {LIMIT} lines: {long}"
