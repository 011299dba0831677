#!/usr/bin/env bash
# Runs each test tier (a make target) even when an earlier one fails, then reports every tier and exits non-zero
# if any failed, so that one failure never hides the others. `make test` calls it:
#
#   bash .ci/tiers.sh test-latest test-pins test-axolotl
#
# MAKE names the make to run (make passes its own); the summary's last line reads "tiers: N passed, N failed".
set -uo pipefail
MAKE=${MAKE:-make}
passed=() failed=() lines=()
for tier in "$@"; do
    start=$(date +%s)
    echo "== tier $tier: starting"
    if $MAKE --no-print-directory "$tier"; then result=passed; passed+=("$tier"); else result=FAILED; failed+=("$tier"); fi
    lines+=("$(printf '%-14s %-7s %5d s' "$tier" "$result" $(( $(date +%s) - start )))")
done
echo "== test tiers"
printf '%s\n' "${lines[@]}"
echo "tiers: ${#passed[@]} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
