//! Weight formats: their GGUF byte layout, CPU (de)quantization, and the word layout the
//! matrix kernels read on the GPU.
//!
//! GGUF stores Q8_0 blocks in 34 bytes and Q4_0 blocks in 18, so blocks are not 4-byte aligned.
//! WGSL reads storage as 32-bit words, so [`pack_for_gpu`] splits each quantized matrix into a
//! region of quant words followed by a region of scales: the same bytes (give or take padding of
//! the last word), never expanded to floats.

use half::{bf16, f16};

/// Elements per quantization block in every GGUF block format we support.
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        if self.is_quantized() {
            QK
        } else {
            1
        }
    }

    /// Bytes per block in the GGUF / safetensors byte layout.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }

    /// Bytes of a row of `cols` elements in the file layout, or None when `cols` does not
    /// divide into blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_elems()) {
            return None;
        }
        Some(cols / self.block_elems() * self.block_bytes())
    }

    /// GGUF `ggml_type` id.
    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            30 => DType::BF16,
            _ => return None,
        })
    }

    pub fn to_ggml(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::BF16 => 30,
        }
    }

    /// The u32 words of quantized data per block in the GPU layout.
    pub fn gpu_quant_words(self) -> usize {
        match self {
            DType::Q8_0 => 8,
            DType::Q4_0 | DType::Q4_1 => 4,
            _ => 0,
        }
    }
}

/// Dequantizes one row (or any whole number of blocks) to f32.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (j, x) in o.iter_mut().enumerate() {
                    *x = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 15) as i32 - 8) as f32;
                    o[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(20)) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 15) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
    }
}

/// Dequantizes a whole tensor to a new vector.
pub fn dequantize_vec(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize(dtype, bytes, &mut out);
    out
}

/// Quantizes f32 values (a whole number of blocks) into the file layout, as llama.cpp's
/// reference quantizers do.
pub fn quantize(dtype: DType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / dtype.block_elems() * dtype.block_bytes());
    match dtype {
        DType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => x.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => {
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                // Fixed-size arrays let the compiler vectorize the block (model synthesis
                // quantizes billions of values).
                let mut qs = [0u8; QK];
                for (q, v) in qs.iter_mut().zip(b) {
                    *q = (v * id).round() as i8 as u8;
                }
                out.extend_from_slice(&qs);
            }
        }
        DType::Q4_0 => {
            for b in x.chunks_exact(QK) {
                // The value of largest magnitude maps to -8, keeping its sign; like ggml's loop,
                // the first one wins a tie. Finding the magnitude first vectorizes.
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let max = if amax > 0.0 { b.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0) } else { 0.0 };
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                let mut qs = [0u8; QK / 2];
                for (j, byte) in qs.iter_mut().enumerate() {
                    *byte = q(b[j]) | (q(b[j + 16]) << 4);
                }
                out.extend_from_slice(&qs);
            }
        }
        DType::Q4_1 => {
            for b in x.chunks_exact(QK) {
                let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            }
        }
    }
    out
}

/// Where things are inside a matrix packed by [`pack_for_gpu`], in u32 words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLayout {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Plain floats: words per row (f16/bf16 rows are padded to an even element count).
    /// Quantized: blocks per row.
    pub row_stride: usize,
    /// Quantized: first word of the scale region.
    pub scale_offset: usize,
    pub total_words: usize,
}

impl GpuLayout {
    pub fn new(dtype: DType, rows: usize, cols: usize) -> GpuLayout {
        match dtype {
            DType::F32 => GpuLayout::dense(dtype, rows, cols, cols),
            DType::F16 | DType::BF16 => GpuLayout::dense(dtype, rows, cols, cols.div_ceil(2)),
            _ => {
                let nb = cols / QK;
                let blocks = rows * nb;
                let qwords = blocks * dtype.gpu_quant_words();
                let swords = if dtype == DType::Q4_1 { blocks } else { blocks.div_ceil(2) };
                GpuLayout { dtype, rows, cols, row_stride: nb, scale_offset: qwords, total_words: qwords + swords }
            }
        }
    }

    fn dense(dtype: DType, rows: usize, cols: usize, stride: usize) -> GpuLayout {
        GpuLayout { dtype, rows, cols, row_stride: stride, scale_offset: 0, total_words: rows * stride }
    }

    /// Rows per chunk so that each chunk fits `max_bytes` (a binding limit); at least 1.
    pub fn rows_per_chunk(dtype: DType, cols: usize, max_bytes: u64) -> usize {
        let per_row = GpuLayout::new(dtype, 1, cols).total_words as u64 * 4 + 4;
        (max_bytes / per_row).max(1) as usize
    }
}

/// Packs `rows` rows of file-layout bytes into the GPU word layout described by [`GpuLayout`].
pub fn pack_for_gpu(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Vec<u32> {
    let layout = GpuLayout::new(dtype, rows, cols);
    let mut words = vec![0u32; layout.total_words];
    let rb = dtype.row_bytes(cols).expect("cols divide into blocks");
    match dtype {
        DType::F32 => {
            for (w, c) in words.iter_mut().zip(bytes.chunks_exact(4)) {
                *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 | DType::BF16 => {
            for r in 0..rows {
                let row = &bytes[r * rb..(r + 1) * rb];
                for (i, c) in row.chunks(4).enumerate() {
                    let lo = u16::from_le_bytes([c[0], c[1]]) as u32;
                    let hi = if c.len() == 4 { u16::from_le_bytes([c[2], c[3]]) as u32 } else { 0 };
                    words[r * layout.row_stride + i] = lo | (hi << 16);
                }
            }
        }
        _ => {
            let bb = dtype.block_bytes();
            let qw = dtype.gpu_quant_words();
            let qoff = if dtype == DType::Q4_1 { 4 } else { 2 };
            for (b, blk) in bytes[..rows * rb].chunks_exact(bb).enumerate() {
                for i in 0..qw {
                    let c = &blk[qoff + 4 * i..qoff + 4 * i + 4];
                    words[b * qw + i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                let d = u16::from_le_bytes([blk[0], blk[1]]) as u32;
                if dtype == DType::Q4_1 {
                    let m = u16::from_le_bytes([blk[2], blk[3]]) as u32;
                    words[layout.scale_offset + b] = d | (m << 16);
                } else {
                    words[layout.scale_offset + b / 2] |= d << (16 * (b % 2));
                }
            }
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn quantize_roundtrip_error_is_bounded() {
        let mut s = 7;
        let x: Vec<f32> = (0..QK * 9).map(|_| lcg(&mut s)).collect();
        for (dt, tol) in [
            (DType::F32, 0.0),
            (DType::F16, 1e-3),
            (DType::BF16, 8e-3),
            (DType::Q8_0, 1e-2),
            (DType::Q4_0, 0.15),
            (DType::Q4_1, 0.07),
        ] {
            let q = quantize(dt, &x);
            assert_eq!(q.len(), dt.row_bytes(x.len()).unwrap());
            let y = dequantize_vec(dt, &q, x.len());
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= tol, "{dt:?}: max error {err}");
        }
    }

    /// ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref, loop for loop, for one block.
    fn ggml_ref(dtype: DType, b: &[f32]) -> Vec<u8> {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = if dtype == DType::Q8_0 { amax / 127.0 } else { max / -8.0 };
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut out = f16::from_f32(d).to_le_bytes().to_vec();
        if dtype == DType::Q8_0 {
            out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
        } else {
            let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
            out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
        }
        out
    }

    #[test]
    fn block_quantizers_match_ggml_reference() {
        let mut s = 11;
        let mut blocks: Vec<Vec<f32>> = (0..200).map(|_| (0..QK).map(|_| lcg(&mut s)).collect()).collect();
        // Ties between +m and -m (the first wins), zeros of both signs, exact halves.
        blocks.push((0..QK).map(|i| if i % 2 == 0 { -0.5 } else { 0.5 }).collect());
        blocks.push(
            (0..QK)
                .map(|i| {
                    if i == 3 {
                        0.25
                    } else if i == 9 {
                        -0.25
                    } else {
                        0.0
                    }
                })
                .collect(),
        );
        blocks.push(vec![-0.0; QK]);
        blocks.push((0..QK).map(|i| i as f32 / 4.0 - 4.0).collect());
        for dt in [DType::Q8_0, DType::Q4_0] {
            for b in &blocks {
                assert_eq!(quantize(dt, b), ggml_ref(dt, b), "{dt:?} {b:?}");
            }
        }
    }

    #[test]
    fn gpu_layout_keeps_every_value() {
        let mut s = 3;
        let (rows, cols) = (5, QK * 3);
        let x: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        for dt in DType::ALL {
            let q = quantize(dt, &x);
            let words = pack_for_gpu(dt, rows, cols, &q);
            let l = GpuLayout::new(dt, rows, cols);
            assert_eq!(words.len(), l.total_words);
            // Unpack element (r, c) the way the shaders do.
            let want = dequantize_vec(dt, &q, x.len());
            for r in 0..rows {
                for c in 0..cols {
                    let got = match dt {
                        DType::F32 => f32::from_bits(words[r * cols + c]),
                        DType::F16 | DType::BF16 => {
                            let w = words[r * l.row_stride + c / 2] >> (16 * (c % 2)) & 0xffff;
                            if dt == DType::F16 {
                                f16::from_bits(w as u16).to_f32()
                            } else {
                                bf16::from_bits(w as u16).to_f32()
                            }
                        }
                        _ => {
                            let b = r * l.row_stride + c / QK;
                            let j = c % QK;
                            let qw = dt.gpu_quant_words();
                            let q = if dt == DType::Q8_0 {
                                (words[b * qw + j / 4] >> (8 * (j % 4))) as u8 as i8 as f32
                            } else {
                                let byte = words[b * qw + (j % 16) / 4] >> (8 * (j % 4));
                                ((byte >> (4 * (j / 16) as u32)) & 15) as f32
                            };
                            if dt == DType::Q4_1 {
                                let s = words[l.scale_offset + b];
                                let d = f16::from_bits(s as u16).to_f32();
                                let m = f16::from_bits((s >> 16) as u16).to_f32();
                                d * q + m
                            } else {
                                let s = words[l.scale_offset + b / 2] >> (16 * (b % 2));
                                let d = f16::from_bits(s as u16).to_f32();
                                if dt == DType::Q4_0 {
                                    d * (q - 8.0)
                                } else {
                                    d * q
                                }
                            }
                        }
                    };
                    assert_eq!(got, want[r * cols + c], "{dt:?} ({r},{c})");
                }
            }
        }
    }
}
