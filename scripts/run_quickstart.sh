#!/usr/bin/env bash
# Run the README's quick-start commands exactly as written, in a fresh clone of this repository
# and a new virtual environment. Used by CI, so the two commands stay true at every commit.
#   bash scripts/run_quickstart.sh [WORKDIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
git clone --quiet "$repo" "$work/clone"
cd "$work/clone"
# The first ```bash block after "## Quick start": one command per line, comments stripped.
mapfile -t commands < <(awk '/^## Quick start/{s=1} s&&/^```bash/{b=1;next} b&&/^```/{exit} b' README.md \
                        | sed 's/[[:space:]]#.*$//' | sed '/^[[:space:]]*$/d')
if [ "${#commands[@]}" -ne 2 ]; then
    echo "expected two quick-start commands in README.md, found ${#commands[@]}" >&2
    exit 1
fi
for cmd in "${commands[@]}"; do
    echo "+ $cmd"
    bash -c "$cmd"
done
