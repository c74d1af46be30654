#!/usr/bin/env bash
# Run every test. First pytest runs tests/ and each chapter through nbval, with
# the test-size parameters in book/_nbval_parameters.yml. Then a full build of
# the book executes every chapter at full size, with warnings as errors.
# Extra arguments go to pytest. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# With MPLBACKEND set (for example to Agg), the kernels drop every inline figure
# without an error.
unset MPLBACKEND

pytest_status=0
.venv/bin/python -m pytest "$@" || pytest_status=$?
if [ "$pytest_status" -eq 5 ]; then
    echo "error: pytest collected no tests (expected tests/ and the chapters)." >&2
    exit 1
fi
if [ "$pytest_status" -ne 0 ]; then
    exit "$pytest_status"
fi

.venv/bin/jupyter-book build book --all -W -n --keep-going
