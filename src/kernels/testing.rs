//! Helpers for kernel parity tests: one device per shader variant the adapter supports, random
//! inputs, and comparison against f64 CPU references.

use crate::gpu::{Gpu, GpuOptions};
use std::sync::{Arc, OnceLock};

/// One device per (f16, subgroups) combination the adapter offers, and one without matrix
/// units where it has them, so every test exercises both the fast paths and their fallbacks.
pub fn variants() -> &'static [Arc<Gpu>] {
    static V: OnceLock<Vec<Arc<Gpu>>> = OnceLock::new();
    V.get_or_init(|| {
        let full = Gpu::new(&GpuOptions::default()).expect("a GPU adapter (lavapipe on CI)");
        let mut out = vec![];
        for no_f16 in [false, true] {
            for no_subgroups in [false, true] {
                if (!no_f16 && !full.caps.f16) || (!no_subgroups && !full.caps.subgroups) {
                    continue;
                }
                let opts = GpuOptions { no_f16, no_subgroups, ..Default::default() };
                out.push(Gpu::new(&opts).expect("device"));
            }
        }
        // With matrix units the first device uses them; this one runs the same with the f32
        // fallbacks.
        if full.caps.coop_matrix {
            out.push(Gpu::new(&GpuOptions { no_coop_matrix: true, ..Default::default() }).expect("device"));
        }
        // Tests that need all variants exercised would silently shrink otherwise.
        eprintln!(
            "kernel variants on {}: (f16, subgroups, matrix units) {:?}",
            full.describe(),
            out.iter().map(|g| (g.caps.f16, g.caps.subgroups, g.caps.coop_matrix)).collect::<Vec<_>>()
        );
        out
    })
}

/// A device whose binding limit is `max_binding` bytes, to exercise tensor splitting.
pub fn small_binding_gpu(max_binding: u64) -> Arc<Gpu> {
    Gpu::new(&GpuOptions { max_binding: Some(max_binding), ..Default::default() }).unwrap()
}

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.next_u32() as f32 / 2147483648.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Largest |a - b| / (atol + rtol * |b|); <= 1 means within tolerance.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = (g as f64 - w).abs() / (atol + rtol * w.abs());
        if r.is_nan() || r > worst.0 {
            worst = (r, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 1.0, "{what}: element {i}: got {} want {} (atol {atol}, rtol {rtol})", got[i], want[i]);
}
