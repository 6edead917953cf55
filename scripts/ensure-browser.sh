#!/usr/bin/env bash
# The browser test drives JupyterLab in headless Chromium: make sure chromium and chromedriver are there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver with apt-get (for the browser test)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    exit 0
fi
echo "The browser test needs Chromium and ChromeDriver: sudo apt-get install chromium chromium-driver" >&2
exit 1
