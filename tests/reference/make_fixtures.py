#!/usr/bin/env python3
"""Generate HF-transformers reference fixtures for longwave's default model.

This is run by hand (not by CI) whenever the fixtures need to be rebuilt. It
loads SmolLM2-135M-Instruct (Q4_1 GGUF) through HF transformers, which
dequantizes the weights, and runs everything on the CPU in float32 under
torch.no_grad(). The outputs are what longwave's own tokenizer and forward
pass are compared against.

Requirements (CPU-only is fine):

    python3 -m pip install torch transformers gguf accelerate numpy
    models/fetch_default.sh            # puts the GGUF into models/cache/

Usage (from the repository root):

    python3 tests/reference/make_fixtures.py \
        [--model models/cache/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out tests/fixtures]

Writes into the output directory:

    reference.json     tokenizer ids, logits summaries, greedy outputs, NLL
    logits_<n>.f32     last-position logits (full vocabulary, little-endian f32)

and reads ppl_text.txt from the same directory (it is hand-written, checked in).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "cache", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures")

# Strings chosen to exercise the pre-tokenizer and byte-level BPE edge cases.
TOKEN_STRINGS = [
    "Hello, world!",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "line one\nline two\n\n\ttabbed\tline",
    "12345 and 3.14159 and 1,000,000",
    "Wait... what?! (yes; no) [a/b] {c:d} \"quoted\" 'single' -- end.",
    "café naïve résumé Ærøskøbing Straße",
    "日本語のテキスト 中文 한국어",
    "emoji: 🦀🚀 👍🏽 ❤️",
    "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}",
    "<|im_start|>user\nHi<|im_end|>",
]

# Prompts for last-position logits: ~5, ~40 and ~150 tokens of English prose.
LOGIT_PROMPTS = [
    "The capital of France is",
    "The river wound slowly through the valley, past orchards and stone farmhouses, "
    "until it reached the old mill at the edge of the village. There the water turned "
    "a wooden wheel that had not stopped in",
    "When the first railways were built, most people had never travelled faster than a "
    "horse could run. Doctors worried that the human body could not survive such speed, "
    "and newspapers printed warnings about sparks, smoke and frightened cattle. Within a "
    "few decades, however, the railway had changed daily life almost everywhere it went. "
    "Fresh fish could be sold far from the coast, and towns agreed on a single standard "
    "time so that timetables would make sense. Workers "
    "moved to the cities in search of jobs, while families who had rarely left their own "
    "county began to take holidays by the sea. Engineers built bridges and tunnels on a "
    "scale never attempted before. Historians often say that the "
    "railway changed not only how goods moved but also the way people",
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a GPU is in one sentence.",
]

MAX_NEW_TOKENS = 32


def log(msg):
    print(f"make_fixtures: {msg}", file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def as_id_list(x):
    """apply_chat_template may return a list, a tensor or a BatchEncoding."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(i) for i in x]


def forward_logits(model, ids):
    """Logits for every position of `ids` (full recompute, no KV cache)."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits[0]
    assert logits.dtype == torch.float32
    return logits


def top_k(logits_row, k=5):
    vals, idx = torch.topk(logits_row, k)
    return [[int(i), float(v)] for i, v in zip(idx.tolist(), vals.tolist())]


def load(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, model_file = os.path.split(os.path.abspath(model_path))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    kwargs = dict(gguf_file=model_file, attn_implementation="eager")
    try:
        # transformers >= 4.56 names it `dtype`; older versions `torch_dtype`.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    model = model.to(device="cpu", dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    return tokenizer, model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="path to the GGUF file")
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixtures directory")
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)

    model_sha = sha256_file(args.model)
    if model_sha != EXPECTED_SHA256:
        log(f"warning: model sha256 {model_sha} differs from the expected {EXPECTED_SHA256}")

    import gguf
    import transformers
    from importlib.metadata import version as pkg_version

    log(f"loading {args.model}")
    tokenizer, model = load(args.model)
    cfg = model.config

    ref = {
        "model_file": os.path.basename(args.model),
        "model_sha256": model_sha,
        "generated_by": {
            "script": "tests/reference/make_fixtures.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": pkg_version("gguf"),
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "device": "cpu",
            "dtype": "float32",
            "attn_implementation": "eager",
        },
        "config": {
            "vocab_size": int(cfg.vocab_size),
            "hidden_size": int(cfg.hidden_size),
            "num_hidden_layers": int(cfg.num_hidden_layers),
            "num_attention_heads": int(cfg.num_attention_heads),
            "num_key_value_heads": int(cfg.num_key_value_heads),
            "intermediate_size": int(cfg.intermediate_size),
            "rms_norm_eps": float(cfg.rms_norm_eps),
            "rope_theta": float(getattr(cfg, "rope_theta", None)
                                or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")),
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        },
    }
    vocab = int(cfg.vocab_size)

    # ---- tokenizer -------------------------------------------------------
    log("tokenizer cases")
    probe = "Hello"
    with_special = tokenizer(probe).input_ids
    without_special = tokenizer(probe, add_special_tokens=False).input_ids
    tokens = []
    for text in TOKEN_STRINGS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        # Round trip is recorded, not asserted: it is informative for the Rust side.
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        tokens.append({"text": text, "ids": [int(i) for i in ids], "decodes_back": decoded == text})
    ref["tokens"] = tokens
    ref["bos_id"] = int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None
    ref["eos_id"] = int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None
    ref["bos_token"] = tokenizer.bos_token
    ref["eos_token"] = tokenizer.eos_token
    ref["adds_bos_by_default"] = bool(
        ref["bos_id"] is not None and len(with_special) > 0 and with_special[0] == ref["bos_id"]
        and with_special != without_special
    )
    ref["adds_eos_by_default"] = bool(
        ref["eos_id"] is not None and len(with_special) > 0 and with_special[-1] == ref["eos_id"]
        and with_special != without_special
    )

    with torch.no_grad():
        # ---- last-position logits -----------------------------------------
        log("logits")
        logit_cases = []
        for n, text in enumerate(LOGIT_PROMPTS):
            ids = [int(i) for i in tokenizer(text, add_special_tokens=False).input_ids]
            last = forward_logits(model, ids)[-1]
            assert last.shape == (vocab,), last.shape
            fname = f"logits_{n}.f32"
            last.numpy().astype("<f4").tofile(os.path.join(args.out, fname))
            logit_cases.append({
                "text": text,
                "ids": ids,
                "file": fname,
                "top5": top_k(last),
            })
            log(f"  prompt {n}: {len(ids)} tokens, top1 {logit_cases[-1]['top5'][0]}")
        ref["logits"] = logit_cases

        # ---- greedy chat generation ----------------------------------------
        log("greedy generation")
        eos = ref["eos_id"]
        greedy = []
        for content in CHAT_PROMPTS:
            messages = [{"role": "user", "content": content}]
            prompt_ids = as_id_list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            seq = list(prompt_ids)
            out_ids, margins = [], []
            stopped = False
            for _ in range(MAX_NEW_TOKENS):
                last = forward_logits(model, seq)[-1]
                vals, idx = torch.topk(last, 2)
                nxt = int(idx[0])
                margins.append(float(vals[0] - vals[1]))
                out_ids.append(nxt)
                seq.append(nxt)
                if nxt == eos:
                    stopped = True
                    break
            text = tokenizer.decode(out_ids, skip_special_tokens=False)
            greedy.append({
                "messages": messages,
                "prompt_text": tokenizer.decode(prompt_ids, skip_special_tokens=False),
                "prompt_ids": prompt_ids,
                "output_ids": out_ids,
                "output_text": text,
                "stopped_at_eos": stopped,
                # logit gap between the top-2 candidates at each step; small gaps
                # mark steps where an f32 implementation may legitimately diverge.
                "top2_margins": [round(m, 4) for m in margins],
            })
            log(f"  {content!r} -> {text!r}")
        ref["greedy"] = greedy

        # ---- per-token NLL / perplexity -----------------------------------
        log("nll")
        with open(os.path.join(args.out, "ppl_text.txt"), encoding="utf-8") as f:
            ppl_text = f.read()
        ids = [int(i) for i in tokenizer(ppl_text, add_special_tokens=False).input_ids]
        ctx = int(getattr(cfg, "max_position_embeddings", 2048))
        assert len(ids) <= ctx, (len(ids), ctx)
        logits = forward_logits(model, ids)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        target = torch.tensor(ids[1:], dtype=torch.long)
        nll = (-logp.gather(1, target[:, None])[:, 0]).tolist()
        mean = sum(nll) / len(nll)
        ref["nll"] = {
            "text_file": "ppl_text.txt",
            "add_bos": False,
            "ids": ids,
            "nll": [round(x, 6) for x in nll],
            "mean_nll": mean,
            "perplexity": math.exp(mean),
            "note": "nll[i] = -ln p(ids[i+1] | ids[0..=i]); one window, log-softmax in float64 of float32 logits",
        }
        log(f"  {len(ids)} tokens, perplexity {math.exp(mean):.4f}")

    path = os.path.join(args.out, "reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log(f"wrote {path} in {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
