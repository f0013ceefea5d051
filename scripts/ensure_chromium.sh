#!/usr/bin/env bash
# The browser tests (tests/test_ui_browser.py) drive Debian's Chromium through Playwright. Install it
# when it is missing and this user can (root with apt-get); otherwise say so: those tests then skip,
# and every other test still runs.
set -u
if command -v chromium >/dev/null 2>&1 || [ -n "${KEDIT_CHROMIUM:-}" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; then
        echo "installed chromium for the browser tests"
        exit 0
    fi
fi
echo "chromium is not installed (apt-get install chromium as root): the browser tests will skip"
exit 0
