#!/usr/bin/env bash
# Install Debian's chromium where it is missing: the headless browser that tests the HTML report
# (tests/test_html_report.py drives it with Playwright; `playwright install`, which downloads a
# browser build of its own, is never used). Idempotent and quiet; without root or apt-get it only
# says so, and the browser test skips.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
        >/dev/null 2>&1 || echo "setup_browser: could not apt-get install chromium" >&2
else
    echo "setup_browser: chromium missing and cannot be installed here (needs root and apt-get)" >&2
fi
