"""`python -m benchmarks`: the benchmark suite (see `benchmarks.cli`)."""
from benchmarks.cli import main

raise SystemExit(main())
