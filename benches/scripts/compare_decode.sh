#!/usr/bin/env bash
# Decode and prefill of two longwave binaries on the same GPU, run alternately (A B A B) so
# drift between calls does not favour either; the comparisons in benches/RESULTS.md come from
# this. Models are random-weight ones that `longwave synth` writes (no download).
#
#   benches/scripts/compare_decode.sh OLD_BINARY NEW_BINARY OUT_DIR
#
# Writes OUT_DIR/dec-{sm,q4,f16}-{a,b}.jsonl (one `bench decode --json` object per line).
set -euo pipefail
a=$1 b=$2 out=$3
work=${WORK:-/tmp/longwave-compare}
mkdir -p "$out" "$work"
[ -f "$work/sm.gguf" ] || "$b" synth --shape smollm2-135m --dtype q4_1 --out "$work/sm.gguf"
[ -f "$work/q4.gguf" ] || "$b" synth --shape llama3-8b --dtype q4_0 --out "$work/q4.gguf"
[ -f "$work/f16.gguf" ] || "$b" synth --shape llama3-8b --dtype f16 --out "$work/f16.gguf"
for round in 1 2; do
    for side in a b; do
        bin=${!side}
        "$bin" bench decode --model "$work/sm.gguf" --contexts 128,2048,8000 --decode-tokens 128 --json >> "$out/dec-sm-$side.jsonl"
        "$bin" bench decode --model "$work/q4.gguf" --contexts 1024 --decode-tokens 64 --json >> "$out/dec-q4-$side.jsonl"
        "$bin" bench decode --model "$work/f16.gguf" --contexts 1024,16000 --decode-tokens 64 --json >> "$out/dec-f16-$side.jsonl"
    done
done
