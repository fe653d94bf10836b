#!/usr/bin/env bash
# The whole test suite: fetches the default model if missing, runs every test in release mode
# (kernel parity on every shader variant the adapter offers, model loading and bad-input
# tests, the end-to-end comparison with Hugging Face transformers' fixtures, the CLI and the
# library API, doctests), then drives the desktop demo through one chat turn under Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
models/fetch_default.sh >/dev/null
cargo test --release "$@"
# The demo's screenshot goes to a temporary file: docs/demo.png changes only on purpose.
shot="$(mktemp --suffix=.png)"
tools/demo-screenshot.sh "$shot"
rm -f "$shot"
