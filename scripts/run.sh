#!/usr/bin/env bash
# The README's two commands:
#   scripts/run.sh demo [ARGS]   install (core) and analyse the bundled model on sklearn digits;
#                                writes onnxaom-out/demo/{stats.npz,findings.json,report.html}
#   scripts/run.sh test [ARGS]   install (dev) and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
shift || true
case "$what" in
    demo)
        bash scripts/setup.sh core
        exec .venv/bin/onnxaom demo "$@"
        ;;
    test)
        bash scripts/setup.sh dev
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: scripts/run.sh demo|test [ARGS]" >&2
        exit 2
        ;;
esac
