#!/usr/bin/env bash
# Install everything the tests need, then run them. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the quick ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
python -m pytest "$@"
