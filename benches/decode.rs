//! `cargo bench --bench decode`: prefill and decode rates of the default model (fetch it with
//! models/fetch_default.sh; LONGWAVE_BENCH_MODEL names another) at 512 tokens and the
//! model's limit — the same measurement as `longwave bench decode`.

use longwave::bench::decode::{run, DecodeBenchOptions};

fn main() -> Result<(), longwave::Error> {
    let path = std::env::var_os("LONGWAVE_BENCH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(longwave::model::default_model_path);
    if !path.exists() {
        eprintln!("no model at {}: run models/fetch_default.sh or set LONGWAVE_BENCH_MODEL", path.display());
        return Ok(());
    }
    let model = longwave::Model::load(&path, &longwave::GpuOptions::default())?;
    let cpu = model.gpu.info.device_type == wgpu::DeviceType::Cpu;
    // A CPU adapter (lavapipe) takes minutes per thousand tokens: one short context there.
    let contexts = if cpu { vec![128] } else { DecodeBenchOptions::default_contexts(&model, 8192, 128, 32) };
    let opts = DecodeBenchOptions {
        contexts,
        decode_tokens: if cpu { 16 } else { 128 },
        profile_steps: 8,
        breakdown: false,
        marginal: false,
    };
    run(&model, &opts, &mut |r| println!("{}", serde_json::to_string(r).unwrap_or_default()))?;
    Ok(())
}
