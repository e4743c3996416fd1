#!/usr/bin/env bash
# Set up a virtual environment with the package and run one job in it.
#   bash scripts/bootstrap.sh demo [demo options]   # the offline end-to-end demo
#   bash scripts/bootstrap.sh test [pytest options] # the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-demo}"
shift || true

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# The pinned CPU build of torch must come first: an unpinned torch pulls a multi-GB CUDA build.
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

case "$job" in
    demo)
        exec hf-wemoe demo "$@"
        ;;
    test)
        set +e
        python -m pytest "$@"
        status=$?
        set -e
        if [ "$status" -eq 5 ]; then
            echo "error: pytest collected no tests" >&2
            exit 1
        fi
        exit "$status"
        ;;
    *)
        echo "usage: bash scripts/bootstrap.sh {demo|test} [options]" >&2
        exit 2
        ;;
esac
