#!/usr/bin/env bash
# The whole test suite: fetches the default model if missing, then runs every test in release
# mode (kernel parity on every shader variant the adapter offers, model loading and bad-input
# tests, and the end-to-end comparison with Hugging Face transformers' fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
models/fetch_default.sh >/dev/null
cargo test --release "$@"
