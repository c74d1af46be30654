#!/usr/bin/env bash
# Run every test, in three steps; each runs only if the one before passed.
#  1. pytest runs tests/ and each chapter through nbval, with the test-size
#     parameters in book/_nbval_parameters.yml.
#  2. A full build of the book executes every chapter at full size, with
#     warnings as errors.
#  3. tests/test_browser.py opens every page of that build in headless Chromium
#     (Debian's package `chromium`) and saves screenshots in test-artifacts/.
# Extra arguments go to the pytest of step 1. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# With MPLBACKEND set (for example to Agg), the kernels drop every inline figure
# without an error.
unset MPLBACKEND

# Run pytest with the given arguments; fail if it collects no tests (status 5).
run_pytest() {
    local status=0
    .venv/bin/python -m pytest "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "error: pytest collected no tests for: $*" >&2
        return 1
    fi
    return "$status"
}

run_pytest "$@"

.venv/bin/jupyter-book build book --all -W -n --keep-going

run_pytest tests/test_browser.py --book-html book/_build/html
