//! `cargo bench --bench kernels`: every kernel at real model shapes on the default adapter
//! (the same harness as `longwave bench kernels`). LONGWAVE_BENCH_JSON=1 prints JSON lines.

fn main() -> Result<(), longwave::Error> {
    let gpu = longwave::Gpu::new(&longwave::GpuOptions::default())?;
    let opts = longwave::bench::kernels::KernelBenchOptions::for_adapter(&gpu);
    let json = std::env::var_os("LONGWAVE_BENCH_JSON").is_some();
    if !json {
        println!("{}", longwave::bench::Row::table_header());
    }
    let peaks = longwave::bench::kernels::run(&gpu, &opts, &mut |r| r.print(json))?;
    eprintln!("copy {:.1} GB/s, fma {:.1} GFLOP/s on {}", peaks.copy_gb_s, peaks.fma_gflop_s, gpu.describe());
    Ok(())
}
