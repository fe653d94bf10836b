#!/usr/bin/env bash
# Installs what longwave needs on a fresh Debian/Ubuntu machine: a Vulkan loader and, when no
# GPU driver is present, Mesa's software Vulkan driver (lavapipe); python3 with pip (the
# default model is fetched from a Python package); a C compiler for crates that build C; and a
# Rust toolchain if cargo is missing.
set -euo pipefail
log() { printf 'install-deps: %s\n' "$*" >&2; }
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v cc >/dev/null || need+=(gcc)
command -v curl >/dev/null || need+=(curl ca-certificates)
ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || need+=(libvulkan1)
# Any installed Vulkan driver manifest means a driver is present; otherwise add lavapipe.
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 && ! ls /etc/vulkan/icd.d/*.json >/dev/null 2>&1; then
    need+=(mesa-vulkan-drivers)
fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    log "installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
fi
log "ok"
