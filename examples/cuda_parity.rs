//! The wgpu half of the CUDA parity check (`tests/cuda/parity.py` drives it).
//!
//! `cuda_parity kernels OUT.safetensors [--shapes smollm2-135m,llama3-8b]` runs every kernel on
//! random inputs at real model sizes and writes inputs and outputs; each case's metadata entry
//! (a JSON object keyed by the case name) says what the operation is, so PyTorch can redo it.
//!
//! `cuda_parity logits --model PATH --ids 1,2,3 --at 4,8 OUT.safetensors` writes the logits of
//! the last position after each prefix length in `--at` and the per-token NLL over all ids.

use half::f16;
use longwave::bench::kernels::{shape_by_name, BenchShape};
use longwave::decoder::Plan;
use longwave::gpu::{Gpu, GpuBuffer};
use longwave::kernels::attention::{rope_table, AttendKind, AttentionKernels, AttnShape, DecodeAttention};
use longwave::kernels::embedding::Embedding;
use longwave::kernels::matmul::{norm_output_floats, q8_norm_words, Epilogue, GpuMatrix, MatMul, MatVec, MergeInput};
use longwave::kernels::quantize::{q8_words, Q8Input, QuantizeQ8};
use longwave::kernels::rms_norm::RmsNorm;
use longwave::kernels::sampling::{SampleParams, SamplingKernels, SamplingParams};
use longwave::kernels::{run_pass, Bound};
use longwave::model::quant::{quantize, DType};
use longwave::{GenerateOptions, GpuOptions, Model, Result, Session, SessionOptions};
use safetensors::Dtype;
use serde_json::json;
use std::collections::HashMap;

/// Tensors and per-case metadata of the output file.
#[derive(Default)]
struct Out {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl Out {
    fn f32(&mut self, name: String, shape: &[usize], v: &[f32]) {
        self.tensors.push((name, Dtype::F32, shape.to_vec(), bytemuck::cast_slice(v).to_vec()));
    }
    fn raw(&mut self, name: String, dtype: Dtype, shape: &[usize], b: Vec<u8>) {
        self.tensors.push((name, dtype, shape.to_vec(), b));
    }
    fn case(&mut self, name: &str, meta: serde_json::Value) {
        self.meta.insert(name.to_string(), meta.to_string());
    }
    fn write(self, path: &str) -> Result<()> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("shape")))
            .collect();
        safetensors::serialize_to_file(views, Some(self.meta), std::path::Path::new(path))
            .map_err(|e| longwave::Error::Other(format!("writing {path}: {e}")))
    }
}

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

fn run(gpu: &Gpu, list: &[(Bound, [u32; 3])]) -> Result<()> {
    run_pass(gpu, |p| list.iter().for_each(|(b, g)| b.record(p, *g)))
}

fn products(gpu: &Gpu, sh: &BenchShape, out: &mut Out, rng: &mut Rng) -> Result<()> {
    let (h, f) = (sh.hidden, sh.intermediate);
    let rows = (sh.n_heads + 2 * sh.n_kv) * sh.head_dim;
    let t = 64;
    for dtype in DType::ALL {
        let w = quantize(dtype, &rng.vec(rows * h, 0.1));
        let m = GpuMatrix::upload(gpu, "w", dtype, rows, h, &w)?;
        // Stored once, named by every case that uses it.
        let w_name = format!("{}/weights/{}", sh.name, dtype.name());
        out.raw(w_name.clone(), Dtype::U8, &[w.len()], w);
        let x = rng.vec(t * h, 1.0);
        let xb = gpu.upload("x", &x)?;
        let y0 = rng.vec(t * rows, 1.0);
        // Decode product, plain and accumulating.
        for (epi, name) in [(Epilogue::Store, "store"), (Epilogue::Add, "add")] {
            let yb = gpu.upload("y", &y0[..rows])?;
            run(gpu, &MatVec::new(gpu, dtype, epi)?.bind(gpu, &m, &xb, 0, &yb, 1)?)?;
            let case = format!("{}/matvec_{name}/{}", sh.name, dtype.name());
            out.f32(format!("{case}/x"), &[1, h], &x[..h]);
            out.f32(format!("{case}/y0"), &[1, rows], &y0[..rows]);
            out.f32(format!("{case}/y"), &[1, rows], &gpu.read(&yb, 0, rows)?);
            let meta =
                json!({"op": "matmul", "w": w_name, "dtype": dtype.name(), "rows": rows, "cols": h, "epilogue": name});
            out.case(&case, meta);
        }
        // The chain that replaces the norm dispatches of f32-vector decode: Wo (h x h) adds to x
        // and writes x * g with sums of squares of x; a product reading that scales by 1 / rms
        // itself (Q/K/V's kernel, here the matrix above).
        {
            let wo = quantize(dtype, &rng.vec(h * h, 0.1));
            let wm = GpuMatrix::upload(gpu, "wo", dtype, h, h, &wo)?;
            let g = rng.vec(h, 1.0);
            let (yb, gb) = (gpu.upload("y", &y0[..h])?, gpu.upload("g", &g)?);
            let k = MatVec::with_norm_output(gpu, dtype)?;
            let parts = k.norm_output_parts(h).unwrap_or(0);
            let nf = norm_output_floats(h, parts);
            let xn = gpu.storage("xn_norm", nf as u64 * 4)?;
            run(gpu, &k.bind_add_norm(gpu, &wm, &xb, &yb, &gb, &xn, 1)?)?;
            let norm_case = format!("{}/matvec_norm_out/{}", sh.name, dtype.name());
            out.raw(format!("{norm_case}/w"), Dtype::U8, &[wo.len()], wo);
            out.f32(format!("{norm_case}/x"), &[1, h], &x[..h]);
            out.f32(format!("{norm_case}/y0"), &[1, h], &y0[..h]);
            out.f32(format!("{norm_case}/g"), &[h], &g);
            out.f32(format!("{norm_case}/y"), &[1, h], &gpu.read(&yb, 0, h)?);
            out.f32(format!("{norm_case}/out"), &[nf], &gpu.read(&xn, 0, nf)?);
            out.case(&norm_case, json!({"op": "matvec_norm_out", "dtype": dtype.name(), "cols": h, "parts": parts}));
            let yq = gpu.storage("y", rows as u64 * 4)?;
            let k = MatVec::new(gpu, dtype, Epilogue::Store)?.with_norm_scale(1e-5)?;
            run(gpu, &k.bind(gpu, &m, &xn, 0, &yq, 1)?)?;
            let case = format!("{}/matvec_scaled/{}", sh.name, dtype.name());
            out.f32(format!("{case}/y"), &[1, rows], &gpu.read(&yq, 0, rows)?);
            out.case(
                &case,
                json!({"op": "matvec_scaled", "w": w_name, "norm": norm_case, "dtype": dtype.name(),
                "rows": rows, "cols": h, "eps": 1e-5}),
            );
        }
        // Decode products of 8-bit vectors: the vector RMS-normalised and quantized on the GPU
        // (quantize_q8), then the integer-dot product, plain and accumulating.
        if MatVec::takes_q8_input(dtype) {
            let xq = q8_vector(gpu, &xb, h, out, &format!("{}/q8/{}", sh.name, dtype.name()), rng)?;
            for (epi, name) in [(Epilogue::Store, "store"), (Epilogue::Add, "add")] {
                let yb = gpu.upload("y", &y0[..rows])?;
                run(gpu, &MatVec::with_q8_input(gpu, dtype, epi)?.bind(gpu, &m, &xq, 0, &yb, 1)?)?;
                let case = format!("{}/matvec_q8_{name}/{}", sh.name, dtype.name());
                out.f32(format!("{case}/y0"), &[1, rows], &y0[..rows]);
                out.f32(format!("{case}/y"), &[1, rows], &gpu.read(&yb, 0, rows)?);
                let meta = json!({"op": "matvec_q8", "w": w_name, "q8": format!("{}/q8/{}", sh.name, dtype.name()),
                    "dtype": dtype.name(), "rows": rows, "cols": h, "epilogue": name});
                out.case(&case, meta);
            }
            // The chain that replaces the norm dispatches of 8-bit decode: Wo (h x h) adds to x and
            // writes x * g as 8-bit blocks with their sums of squares; a product reading them
            // scales by 1 / rms itself (Q/K/V's kernel, here the matrix above); gate/up writes its
            // SwiGLU output as 8-bit blocks, from the plain 8-bit vector and from this one.
            {
                let q8_name = format!("{}/q8/{}", sh.name, dtype.name());
                let wo = quantize(dtype, &rng.vec(h * h, 0.1));
                let wm = GpuMatrix::upload(gpu, "wo", dtype, h, h, &wo)?;
                let g = rng.vec(h, 1.0);
                let (yb, gb) = (gpu.upload("y", &y0[..h])?, gpu.upload("g", &g)?);
                let nw = q8_norm_words(h);
                let xn = gpu.storage("xq_norm", nw as u64 * 4)?;
                let k = MatVec::with_q8_norm_output(gpu, dtype)?;
                run(gpu, &k.bind_add_norm_q8(gpu, &wm, &xq, &yb, &gb, &xn, 1)?)?;
                let norm_case = format!("{}/matvec_q8_norm/{}", sh.name, dtype.name());
                out.raw(format!("{norm_case}/w"), Dtype::U8, &[wo.len()], wo);
                out.f32(format!("{norm_case}/y0"), &[1, h], &y0[..h]);
                out.f32(format!("{norm_case}/g"), &[h], &g);
                out.f32(format!("{norm_case}/y"), &[1, h], &gpu.read(&yb, 0, h)?);
                let words: Vec<u32> = gpu.read(&xn, 0, nw)?;
                out.raw(format!("{norm_case}/words"), Dtype::U8, &[nw * 4], bytemuck::cast_slice(&words).to_vec());
                out.case(&norm_case, json!({"op": "matvec_q8_norm", "q8": q8_name, "dtype": dtype.name(), "cols": h}));
                let yq = gpu.storage("y", rows as u64 * 4)?;
                let k = MatVec::with_q8_input(gpu, dtype, Epilogue::Store)?.with_norm_scale(1e-5)?;
                run(gpu, &k.bind(gpu, &m, &xn, 0, &yq, 1)?)?;
                let case = format!("{}/matvec_q8_scaled/{}", sh.name, dtype.name());
                out.f32(format!("{case}/y"), &[1, rows], &gpu.read(&yq, 0, rows)?);
                out.case(
                    &case,
                    json!({"op": "matvec_q8_scaled", "w": w_name, "norm": norm_case, "dtype": dtype.name(),
                    "rows": rows, "cols": h, "eps": 1e-5}),
                );
                let gw = quantize(dtype, &rng.vec(f * h, 0.1));
                let uw = quantize(dtype, &rng.vec(f * h, 0.1));
                let (gm, um) =
                    (GpuMatrix::upload(gpu, "g", dtype, f, h, &gw)?, GpuMatrix::upload(gpu, "u", dtype, f, h, &uw)?);
                let gu_name = format!("{}/swiglu_q8/{}", sh.name, dtype.name());
                out.raw(format!("{gu_name}/g"), Dtype::U8, &[gw.len()], gw);
                out.raw(format!("{gu_name}/u"), Dtype::U8, &[uw.len()], uw);
                for (scaled, x8) in [(false, &xq), (true, &xn)] {
                    let mut k = MatVec::with_q8_output(gpu, dtype)?;
                    if scaled {
                        k = k.with_norm_scale(1e-5)?;
                    }
                    let fw = q8_words(f);
                    let ob = gpu.storage("out", fw as u64 * 4)?;
                    run(gpu, &k.bind_swiglu(gpu, &gm, &um, x8, 0, &ob, 1)?)?;
                    let case = format!("{gu_name}/{}", if scaled { "scaled" } else { "plain" });
                    let words: Vec<u32> = gpu.read(&ob, 0, fw)?;
                    out.raw(format!("{case}/words"), Dtype::U8, &[fw * 4], bytemuck::cast_slice(&words).to_vec());
                    let input = if scaled { &norm_case } else { &q8_name };
                    out.case(
                        &case,
                        json!({"op": "swiglu_q8", "w": gu_name, "input": input, "scaled": scaled,
                        "dtype": dtype.name(), "rows": f, "cols": h, "eps": 1e-5}),
                    );
                    // Down (h x f) with the norm output, from the plain SwiGLU blocks: the
                    // layout decode uses for it (at the 8B shape, the staged vector).
                    if !scaled {
                        let wd = quantize(dtype, &rng.vec(h * f, 0.1));
                        let dm = GpuMatrix::upload(gpu, "down", dtype, h, f, &wd)?;
                        let (yb, xn) = (gpu.upload("y", &y0[..h])?, gpu.storage("xq_norm", nw as u64 * 4)?);
                        let k = MatVec::with_q8_norm_output(gpu, dtype)?;
                        run(gpu, &k.bind_add_norm_q8(gpu, &dm, &ob, &yb, &gb, &xn, 1)?)?;
                        let down_case = format!("{}/matvec_q8_norm_down/{}", sh.name, dtype.name());
                        out.raw(format!("{down_case}/w"), Dtype::U8, &[wd.len()], wd);
                        out.f32(format!("{down_case}/y0"), &[1, h], &y0[..h]);
                        out.f32(format!("{down_case}/g"), &[h], &g);
                        out.f32(format!("{down_case}/y"), &[1, h], &gpu.read(&yb, 0, h)?);
                        let words: Vec<u32> = gpu.read(&xn, 0, nw)?;
                        out.raw(
                            format!("{down_case}/words"),
                            Dtype::U8,
                            &[nw * 4],
                            bytemuck::cast_slice(&words).to_vec(),
                        );
                        out.case(
                            &down_case,
                            json!({"op": "matvec_q8_norm", "q8": case, "dtype": dtype.name(), "rows": h, "cols": f}),
                        );
                    }
                }
            }
        }
        // Decode's Wo product with the attention merge in front (where the model's attention
        // output fits it): random partials of 16 splits, 5 of them in use at position 300,
        // every fourth one empty (l = 0).
        let input = MergeInput { n_heads: sh.n_heads as u32, head_dim: sh.head_dim as u32, splits: 16 };
        if MatVec::merge_fits(input) && sh.n_heads * sh.head_dim == h {
            let (nh, hd, splits, pos) = (sh.n_heads, sh.head_dim, 16usize, 300u32);
            let used = AttentionKernels::used_splits(splits as u32, pos + 1) as usize;
            let mut part = rng.vec(nh * splits * (hd + 2), 2.0);
            for hs in 0..nh * splits {
                let at = hs * (hd + 2);
                part[at + hd] *= 3.0;
                part[at + hd + 1] = if hs % 4 == 3 { 0.0 } else { 1.0 + part[at + hd + 1].abs() };
            }
            let wo = quantize(dtype, &rng.vec(h * h, 0.1));
            let wm = GpuMatrix::upload(gpu, "wo", dtype, h, h, &wo)?;
            let (pb, sb) = (gpu.upload("part", &part)?, gpu.upload("state", &[pos, 1, 0, 0])?);
            let yb = gpu.upload("y", &y0[..h])?;
            run(gpu, &MatVec::with_merge(gpu, dtype, input)?.bind_merge_add(gpu, &wm, &pb, &sb, &yb)?)?;
            let case = format!("{}/matvec_merge_add/{}", sh.name, dtype.name());
            out.raw(format!("{case}/w"), Dtype::U8, &[wo.len()], wo);
            out.f32(format!("{case}/part"), &[nh, splits, hd + 2], &part);
            out.f32(format!("{case}/y0"), &[1, h], &y0[..h]);
            out.f32(format!("{case}/y"), &[1, h], &gpu.read(&yb, 0, h)?);
            let meta = json!({"op": "matvec_merge", "dtype": dtype.name(), "rows": h, "cols": h, "used": used});
            out.case(&case, meta);
        }
        // Prefill product: the kernel the decoder uses (on matrix units where the adapter has
        // them) and the f32 one.
        let mut prefill = vec![(MatMul::new(gpu, dtype, Epilogue::Store)?, "matmul_store")];
        if prefill[0].0.uses_matrix_units() {
            prefill.push((MatMul::without_matrix_units(gpu, dtype, Epilogue::Store)?, "matmul_store_f32"));
        }
        for (mm, name) in prefill {
            let yb = gpu.storage("y", (t * rows) as u64 * 4)?;
            run(gpu, &mm.bind(gpu, &m, &xb, 0, &yb, t)?)?;
            let case = format!("{}/{name}/{}", sh.name, dtype.name());
            out.f32(format!("{case}/x"), &[t, h], &x);
            out.f32(format!("{case}/y"), &[t, rows], &gpu.read(&yb, 0, t * rows)?);
            let meta = json!({"op": "matmul", "w": w_name, "dtype": dtype.name(), "rows": rows, "cols": h,
                "epilogue": "store", "matrix_units": mm.uses_matrix_units()});
            out.case(&case, meta);
        }
        // Feed-forward gate/up with SwiGLU, decode and prefill, on the formats models ship in.
        if matches!(dtype, DType::F16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1) {
            let g = quantize(dtype, &rng.vec(f * h, 0.1));
            let u = quantize(dtype, &rng.vec(f * h, 0.1));
            let gm = GpuMatrix::upload(gpu, "g", dtype, f, h, &g)?;
            let um = GpuMatrix::upload(gpu, "u", dtype, f, h, &u)?;
            let yb = gpu.storage("y", (t * f) as u64 * 4)?;
            let yv = gpu.storage("y", f as u64 * 4)?;
            run(gpu, &MatVec::new(gpu, dtype, Epilogue::SwiGlu)?.bind_swiglu(gpu, &gm, &um, &xb, 0, &yv, 1)?)?;
            let mm = MatMul::new(gpu, dtype, Epilogue::SwiGlu)?;
            run(gpu, &mm.bind_swiglu(gpu, &gm, &um, &xb, 0, &yb, t)?)?;
            let case = format!("{}/swiglu/{}", sh.name, dtype.name());
            out.raw(format!("{case}/g"), Dtype::U8, &[g.len()], g);
            out.raw(format!("{case}/u"), Dtype::U8, &[u.len()], u);
            out.f32(format!("{case}/x"), &[t, h], &x);
            out.f32(format!("{case}/y_decode"), &[1, f], &gpu.read(&yv, 0, f)?);
            out.f32(format!("{case}/y"), &[t, f], &gpu.read(&yb, 0, t * f)?);
            let meta = json!({"op": "swiglu", "dtype": dtype.name(), "rows": f, "cols": h,
                "matrix_units": mm.uses_matrix_units()});
            out.case(&case, meta);
        }
        // Embedding rows of the vocabulary-sized table.
        if matches!(dtype, DType::F16 | DType::Q4_1) || sh.vocab * h <= 64 << 20 {
            let e = quantize(dtype, &rng.vec(sh.vocab * h, 0.1));
            let em = GpuMatrix::upload(gpu, "e", dtype, sh.vocab, h, &e)?;
            let ids: Vec<u32> = (0..t as u32).map(|i| i.wrapping_mul(2654435761) % sh.vocab as u32).collect();
            let tb = gpu.upload("ids", &ids)?;
            let ob = gpu.storage("rows", (t * h) as u64 * 4)?;
            run(gpu, &Embedding::new(gpu, dtype)?.bind(gpu, &em, &tb, 0, &ob, t)?)?;
            let case = format!("{}/embedding/{}", sh.name, dtype.name());
            out.raw(format!("{case}/e"), Dtype::U8, &[e.len()], e);
            out.raw(format!("{case}/ids"), Dtype::I32, &[t], bytemuck::cast_slice(&ids).to_vec());
            out.f32(format!("{case}/y"), &[t, h], &gpu.read(&ob, 0, t * h)?);
            out.case(&case, json!({"op": "embedding", "dtype": dtype.name(), "rows": sh.vocab, "cols": h}));
            // The gather of decode steps with 8-bit vectors: the rows again, and each as the
            // first layer's norm input (x * g in 8-bit blocks, sums of squares of x).
            let g = rng.vec(h, 1.0);
            let gb = gpu.upload("g", &g)?;
            let nw = q8_norm_words(h);
            let xq = gpu.storage("xq_norm", (t * nw) as u64 * 4)?;
            let k = Embedding::with_q8_norm(gpu, dtype)?;
            run(gpu, &k.bind_q8_norm(gpu, &em, &tb, 0, &ob, &gb, &xq, t)?)?;
            let qcase = format!("{}/embedding_q8_norm/{}", sh.name, dtype.name());
            out.f32(format!("{qcase}/g"), &[h], &g);
            out.f32(format!("{qcase}/y"), &[t, h], &gpu.read(&ob, 0, t * h)?);
            let words: Vec<u32> = gpu.read(&xq, 0, t * nw)?;
            out.raw(format!("{qcase}/words"), Dtype::U8, &[t * nw * 4], bytemuck::cast_slice(&words).to_vec());
            out.case(
                &qcase,
                json!({"op": "embedding_q8_norm", "table": case, "dtype": dtype.name(),
                "rows": sh.vocab, "cols": h, "tokens": t, "words": nw}),
            );
        }
    }
    Ok(())
}

/// Quantizes the first row of x (RMS-normalised with a random weight) to 8 bits on the GPU and
/// stores x, the weight and the words under `name` (op "quantize_q8"); returns the words.
fn q8_vector(gpu: &Gpu, xb: &GpuBuffer, h: usize, out: &mut Out, name: &str, rng: &mut Rng) -> Result<GpuBuffer> {
    let g = rng.vec(h, 1.0);
    let gb = gpu.upload("g", &g)?;
    let xq = gpu.storage("xq", q8_words(h) as u64 * 4)?;
    let (b, groups) = QuantizeQ8::new(gpu, Q8Input::Norm { eps: 1e-5 })?.bind(gpu, xb, Some(&gb), None, &xq, 1, h)?;
    run(gpu, &[(b, groups)])?;
    let words: Vec<u32> = gpu.read(&xq, 0, q8_words(h))?;
    out.f32(format!("{name}/x"), &[1, h], &gpu.read::<f32>(xb, 0, h)?);
    out.f32(format!("{name}/g"), &[h], &g);
    out.raw(format!("{name}/words"), Dtype::U8, &[words.len() * 4], bytemuck::cast_slice(&words).to_vec());
    out.case(name, json!({"op": "quantize_q8", "cols": h, "eps": 1e-5}));
    Ok(xq)
}

fn norm_and_sampling(gpu: &Gpu, sh: &BenchShape, out: &mut Out, rng: &mut Rng) -> Result<()> {
    let (h, t) = (sh.hidden, 64);
    let x = rng.vec(t * h, 2.0);
    let w = rng.vec(h, 1.0);
    let (xb, wb, yb) = (gpu.upload("x", &x)?, gpu.upload("w", &w)?, gpu.storage("y", (t * h) as u64 * 4)?);
    let b = RmsNorm::new(gpu)?.bind(gpu, &xb, &wb, &yb, t as u32, h as u32, 1e-5)?;
    run(gpu, &[(b, longwave::kernels::rms_norm::groups(t as u32))])?;
    let case = format!("{}/rms_norm", sh.name);
    out.f32(format!("{case}/x"), &[t, h], &x);
    out.f32(format!("{case}/w"), &[h], &w);
    out.f32(format!("{case}/y"), &[t, h], &gpu.read(&yb, 0, t * h)?);
    out.case(&case, json!({"op": "rms_norm", "eps": 1e-5}));

    let v = sh.vocab;
    let k = SamplingKernels::new(gpu)?;
    for pen in [1.0f32, 1.3] {
        let logits = rng.vec(v, 8.0);
        let seen: Vec<u32> = (0..v.div_ceil(32)).map(|i| (i as u32).wrapping_mul(2654435761)).collect();
        let (lb, sb) = (gpu.upload("logits", &logits)?, gpu.upload("seen", &seen)?);
        let (state, tokens) = (gpu.storage("state", 16)?, gpu.storage("tokens", 16)?);
        let b = k.bind_sample(gpu, v as u32, &lb, &sb, &state, &tokens)?;
        let params = SamplingParams { temperature: 0.0, repetition_penalty: pen, ..Default::default() };
        b.0.set_params(&gpu.queue, &SampleParams::new(v as u32, &params));
        run(gpu, std::slice::from_ref(&b))?;
        let case = format!("{}/sample_greedy/penalty{pen}", sh.name);
        out.f32(format!("{case}/logits"), &[v], &logits);
        out.raw(format!("{case}/seen"), Dtype::I32, &[seen.len()], bytemuck::cast_slice(&seen).to_vec());
        let tok: Vec<u32> = gpu.read(&tokens, 0, 1)?;
        out.raw(format!("{case}/token"), Dtype::I32, &[1], bytemuck::cast_slice(&tok).to_vec());
        out.case(&case, json!({"op": "sample_greedy", "penalty": pen}));
    }
    Ok(())
}

/// RoPE, cache append and attention (split-K decode and causal prefill) over a cache holding
/// random keys and values before the step.
fn attention(gpu: &Gpu, sh: &BenchShape, out: &mut Out, rng: &mut Rng) -> Result<()> {
    let k = AttentionKernels::new(gpu)?;
    let (nh, nkv, hd) = (sh.n_heads, sh.n_kv, sh.head_dim);
    let max_ctx = sh.contexts[0] as usize;
    let a = AttnShape { n_heads: nh as u32, n_kv: nkv as u32, head_dim: hd as u32, max_ctx: max_ctx as u32 };
    let theta = if sh.name.starts_with("llama3") { 500000f32 } else { 100000.0 };
    let inv_freq: Vec<f32> = (0..hd / 2).map(|i| theta.powf(-2.0 * i as f32 / hd as f32)).collect();
    let rope = gpu.upload("rope", &rope_table(&inv_freq, max_ctx))?;
    // Every attention kernel (per query head; per head group, "_group"; head groups over short
    // splits, "_wide", where the head size suits it) in each mode: decode (then the merge
    // dispatch), decode merging its own splits (all but the wide kernel), prefill.
    let modes = [("decode", 1usize), ("merged", 1), ("prefill", 64)];
    let mut kinds = vec![(AttendKind::PerHead, ""), (AttendKind::Grouped, "_group")];
    if AttentionKernels::wide_supports(a) {
        kinds.push((AttendKind::Wide, "_wide"));
    }
    for ((mode, n), &(kind, suffix)) in modes.into_iter().flat_map(|m| kinds.iter().map(move |k| (m, k))) {
        if mode == "merged" && kind == AttendKind::Wide {
            continue;
        }
        let pos = max_ctx - n - 3;
        let splits = if n == 1 { Plan::decode_splits(gpu, max_ctx as u32) } else { 1 };
        let cache: Vec<f16> = rng.vec(2 * nkv * max_ctx * hd, 1.0).into_iter().map(f16::from_f32).collect();
        let (kc, vc) = cache.split_at(nkv * max_ctx * hd);
        let (kb, vb) = (gpu.upload("k", kc)?, gpu.upload("v", vc)?);
        let qkv = rng.vec(n * (nh + 2 * nkv) * hd, 1.0);
        let qkvb = gpu.upload("qkv", &qkv)?;
        let q = gpu.storage("q", (n * nh * hd) as u64 * 4)?;
        let part = gpu.storage("part", a.partial_floats(n as u32, splits) * 4)?;
        let o = gpu.storage("o", (n * nh * hd) as u64 * 4)?;
        let state: GpuBuffer = gpu.upload("state", &[pos as u32, n as u32, 0, 0])?;
        // Decode runs the kernels that rotate and append the new key themselves; prefill
        // rope_kv first.
        let merged = mode == "merged";
        let arrivals = gpu.storage("arrivals", a.arrival_words() * 4)?;
        let d = DecodeAttention {
            sh: a,
            splits,
            kind,
            state: &state,
            rope: &rope,
            qkv: &qkvb,
            k_cache: &kb,
            v_cache: &vb,
            part: &part,
        };
        let attend = if merged {
            vec![(
                k.bind_attend_merged(gpu, &d, &arrivals, &o, false)?,
                AttentionKernels::attend_groups(a, splits, 1, kind),
            )]
        } else if n == 1 {
            vec![(k.bind_attend_new_kv(gpu, &d)?, AttentionKernels::attend_groups(a, splits, 1, kind))]
        } else {
            vec![
                (
                    k.bind_rope_kv(gpu, a, &state, &rope, &qkvb, &q, &kb, &vb),
                    AttentionKernels::rope_groups(a, n as u32),
                ),
                (
                    k.bind_attend(gpu, a, splits, &state, &q, &kb, &vb, &part, kind)?,
                    AttentionKernels::attend_groups(a, splits, n as u32, kind),
                ),
            ]
        };
        let merge = (k.bind_merge(gpu, a, splits, &state, &part, &o), AttentionKernels::merge_groups(a, n as u32));
        let list: Vec<_> = attend.into_iter().chain((!merged).then_some(merge)).collect();
        run(gpu, &list)?;
        let case = format!("{}/attention_{mode}{suffix}", sh.name);
        let f16s = |v: &[f16]| bytemuck::cast_slice::<f16, u8>(v).to_vec();
        out.raw(format!("{case}/k_cache_before"), Dtype::F16, &[nkv, max_ctx, hd], f16s(kc));
        out.raw(format!("{case}/v_cache_before"), Dtype::F16, &[nkv, max_ctx, hd], f16s(vc));
        out.f32(format!("{case}/qkv"), &[n, nh + 2 * nkv, hd], &qkv);
        out.f32(format!("{case}/inv_freq"), &[hd / 2], &inv_freq);
        let k_after: Vec<f16> = gpu.read(&kb, 0, nkv * max_ctx * hd)?;
        out.raw(format!("{case}/k_cache_after"), Dtype::F16, &[nkv, max_ctx, hd], f16s(&k_after));
        out.f32(format!("{case}/out"), &[n, nh, hd], &gpu.read(&o, 0, n * nh * hd)?);
        out.case(&case, json!({"op": "attention", "pos": pos, "n": n, "splits": splits}));
    }
    Ok(())
}

fn kernels(args: &[String]) -> Result<()> {
    let path = args.first().ok_or_else(|| longwave::Error::InvalidArgument("kernels OUT.safetensors".into()))?;
    let shapes = match args.iter().position(|a| a == "--shapes") {
        Some(i) => args.get(i + 1).map(|s| s.split(',').map(shape_by_name).collect()).unwrap_or(Ok(vec![]))?,
        None => longwave::bench::kernels::SHAPES.to_vec(),
    };
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("kernels on {} ({:?})", gpu.describe(), gpu.flags());
    let mut out = Out::default();
    let mut rng = Rng(0x2545F4914F6CDD1D);
    for sh in &shapes {
        products(&gpu, sh, &mut out, &mut rng)?;
        norm_and_sampling(&gpu, sh, &mut out, &mut rng)?;
        attention(&gpu, sh, &mut out, &mut rng)?;
    }
    out.meta.insert("adapter".into(), gpu.describe());
    out.write(path)
}

fn list(args: &[String], flag: &str) -> Result<Vec<usize>> {
    let i = args.iter().position(|a| a == flag).ok_or_else(|| longwave::Error::InvalidArgument(flag.to_string()))?;
    let v = args.get(i + 1).ok_or_else(|| longwave::Error::InvalidArgument(format!("{flag} needs a value")))?;
    v.split(',').map(|s| s.parse().map_err(|_| longwave::Error::InvalidArgument(format!("{flag}: {s}")))).collect()
}

fn logits(args: &[String]) -> Result<()> {
    let model_at = args.iter().position(|a| a == "--model").and_then(|i| args.get(i + 1));
    let model_path = model_at.ok_or_else(|| longwave::Error::InvalidArgument("--model PATH".into()))?;
    let ids: Vec<u32> = list(args, "--ids")?.into_iter().map(|v| v as u32).collect();
    let at = list(args, "--at")?;
    let path = args.last().ok_or_else(|| longwave::Error::InvalidArgument("OUT.safetensors".into()))?;
    // --no-q8: decode products of f32 vectors (Caps::q8_activations off).
    let opts =
        GpuOptions { q8_activations: args.iter().any(|a| a == "--no-q8").then_some(false), ..Default::default() };
    let model = Model::load(model_path, &opts)?;
    eprintln!("{} on {}", model_path, model.gpu.describe());
    let greedy_len = list(args, "--greedy").map(|g| g.iter().sum::<usize>()).unwrap_or(0);
    let mut session = Session::new(&model, &SessionOptions { max_ctx: Some(ids.len().max(greedy_len).max(64)) })?;
    let mut out = Out::default();
    for &n in &at {
        let l = session.logits(&ids[..n.min(ids.len())])?;
        out.f32(format!("logits/{n}"), &[l.len()], &l);
    }
    // The same positions through a decode step (--decode-at).
    if let Ok(dat) = list(args, "--decode-at") {
        for n in dat {
            session.reset();
            let l = session.decode_logits(&ids[..n.min(ids.len())])?;
            out.f32(format!("decode_logits/{n}"), &[l.len()], &l);
        }
    }
    session.reset();
    let ppl = session.perplexity(&ids)?;
    out.f32("nll".into(), &[ppl.nll.len()], &ppl.nll);
    // Greedy tokens after the first `greedy_from` ids, through decode steps (the kernels
    // logits and perplexity, both prefill, don't run).
    if let Ok(g) = list(args, "--greedy") {
        let (from, n) = (g[0].min(ids.len()), g.get(1).copied().unwrap_or(0));
        session.reset();
        let opts = GenerateOptions { max_tokens: n, stop_at_eos: false, ..Default::default() };
        let (toks, _) = session.generate(&ids[..from], &opts, |_, _| true)?;
        out.raw("greedy".into(), Dtype::U32, &[toks.len()], bytemuck::cast_slice(&toks).to_vec());
    }
    out.meta.insert("adapter".into(), model.gpu.describe());
    out.write(path)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("kernels") => kernels(&args[1..]),
        Some("logits") => logits(&args[1..]),
        _ => Err(longwave::Error::InvalidArgument("usage: cuda_parity kernels|logits ...".into())),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
