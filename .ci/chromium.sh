#!/usr/bin/env bash
# Best effort: install Debian's headless Chromium and its WebDriver for the optuna-dashboard browser test.
# Prints the browser's path when both are there; prints nothing (and the test is skipped) where they cannot
# be installed (not root, no apt-get, no network).
set -uo pipefail
have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }
if ! have && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
        >/dev/null 2>&1 || exit 0
fi
have && command -v chromium
exit 0
