#!/usr/bin/env bash
# Makes sure python3 (>= 3.11) with the venv module is there; installs Debian's packages as root.
set -euo pipefail

if python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing python3 and python3-venv with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    exit 0
fi
echo "Python 3.11+ with the venv module is needed: install it (Debian/Ubuntu: sudo apt-get install python3 python3-venv)" >&2
exit 1
