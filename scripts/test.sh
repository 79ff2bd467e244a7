#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and the test browser (scripts/setup_browser.sh), then lint and
# run the whole test suite offline.
# Fails when pytest collects no test (its exit status 5) as for any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
NOS_OFFLINE=1 bash scripts/setup.sh
bash scripts/setup_browser.sh
export NOS_OFFLINE=1
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" = 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
