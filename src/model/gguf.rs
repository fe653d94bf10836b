//! GGUF (v2/v3) reader over a memory-mapped file, and a small v3 writer.
//!
//! Files come from anywhere, so every read is bounds-checked against the mapping: a truncated or
//! corrupt file gives `Error::BadModel` saying what was wrong, never a panic, and no count read
//! from the file is trusted for an allocation before it is checked against the bytes left.
//!
//! Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/values, the tensor infos, padding to `general.alignment`, then the tensor data. Everything
//! is little-endian.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::quant::DType;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// Also the alignment every file written here uses.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: usize = 4;

/// One metadata value. Arrays may nest (GGUF allows arrays of arrays).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value as an integer, whatever integer type the writer chose (converters differ).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v as i64,
            MetaValue::I8(v) => v as i64,
            MetaValue::U16(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::U32(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// GGUF value type id.
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
}

/// Where one tensor is. `dims` is in GGUF order: `dims[0]` is the number of columns (the
/// contiguous dimension), `dims[1]` the rows.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    /// Byte range in the file.
    pub range: Range<usize>,
}

impl GgufTensor {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file. Tensor bytes stay in the shared mapping.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    mmap: Arc<Mmap>,
    version: u32,
    alignment: usize,
    metadata: Vec<(String, MetaValue)>,
    index: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    tensor_index: HashMap<String, usize>,
}

impl Gguf {
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::bad_model(path, format!("file is {len} bytes, too short for a GGUF header")));
        }
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not
        // being truncated by another process while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(mmap))
    }

    fn parse(path: &Path, mmap: Arc<Mmap>) -> Result<Gguf> {
        let mut r = Reader { buf: &mmap[..], pos: 0, path };
        if r.bytes(4, "magic")? != MAGIC {
            return Err(r.err("bad magic: not a GGUF file"));
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() <= 3 { " (big-endian file?)" } else { "" };
            return Err(r.err(format!("unsupported GGUF version {version}{hint}; versions 2 and 3 are supported")));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // A key/value needs at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
        // 8 + 4 + 8 + 4 + 8. Anything larger than the file can hold is corruption.
        r.check_count(n_kv, 13, "metadata count")?;
        r.check_count(n_tensors, 32, "tensor count")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = r.string(&format!("key of metadata entry {i}"))?;
            let ty = r.u32(&format!("type of metadata {key:?}"))?;
            let value = r.value(ty, &key, 0)?;
            index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(r.err(format!("general.alignment {v:?} is not a power of two"))),
            },
        };

        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("dimension count of tensor {name:?}"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.err(format!("tensor {name:?} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&format!("dimensions of tensor {name:?}"))?;
                dims.push(usize::try_from(d).map_err(|_| r.err(format!("tensor {name:?} dim {d}")))?);
            }
            let ty = r.u32(&format!("type of tensor {name:?}"))?;
            let offset = r.u64(&format!("offset of tensor {name:?}"))?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = align_up(r.pos, alignment);
        let file_len = mmap.len();

        let mut tensors = Vec::with_capacity(infos.len());
        let mut tensor_index = HashMap::with_capacity(infos.len());
        for (name, dims, ty, offset) in infos {
            let dtype = DType::from_ggml(ty).ok_or_else(|| {
                Error::Unsupported(format!(
                    "{}: tensor {name:?} has ggml type {ty} ({}), which longwave does not support \
                     (supported: f32, f16, bf16, q8_0, q4_0, q4_1)",
                    path.display(),
                    ggml_type_name(ty)
                ))
            })?;
            let bad = |msg: String| Error::bad_model(path, format!("tensor {name:?}: {msg}"));
            let row = dtype
                .row_bytes(dims[0])
                .ok_or_else(|| bad(format!("{} columns do not divide into {} blocks", dims[0], dtype.name())))?;
            let size = dims[1..]
                .iter()
                .try_fold(row, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("size of dims {dims:?} overflows")))?;
            if offset % alignment as u64 != 0 {
                return Err(bad(format!("data offset {offset} is not aligned to {alignment}")));
            }
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .ok_or_else(|| bad(format!("data offset {offset} is past the end of the file")))?;
            let end = start.checked_add(size).filter(|&e| e <= file_len).ok_or_else(|| {
                bad(format!(
                    "tensor data ({size} bytes at {start}) runs past the end of the file \
                         ({file_len} bytes): truncated file?"
                ))
            })?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("appears twice".into()));
            }
            tensors.push(GgufTensor { name, dtype, dims, range: start..end });
        }

        Ok(Gguf { path: path.to_path_buf(), mmap, version, alignment, metadata, index, tensors, tensor_index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.mmap
    }
    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// Any integer type that fits in u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_i64().and_then(|v| u32::try_from(v).ok())
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_i64().and_then(|v| u64::try_from(v).ok())
    }
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }
    /// f32, f64 or an integer, as f32.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f64().map(|v| v as f32)
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    /// An array of strings (None if missing, not an array, or holding something else).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?.as_array()?.iter().map(MetaValue::as_str).collect()
    }
    /// An array of integers of any integer type.
    pub fn get_int_array(&self, key: &str) -> Option<Vec<i64>> {
        self.get(key)?.as_array()?.iter().map(MetaValue::as_i64).collect()
    }
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_f64().map(|f| f as f32)).collect()
    }

    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The raw bytes of a tensor of this file (ranges were checked at open).
    pub fn tensor_bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.mmap[t.range.clone()]
    }
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Names of ggml types we do not load, so the error says "q4_K" rather than only "12".
fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "f32",
        "f16",
        "q4_0",
        "q4_1",
        "q4_2 (removed)",
        "q4_3 (removed)",
        "q5_0",
        "q5_1",
        "q8_0",
        "q8_1",
        "q2_K",
        "q3_K",
        "q4_K",
        "q5_K",
        "q6_K",
        "q8_K",
        "iq2_xxs",
        "iq2_xs",
        "iq3_xxs",
        "iq1_s",
        "iq4_nl",
        "iq3_s",
        "iq2_s",
        "iq4_xs",
        "i8",
        "i16",
        "i32",
        "i64",
        "f64",
        "iq1_m",
        "bf16",
        "q4_0_4_4 (removed)",
        "q4_0_4_8 (removed)",
        "q4_0_8_8 (removed)",
        "tq1_0",
        "tq2_0",
        "iq4_nl_4_4 (removed)",
        "iq4_nl_4_8 (removed)",
        "iq4_nl_8_8 (removed)",
        "mxfp4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// Bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::bad_model(self.path, msg)
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            self.err(format!(
                "{what} ({n} bytes at offset {}) runs past the end of the file ({} bytes): \
                 truncated or corrupt file",
                self.pos,
                self.buf.len()
            ))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count whose items, at `min_size` bytes each, cannot fit in the rest of the file,
    /// so a corrupt count never drives an allocation.
    fn check_count(&self, n: u64, min_size: u64, what: &str) -> Result<()> {
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size) > left {
            return Err(self.err(format!(
                "{what} {n} is absurd: only {left} bytes remain in the file (truncated or \
                 corrupt file?)"
            )));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let left = self.buf.len() - self.pos;
        if len > left as u64 {
            return Err(self.err(format!(
                "{what}: string length {len} at offset {} is past the end of the file \
                 ({left} bytes left)",
                self.pos - 8
            )));
        }
        let b = self.bytes(len as usize, what)?;
        // Some converters wrote invalid UTF-8 in token strings; keep going with replacement
        // characters rather than refusing the model.
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("metadata {key:?}: bool byte {b}"))),
            },
            8 => MetaValue::Str(self.string(&format!("metadata {key:?}"))?),
            9 => {
                // Bound recursion: a corrupt file could otherwise nest arrays until the stack
                // overflows.
                if depth >= 8 {
                    return Err(self.err(format!("metadata {key:?}: arrays nested too deep")));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.err(format!("metadata {key:?}: unknown array type {t}"))),
                };
                self.check_count(n, min_size, &format!("metadata {key:?} array length"))?;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format!("metadata {key:?}: unknown value type {t}"))),
        })
    }
}

/// One tensor to write: name, dtype, dims in GGUF order (`dims[0]` = columns), raw bytes.
pub type TensorToWrite<'a> = (&'a str, DType, &'a [usize], &'a [u8]);

/// Writes a GGUF v3 file with alignment 32. A `general.alignment` entry in `metadata` must say
/// 32. Tensor data must match its dtype and dims exactly.
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorToWrite<'_>],
) -> Result<()> {
    let path = path.as_ref();
    let bytes = gguf_bytes(metadata, tensors)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The bytes [`write_gguf`] writes.
pub fn gguf_bytes(metadata: &[(String, MetaValue)], tensors: &[TensorToWrite<'_>]) -> Result<Vec<u8>> {
    let infos: Vec<TensorInfo<'_>> = tensors.iter().map(|&(name, dtype, dims, _)| (name, dtype, dims)).collect();
    let (mut out, sizes) = gguf_header(metadata, &infos)?;
    for (&(name, dtype, dims, data), size) in tensors.iter().zip(sizes) {
        if data.len() != size {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: {} bytes do not fit {} dims {dims:?}",
                data.len(),
                dtype.name()
            )));
        }
        out.write_all(data).expect("writing to a Vec cannot fail");
        out.resize(align_up(out.len(), DEFAULT_ALIGNMENT), 0);
    }
    Ok(out)
}

/// Name, dtype and dims (GGUF order) of a tensor to write.
pub type TensorInfo<'a> = (&'a str, DType, &'a [usize]);

/// The start of a GGUF v3 file with alignment 32, up to where tensor data begins (already
/// padded), and each tensor's data size in bytes. The data follows in the order given, each
/// tensor padded with zeros to a multiple of 32 bytes. Lets a writer stream tensors it has not
/// produced yet.
pub fn gguf_header(metadata: &[(String, MetaValue)], tensors: &[TensorInfo<'_>]) -> Result<(Vec<u8>, Vec<usize>)> {
    let align = DEFAULT_ALIGNMENT;
    for (k, v) in metadata {
        if k == "general.alignment" && v.as_i64() != Some(align as i64) {
            return Err(Error::InvalidArgument(format!("write_gguf writes alignment {align}, metadata says {v:?}")));
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v)?;
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(tensors.len());
    for &(name, dtype, dims) in tensors {
        let size = dims.first().and_then(|&c| dtype.row_bytes(c)).map(|r| r * dims[1..].iter().product::<usize>());
        let size = match size {
            Some(s) if dims.len() <= MAX_DIMS => s,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "tensor {name:?}: {} dims {dims:?} do not divide into blocks",
                    dtype.name()
                )))
            }
        };
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for &d in dims {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&dtype.to_ggml().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = align_up(offset + size, align);
        sizes.push(size);
    }
    out.resize(align_up(out.len(), align), 0);
    Ok((out, sizes))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of u8.
            let ty = items.first().map_or(0, MetaValue::type_id);
            if items.iter().any(|i| i.type_id() != ty) {
                return Err(Error::InvalidArgument("GGUF arrays must be homogeneous".into()));
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{real_model_path, test_dir};

    fn small_file() -> Vec<u8> {
        let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
        let q = crate::model::quant::quantize(DType::Q8_0, &w);
        let f = crate::model::quant::quantize(DType::F32, &w[..8]);
        let meta = vec![
            ("general.architecture".to_string(), MetaValue::Str("llama".into())),
            ("llama.block_count".to_string(), MetaValue::U32(2)),
            ("x.f".to_string(), MetaValue::F32(0.5)),
            ("x.b".to_string(), MetaValue::Bool(true)),
            ("x.i64".to_string(), MetaValue::I64(-7)),
            ("x.strs".to_string(), MetaValue::Array(vec![MetaValue::Str("a b".into()), MetaValue::Str("ü".into())])),
            (
                "x.nested".to_string(),
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                    MetaValue::Array(vec![]),
                ]),
            ),
        ];
        gguf_bytes(&meta, &[("w", DType::Q8_0, &[32, 2], &q), ("v", DType::F32, &[8], &f)]).unwrap()
    }

    fn open_bytes(name: &str, bytes: &[u8]) -> Result<Gguf> {
        let d = test_dir("gguf");
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        Gguf::open(&p)
    }

    fn bad_msg(r: Result<Gguf>) -> String {
        match r {
            Err(Error::BadModel { msg, .. }) => msg,
            Err(e) => panic!("expected BadModel, got {e}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn writer_round_trip() {
        let g = open_bytes("rt.gguf", &small_file()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_u32("llama.block_count"), Some(2));
        assert_eq!(g.get_f32("x.f"), Some(0.5));
        assert_eq!(g.get_bool("x.b"), Some(true));
        assert_eq!(g.get_i64("x.i64"), Some(-7));
        assert_eq!(g.get_u32("x.i64"), None);
        assert_eq!(g.get_str_array("x.strs"), Some(vec!["a b", "ü"]));
        let nested = g.get("x.nested").unwrap().as_array().unwrap();
        assert_eq!(nested[0], MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]));
        let w = g.tensor("w").unwrap();
        assert_eq!((w.dtype, w.dims.clone()), (DType::Q8_0, vec![32, 2]));
        assert_eq!(w.range.start % 32, 0);
        assert_eq!(g.tensor_bytes(w).len(), 68);
        let v = g.tensor("v").unwrap();
        let vals = crate::model::quant::dequantize_vec(DType::F32, g.tensor_bytes(v), 8);
        assert_eq!(vals[1], -2.75);
    }

    #[test]
    fn truncated_small_file_at_every_cut() {
        let bytes = small_file();
        // The last tensor ends exactly at the end of the file, so every shorter cut must fail
        // cleanly.
        for cut in 0..bytes.len() {
            let r = open_bytes("cut.gguf", &bytes[..cut]);
            assert!(matches!(r, Err(Error::BadModel { .. })), "cut at {cut}: {:?}", r.map(|_| ()));
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = small_file();
        b[0] = b'X';
        assert!(bad_msg(open_bytes("magic.gguf", &b)).contains("bad magic"));
        let mut b = small_file();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(bad_msg(open_bytes("ver.gguf", &b)).contains("unsupported GGUF version 1"));
    }

    #[test]
    fn huge_counts_and_lengths() {
        // The first key's length sits right after the 24-byte header.
        let mut b = small_file();
        b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let m = bad_msg(open_bytes("strlen.gguf", &b));
        assert!(m.contains("string length") && m.contains("past the end"), "{m}");

        let mut b = small_file();
        b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let m = bad_msg(open_bytes("tcount.gguf", &b));
        assert!(m.contains("tensor count") && m.contains("absurd"), "{m}");

        let mut b = small_file();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(bad_msg(open_bytes("kvcount.gguf", &b)).contains("metadata count"));
    }

    /// Offset in `b` of the tensor info of the tensor named `name` (its name length field).
    fn find_info(b: &[u8], name: &str) -> usize {
        let mut pat = (name.len() as u64).to_le_bytes().to_vec();
        pat.extend_from_slice(name.as_bytes());
        pat.extend_from_slice(&2u32.to_le_bytes());
        b.windows(pat.len()).position(|w| w == pat.as_slice()).unwrap()
    }

    #[test]
    fn unknown_ggml_type() {
        let mut b = small_file();
        // name (8 + 1) + n_dims (4) + dims (16) -> type
        let at = find_info(&b, "w") + 9 + 4 + 16;
        b[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
        match open_bytes("type.gguf", &b) {
            Err(Error::Unsupported(m)) => {
                assert!(m.contains("\"w\"") && m.contains("type 12") && m.contains("q4_K"), "{m}")
            }
            r => panic!("expected Unsupported, got {:?}", r.map(|_| ())),
        }
    }

    #[test]
    fn tensor_past_eof() {
        let mut b = small_file();
        let at = find_info(&b, "w") + 9 + 4 + 16 + 4;
        b[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let m = bad_msg(open_bytes("eof.gguf", &b));
        assert!(m.contains("\"w\"") && m.contains("past the end of the file"), "{m}");
    }

    #[test]
    fn real_model_metadata() {
        let g = Gguf::open(real_model_path()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_u32("llama.block_count"), Some(30));
        assert_eq!(g.get_u32("llama.embedding_length"), Some(576));
        assert_eq!(g.get_u32("llama.feed_forward_length"), Some(1536));
        assert_eq!(g.get_u32("llama.attention.head_count"), Some(9));
        assert_eq!(g.get_u32("llama.attention.head_count_kv"), Some(3));
        assert_eq!(g.get_u32("llama.context_length"), Some(8192));
        assert_eq!(g.get_f32("llama.rope.freq_base"), Some(100000.0));
        assert_eq!(g.get_f32("llama.attention.layer_norm_rms_epsilon"), Some(1e-5));
        assert_eq!(g.get_str("tokenizer.ggml.model"), Some("gpt2"));
        assert_eq!(g.get_str("tokenizer.ggml.pre"), Some("smollm"));
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len(), 49152);
        assert_eq!(tokens[1], "<|im_start|>");
        assert_eq!(g.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
        assert_eq!(g.tensors().len(), 272);
        let q = g.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.dtype, q.dims.clone()), (DType::Q4_1, vec![576, 576]));
        let e = g.tensor("token_embd.weight").unwrap();
        assert_eq!((e.dtype, e.dims.clone()), (DType::Q8_0, vec![576, 49152]));
        assert!(g.tensor("output.weight").is_none(), "SmolLM2 ties its embeddings");
    }

    #[test]
    fn real_model_truncated() {
        let bytes = std::fs::read(real_model_path()).unwrap();
        for cut in [0, 10, 24, 100, 5000] {
            assert!(matches!(open_bytes("cut.gguf", &bytes[..cut]), Err(Error::BadModel { .. })));
        }
        // The cut falls inside the tokenizer metadata.
        let m = bad_msg(open_bytes("trunc1m.gguf", &bytes[..1 << 20]));
        assert!(m.contains("tokenizer.ggml") && m.contains("truncated"), "{m}");
        // Cut inside the tensor data: the header parses, a tensor does not fit.
        let m = bad_msg(open_bytes("trunc_data.gguf", &bytes[..bytes.len() - 1000]));
        assert!(m.contains("tensor") && m.contains("truncated"), "{m}");
    }
}
