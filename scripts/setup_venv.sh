# Sourced by the other scripts: create .venv in the repo root and install the pinned requirements when they change.
# The CPU build of torch 2.13.0 is what `pip install torch==2.13.0` gives on machines with the local wheel.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
WANTED="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt"
  echo "$WANTED" > "$STAMP"
  # Stores --help's text (quick_help.py), so the first `python train.py --help` is fast too.
  "$VENV/bin/python" "$REPO_ROOT/train.py" --help > /dev/null
fi
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
