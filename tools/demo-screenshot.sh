#!/usr/bin/env bash
# Drive the desktop demo through one chat turn under a virtual X server and save a screenshot.
#
# Builds longwave-demo (release), starts it under Xvfb with wgpu on Vulkan (lavapipe when there
# is no GPU), sends one prompt, waits for the streamed reply, saves the window as a PNG and
# closes. Fails if the demo fails, the screenshot is missing, or the reply lacks the expected
# word.
#
# Usage: tools/demo-screenshot.sh [OUT_PNG]   (default: docs/demo.png)
# Environment: DEMO_PROMPT, DEMO_EXPECT (default "Paris"), DEMO_TIMEOUT (seconds, default 900).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${1:-docs/demo.png}"
prompt="${DEMO_PROMPT:-What is the capital of France?}"
expect="${DEMO_EXPECT:-Paris}"
limit="${DEMO_TIMEOUT:-900}"

log() { printf 'demo-screenshot: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Xvfb, and the X11 libraries winit loads at run time.
if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q libxkbcommon-x11.so; then
    command -v apt-get >/dev/null 2>&1 \
        || die "install Xvfb (xvfb-run) and libxkbcommon-x11, libX11-xcb, libXcursor, libXrandr, libXi"
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
    log "installing xvfb and X11 client libraries"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq xvfb xauth libxkbcommon-x11-0 \
        libx11-xcb1 libxcursor1 libxrandr2 libxi6 >&2
fi
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 && ! ls /etc/vulkan/icd.d/*.json >/dev/null 2>&1; then
    log "no Vulkan driver found; tools/install-deps.sh installs Mesa's software one (mesa-vulkan-drivers)"
fi

# The model first, so the window's time goes to the chat.
if [[ -z "${LONGWAVE_MODEL:-}" ]]; then
    bash models/fetch_default.sh >/dev/null
fi

log "building longwave-demo (release)"
cargo build --release -p longwave-demo >&2
bin="${CARGO_TARGET_DIR:-$repo/target}/release/longwave-demo"

mkdir -p "$(dirname "$out")"
rm -f "$out"
reply_file="$(mktemp "${TMPDIR:-/tmp}/longwave-demo-reply.XXXXXX")"
trap 'rm -f "$reply_file"' EXIT
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

log "running the demo under Xvfb (prompt: $prompt)"
status=0
# No Wayland: winit would prefer it when WAYLAND_DISPLAY is set; Xvfb is an X server.
env -u WAYLAND_DISPLAY WGPU_BACKEND="${WGPU_BACKEND:-vulkan}" \
    timeout "$limit" xvfb-run -a -s "-screen 0 1280x800x24" \
    "$bin" --prompt "$prompt" --screenshot "$out" --exit-after >"$reply_file" || status=$?

reply="$(cat "$reply_file")"
log "reply: $reply"
[[ $status -eq 0 ]] || die "the demo exited with status $status"
[[ -s "$out" ]] || die "no screenshot at $out"
[[ -n "${reply//[[:space:]]/}" ]] || die "the reply is empty"
grep -qi -- "$expect" <<<"$reply" || die "the reply does not contain \"$expect\""
log "ok: screenshot at $out"
