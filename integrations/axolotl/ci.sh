#!/usr/bin/env bash
# Axolotl CI tier: a separate venv with axolotl 0.19.0 on CPU torch 2.13.0, this project installed into it
# without touching Axolotl's pins, then pytest on tests/test_axolotl.py, test_axolotl_qlora.py and test_quantized.py
# (real `axolotl train` runs for SFT, DPO and a 4-bit base, plus validation unit tests; ID-LoRA on bitsandbytes
# 4-bit and 8-bit bases, whose bitsandbytes 0.50.2 comes with Axolotl).
#
#   bash integrations/axolotl/ci.sh            # from anywhere; paths are relative to the repo root
#   bash integrations/axolotl/ci.sh -k dpo     # extra arguments go to pytest
#
# Idempotent: the venv (.venv-axolotl, ~4.3 GB) is created and filled only when missing or older than
# pyproject.toml. Override with AXOLOTL_VENV, AXOLOTL_SPEC, TORCH_SPEC, PYTHON.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON=${PYTHON:-python3}
VENV=${AXOLOTL_VENV:-.venv-axolotl}
AXOLOTL_SPEC=${AXOLOTL_SPEC:-axolotl==0.19.0}
# torch pinned: 2.13.0 has a local CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# What Axolotl 0.19.0 pins, and what this tier exists to test against: checked after the install.
EXPECTED_PINS=${EXPECTED_PINS:-trl==1.9.0 peft==0.20.0 transformers==5.16.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$VENV/bin/python"
STAMP="$VENV/.idlora-installed"

pip_install() {  # quiet, without the per-package notes this machine's pip config prints about local indexes
    "$PY" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

t0=$(date +%s)
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "== axolotl venv: installing into $VENV ($AXOLOTL_SPEC, $TORCH_SPEC)"
    [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
    echo '*' > "$VENV/.gitignore"   # keep the 4 GB venv out of `git status`
    pip_install --upgrade pip
    pip_install "$AXOLOTL_SPEC" "$TORCH_SPEC"
    # This project without its dependencies, so nothing Axolotl pinned moves ...
    pip_install --no-deps -e .
    # ... then only what is missing, with everything already installed frozen as a constraint.
    "$PY" -m pip freeze --exclude-editable | grep -v ' @ ' > "$VENV/idlora-constraints.txt"
    missing=$("$PY" - <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement

# deepspeed: imported only when ZeRO-3 is in use, sdist only, not needed on CPU (`axolotl[deepspeed]` adds it).
SKIP = {"deepspeed"}
missing = []
for spec in md.requires("idlora-trl") or []:
    req = Requirement(spec)
    if (req.marker and not req.marker.evaluate({"extra": ""})) or req.name in SKIP:
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req))
        continue
    if not req.specifier.contains(version, prereleases=True):
        raise SystemExit(f"idlora-trl needs {req}, but Axolotl's install has {req.name} {version}")
print(" ".join(missing))
PYEOF
)
    echo "== missing dependencies of idlora-trl: ${missing:-none} (deepspeed left out: only ZeRO-3 needs it; pip may say so)"
    # shellcheck disable=SC2086
    pip_install -c "$VENV/idlora-constraints.txt" "pytest>=8" $missing
    touch "$STAMP"
else
    echo "== axolotl venv: $VENV already installed"
fi
t1=$(date +%s)
echo "== axolotl venv install time: $((t1 - t0)) s"

# The pins must be Axolotl's, not upgraded by our install.
"$PY" - "$EXPECTED_PINS" <<'PYEOF'
import importlib.metadata as md
import sys

report = {name: md.version(name) for name in ("axolotl", "torch", "trl", "peft", "transformers")}
print("== versions:", ", ".join(f"{k} {v}" for k, v in report.items()))
wrong = [pin for pin in sys.argv[1].split() if md.version(pin.split("==")[0]) != pin.split("==")[1]]
if wrong:
    raise SystemExit(f"axolotl venv does not have Axolotl's pins {wrong}: {report}")
PYEOF

export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_DISABLED=true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
status=0
"$PY" -m pytest tests/test_axolotl.py tests/test_axolotl_qlora.py tests/test_quantized.py -p no:cacheprovider "$@" || status=$?
t2=$(date +%s)
echo "== axolotl tests run time: $((t2 - t1)) s (install $((t1 - t0)) s, total $((t2 - t0)) s)"
exit $status
