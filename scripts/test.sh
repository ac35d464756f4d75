#!/usr/bin/env bash
# The test suite, as CI runs it: lint, then pytest (CPU, tiny locally built models). Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_venv.sh"
cd "$REPO_ROOT"
ruff check .
python -m pytest tests "$@"
