//! The command line on bad input: every case ends with a clear message and a failing exit
//! status, never a panic or a hang. Plus the output contract of `generate`, `ppl` and
//! `bench decode --json`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn model() -> PathBuf {
    let p =
        std::env::var_os("LONGWAVE_TEST_MODEL").map(PathBuf::from).unwrap_or_else(longwave::model::default_model_path);
    assert!(p.is_file(), "default model missing at {}: run models/fetch_default.sh", p.display());
    p
}

fn longwave(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longwave"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fails_with(o: &Output, needle: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {e}");
    assert!(!e.contains("panicked"), "panicked: {e}");
    assert!(e.contains(needle), "stderr lacks {needle:?}: {e}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("longwave-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn no_adapter_says_how_to_get_a_driver() {
    // A backend that does not exist on this platform leaves wgpu with no adapter.
    let backend = if cfg!(target_os = "windows") { "metal" } else { "dx12" };
    let o = longwave(&["info", "--adapters-only"], &[("WGPU_BACKEND", backend)]);
    fails_with(&o, "no GPU adapter found");
    fails_with(&o, "mesa-vulkan-drivers");
}

#[test]
fn truncated_and_corrupt_model_files_are_named() {
    let bytes = std::fs::read(model()).unwrap();
    let cut = tmp("truncated.gguf");
    std::fs::write(&cut, &bytes[..1 << 20]).unwrap();
    let o = longwave(&["generate", "--model", cut.to_str().unwrap(), "--prompt", "hi"], &[]);
    fails_with(&o, "truncated.gguf");
    let mut bad = bytes[..4096].to_vec();
    bad[..4].copy_from_slice(b"GGUX");
    let p = tmp("magic.gguf");
    std::fs::write(&p, &bad).unwrap();
    fails_with(&longwave(&["info", "--model", p.to_str().unwrap()], &[]), "magic.gguf");
    let missing = tmp("does-not-exist.gguf");
    fails_with(&longwave(&["generate", "--model", missing.to_str().unwrap(), "--prompt", "x"], &[]), "does-not-exist");
}

#[test]
fn prompt_past_the_context_and_too_little_memory() {
    let m = model();
    let m = m.to_str().unwrap();
    let long = "word ".repeat(40);
    let o = longwave(&["generate", "--model", m, "--ctx", "16", "--prompt", &long], &[]);
    fails_with(&o, "context is full");
    let o = longwave(&["generate", "--model", m, "--ctx", "100000000", "--prompt", "hi"], &[]);
    fails_with(&o, "longer than the model's");
    // A 20 MiB budget holds neither the 98 MB of weights nor the cache; the message says how
    // much the model needs.
    let o = longwave(&["generate", "--model", m, "--prompt", "hi"], &[("LONGWAVE_GPU_MEMORY", "20M")]);
    fails_with(&o, "out of GPU memory");
    fails_with(&o, "budget");
}

#[test]
fn generate_prints_only_text_on_stdout_and_ppl_prints_its_contract() {
    let m = model();
    let m = m.to_str().unwrap();
    let o = longwave(
        &["generate", "--model", m, "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "12"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(out.contains("Paris"), "stdout: {out:?}");
    assert!(stderr(&o).contains("tok/s"), "stats on stderr");
    let text = tmp("ppl.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. The dog sleeps.").unwrap();
    let o = longwave(&["ppl", "--model", m, "--file", text.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    let ppl: f64 = out.lines().find_map(|l| l.strip_prefix("perplexity: ")).unwrap().parse().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 1000.0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("tokens: ")), "{out}");
}

#[test]
fn bench_decode_json_has_its_fields_and_a_per_kernel_breakdown() {
    let m = model();
    let args = ["bench", "decode", "--model", m.to_str().unwrap(), "--contexts", "16", "--decode-tokens", "3"];
    let o = longwave(&[&args[..], &["--profile-steps", "2", "--breakdown", "--marginal", "--json"]].concat(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one object per context: {out}");
    let row: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(row["context"], 16);
    for key in ["prefill_tok_s", "decode_tok_s", "host_ms_per_token"] {
        assert!(row[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {row}");
    }
    assert!(row["model"].as_str().is_some_and(|s| s.ends_with(".gguf")) && row["adapter"].is_string(), "{row}");
    // SmolLM2-135M: 30 layers, each with one qkv product and one attend; one LM head and one
    // sampler per step. Every share took some time.
    let kernels = row["breakdown"].as_array().expect("breakdown");
    let count = |k: &str| kernels.iter().find(|s| s["kernel"] == k).map(|s| s["dispatches"].as_u64().unwrap());
    assert_eq!(
        (count("qkv"), count("attend"), count("lm_head"), count("sample")),
        (Some(30), Some(30), Some(1), Some(1))
    );
    assert!(kernels.iter().all(|s| s["us"].as_f64().is_some_and(|us| us > 0.0)), "{row}");
    // The marginal view: one entry per kind of the step, in step order (embedding first, the
    // sampler last), with the same dispatch counts. On lavapipe its times are too noisy to
    // check more than that each is a number.
    let marginal = row["marginal"].as_array().expect("marginal");
    assert_eq!(marginal.len(), kernels.len(), "{row}");
    for s in kernels {
        let m = marginal.iter().find(|m| m["kernel"] == s["kernel"]).expect("kind in marginal");
        assert_eq!(m["dispatches"], s["dispatches"], "{row}");
        assert!(m["us"].as_f64().is_some_and(f64::is_finite), "{row}");
    }
    assert_eq!((&marginal[0]["kernel"], &marginal[marginal.len() - 1]["kernel"]), (&"embed".into(), &"sample".into()));
}
