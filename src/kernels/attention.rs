//! Rotary embedding + KV append, causal attention as mergeable partials, and the merge.
//!
//! The KV cache holds, per layer, keys and values in f16 as `[n_kv][max_ctx][head_dim]`.
//! The step's positions come from the device-side step state (`state[0]` = position of the
//! first token, `state[1]` = token count), so the same bound kernels serve every step.

use super::{Bound, REDUCE_WGSL};
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::{Error, Result};
use std::sync::Arc;

const KV_WGSL: &str = include_str!("../../shaders/attention/kv_store.wgsl");
const ROPE_WGSL: &str = include_str!("../../shaders/attention/rope_kv.wgsl");
const ROPE_ANGLES_WGSL: &str = include_str!("../../shaders/attention/rope_angles.wgsl");
const ATTEND_COMMON_WGSL: &str = include_str!("../../shaders/attention/attend_common.wgsl");
const ATTEND_WGSL: &str = include_str!("../../shaders/attention/attend.wgsl");
const ATTEND_GROUP_WGSL: &str = include_str!("../../shaders/attention/attend_group.wgsl");
const MERGE_WGSL: &str = include_str!("../../shaders/attention/attn_merge.wgsl");
const ATTEND_MERGE_WGSL: &str = include_str!("../../shaders/attention/attend_merge.wgsl");
const ATTEND_WIDE_WGSL: &str = include_str!("../../shaders/attention/attend_wide.wgsl");

/// Head shapes shared by the attention kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: u32,
    pub n_kv: u32,
    pub head_dim: u32,
    pub max_ctx: u32,
}

impl AttnShape {
    /// Bytes of one layer's key (or value) cache.
    pub fn cache_bytes(&self) -> u64 {
        self.n_kv as u64 * self.max_ctx as u64 * self.head_dim as u64 * 2
    }
    /// Words of the arrival counts of merged decode attention (one per query head).
    pub fn arrival_words(&self) -> u64 {
        self.n_heads as u64
    }
    /// Floats of the partials buffer for `n` queries and `splits` splits.
    pub fn partial_floats(&self, n: u32, splits: u32) -> u64 {
        n as u64 * self.n_heads as u64 * splits as u64 * (self.head_dim as u64 + 2)
    }
    /// What the kernels support: head_dim a multiple of 8 up to 256, heads a multiple of KV heads.
    pub fn check(&self) -> Result<()> {
        if !self.head_dim.is_multiple_of(8) || self.head_dim > 256 || self.head_dim == 0 {
            return Err(crate::Error::Unsupported(format!(
                "head_dim {} (attention kernels take multiples of 8 up to 256)",
                self.head_dim
            )));
        }
        if self.n_kv == 0 || !self.n_heads.is_multiple_of(self.n_kv) {
            return Err(crate::Error::Unsupported(format!("{} heads over {} KV heads", self.n_heads, self.n_kv)));
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    n_heads: u32,
    n_kv: u32,
    hd: u32,
    max_ctx: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttendParams {
    n_heads: u32,
    n_kv: u32,
    hd: u32,
    max_ctx: u32,
    n_splits: u32,
    scale: f32,
    /// Words per query of the 8-bit merged output (attend_merge.wgsl).
    q8_stride: u32,
    _pad: u32,
}

impl AttendParams {
    fn new(sh: AttnShape, splits: u32) -> AttendParams {
        AttendParams {
            n_heads: sh.n_heads,
            n_kv: sh.n_kv,
            hd: sh.head_dim,
            max_ctx: sh.max_ctx,
            n_splits: splits,
            scale: 1.0 / (sh.head_dim as f32).sqrt(),
            q8_stride: 0,
            _pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MergeParams {
    n_heads: u32,
    hd: u32,
    n_splits: u32,
    /// Words per query of the 8-bit output (Q8_OUT).
    q8_stride: u32,
}

/// cos/sin table `[max_ctx][head_dim / 2]` for the rope kernel. The angle is rounded to f32
/// as the reference implementation computes it; cos and sin are taken in f64.
pub fn rope_table(inv_freq: &[f32], max_ctx: usize) -> Vec<[f32; 2]> {
    let mut t = Vec::with_capacity(max_ctx * inv_freq.len());
    for pos in 0..max_ctx {
        for &f in inv_freq {
            let a = (pos as f32 * f) as f64;
            t.push([a.cos() as f32, a.sin() as f32]);
        }
    }
    t
}

/// The attention kernels: one query head per workgroup (attend.wgsl), or the query heads of
/// one KV head together (attend_group.wgsl), reading the cache once for all of them; or the
/// query heads of one KV head over short splits with 256 invocations, every load of a key
/// tile in one round (attend_wide.wgsl).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttendKind {
    PerHead,
    Grouped,
    Wide,
}

/// What a decode step's attention reads and writes ([`AttentionKernels::bind_attend_new_kv`],
/// [`AttentionKernels::bind_attend_merged`]).
#[derive(Clone, Copy)]
pub struct DecodeAttention<'a> {
    pub sh: AttnShape,
    pub splits: u32,
    pub kind: AttendKind,
    /// The step state (position, token count).
    pub state: &'a GpuBuffer,
    /// The rotary table ([`rope_table`]).
    pub rope: &'a GpuBuffer,
    /// The step's QKV product row.
    pub qkv: &'a GpuBuffer,
    pub k_cache: &'a GpuBuffer,
    pub v_cache: &'a GpuBuffer,
    /// The partials `[head][split][head_dim + 2]`.
    pub part: &'a GpuBuffer,
}

impl<'a> DecodeAttention<'a> {
    /// The buffers in binding order (attend_common.wgsl: 1 to 6).
    fn buffers(&self) -> [&'a GpuBuffer; 6] {
        [self.state, self.qkv, self.k_cache, self.v_cache, self.part, self.rope]
    }
}

pub struct AttentionKernels {
    rope: Arc<wgpu::ComputePipeline>,
    /// The merge for one split and for several (see attn_merge.wgsl).
    merge: [Arc<wgpu::ComputePipeline>; 2],
}

impl AttentionKernels {
    /// Most key splits per query (the merge takes at most 8 groups of 8).
    pub const MAX_SPLITS: u32 = 64;

    pub fn new(gpu: &Gpu) -> Result<AttentionKernels> {
        let f = gpu.flags();
        Ok(AttentionKernels {
            rope: gpu.pipeline(&PipelineKey::new("rope_kv", &[KV_WGSL, ROPE_ANGLES_WGSL, ROPE_WGSL], f))?,
            merge: [Self::merge_pipeline(gpu, Self::MERGE_ONE)?, Self::merge_pipeline(gpu, Self::MERGE_MANY)?],
        })
    }

    /// The variant of attention kernel `kind`: `new_kv` for decode (rotary embedding and cache
    /// append inside), `merge` = Some(q8) for decode that merges its own splits, `output`
    /// for one split that writes the attention output itself (prefill).
    fn attend_pipeline(
        gpu: &Gpu,
        kind: AttendKind,
        sh: AttnShape,
        new_kv: bool,
        merge: Option<bool>,
        output: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let (name, src) = match kind {
            AttendKind::PerHead => ("attend", ATTEND_WGSL),
            AttendKind::Grouped => ("attend_group", ATTEND_GROUP_WGSL),
            AttendKind::Wide => ("attend_wide", ATTEND_WIDE_WGSL),
        };
        if kind == AttendKind::Wide && !Self::wide_supports(sh) {
            return Err(Error::InvalidArgument(format!(
                "the wide attention kernel takes heads of 64 or 128 values, not {}",
                sh.head_dim
            )));
        }
        let mut sources = vec![REDUCE_WGSL, KV_WGSL, ATTEND_COMMON_WGSL];
        // The decode variants rotate with the rope table's angles too (after the bindings).
        if new_kv {
            sources.push(ROPE_ANGLES_WGSL);
        }
        if merge.is_some() {
            if kind == AttendKind::Wide {
                return Err(Error::Unsupported("the wide attention kernel does not merge its splits".into()));
            }
            sources.push(ATTEND_MERGE_WGSL);
        }
        sources.push(src);
        let mut key = PipelineKey::new(name, &sources, gpu.flags());
        if new_kv {
            key = key.define("NEW_KV");
        }
        if output {
            if kind == AttendKind::Wide || new_kv || merge.is_some() {
                return Err(Error::Unsupported(format!("{kind:?} attention writing its output itself")));
            }
            key = key.define("FINAL");
        }
        if let Some(q8) = merge {
            key = key.define("MERGE_LAST");
            if q8 {
                key = key.define("Q8_OUT");
            }
        }
        if kind == AttendKind::Wide && sh.head_dim == 64 {
            key = key.define("HD64");
        }
        if kind == AttendKind::PerHead && Self::prefetch_supports(sh) {
            key = key.define("PREFETCH").constant("PF", sh.head_dim / 4);
        }
        gpu.pipeline(&key)
    }

    /// From qkv `[n][n_heads + 2 n_kv][hd]` (q heads, k heads, v heads): rotated queries into
    /// q `[n][n_heads][hd]`, rotated keys and the values appended to the cache.
    pub fn bind_rope_kv(
        &self,
        gpu: &Gpu,
        sh: AttnShape,
        state: &GpuBuffer,
        rope: &GpuBuffer,
        qkv: &GpuBuffer,
        q: &GpuBuffer,
        k_cache: &GpuBuffer,
        v_cache: &GpuBuffer,
    ) -> Bound {
        let params = gpu.uniform(
            "rope_kv",
            &RopeParams { n_heads: sh.n_heads, n_kv: sh.n_kv, hd: sh.head_dim, max_ctx: sh.max_ctx },
        );
        let bind_group = gpu.bind_group(
            &self.rope,
            &[
                params.binding(),
                state.binding(),
                rope.binding(),
                qkv.binding(),
                q.binding(),
                k_cache.binding(),
                v_cache.binding(),
            ],
        );
        Bound { pipeline: self.rope.clone(), bind_group, params: Some(params) }
    }

    pub fn rope_groups(sh: AttnShape, n: u32) -> [u32; 3] {
        [n, sh.n_heads + sh.n_kv, 1]
    }

    /// Partials of the step's queries over the cache, `splits` key ranges per query.
    pub fn bind_attend(
        &self,
        gpu: &Gpu,
        sh: AttnShape,
        splits: u32,
        state: &GpuBuffer,
        q: &GpuBuffer,
        k_cache: &GpuBuffer,
        v_cache: &GpuBuffer,
        part: &GpuBuffer,
        kind: AttendKind,
    ) -> Result<Bound> {
        let pipeline = Self::attend_pipeline(gpu, kind, sh, false, None, false)?;
        Ok(Self::bind_attend_params(gpu, &pipeline, AttendParams::new(sh, splits), &[state, q, k_cache, v_cache, part]))
    }

    /// Attention of the step's queries over the cache in one split, written as the output
    /// `[n][n_heads][hd]` itself (what [`AttentionKernels::bind_merge`] makes of one split, bit
    /// for bit): prefill needs no merge dispatch. Per head or head groups, as
    /// [`AttentionKernels::prefill_kind`] picks.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_attend_output(
        &self,
        gpu: &Gpu,
        sh: AttnShape,
        state: &GpuBuffer,
        q: &GpuBuffer,
        k_cache: &GpuBuffer,
        v_cache: &GpuBuffer,
        out: &GpuBuffer,
        kind: AttendKind,
    ) -> Result<Bound> {
        let pipeline = Self::attend_pipeline(gpu, kind, sh, false, None, true)?;
        Ok(Self::bind_attend_params(gpu, &pipeline, AttendParams::new(sh, 1), &[state, q, k_cache, v_cache, out]))
    }

    /// `params`, then `buffers` in binding order.
    fn bind_attend_params(
        gpu: &Gpu,
        pipeline: &Arc<wgpu::ComputePipeline>,
        params: AttendParams,
        buffers: &[&GpuBuffer],
    ) -> Bound {
        assert!((1..=Self::MAX_SPLITS).contains(&params.n_splits), "attention splits {}", params.n_splits);
        let params = gpu.uniform("attend", &params);
        let mut entries = vec![params.binding()];
        entries.extend(buffers.iter().map(|b| b.binding()));
        let bind_group = gpu.bind_group(pipeline, &entries);
        Bound { pipeline: pipeline.clone(), bind_group, params: Some(params) }
    }

    /// Decode attention of a one-token step straight from its QKV product row (`qkv`, as
    /// [`AttentionKernels::bind_rope_kv`] takes it): the queries rotated in each workgroup, the
    /// new key and value rotated, used and appended to the cache in the same dispatch, so the
    /// step needs no rope_kv dispatch. Steps of several tokens (prefill) use rope_kv and
    /// [`AttentionKernels::bind_attend`].
    pub fn bind_attend_new_kv(&self, gpu: &Gpu, d: &DecodeAttention) -> Result<Bound> {
        let pipeline = Self::attend_pipeline(gpu, d.kind, d.sh, true, None, false)?;
        Ok(Self::bind_attend_params(gpu, &pipeline, AttendParams::new(d.sh, d.splits), &d.buffers()))
    }

    /// Whether the adapter runs [`AttentionKernels::bind_attend_merged`]: it binds eight
    /// storage buffers.
    pub fn merged_fits(gpu: &Gpu) -> bool {
        gpu.caps.max_storage_buffers_per_stage >= 8
    }

    /// [`AttentionKernels::bind_attend_new_kv`] that also merges the splits (attend_merge.wgsl):
    /// the last workgroup of each head merges them into `out`, `[n_heads * head_dim]` f32, or
    /// with `q8` 8-bit blocks as [`AttentionKernels::bind_merge_q8`] writes them (head_dim a
    /// multiple of 32). `arrivals` holds [`AttnShape::arrival_words`] zeroed words; each step
    /// leaves them zero again. One-token steps only.
    pub fn bind_attend_merged(
        &self,
        gpu: &Gpu,
        d: &DecodeAttention,
        arrivals: &GpuBuffer,
        out: &GpuBuffer,
        q8: bool,
    ) -> Result<Bound> {
        let (sh, splits, kind) = (d.sh, d.splits, d.kind);
        let k = (sh.n_heads * sh.head_dim) as usize;
        let q8_stride = crate::kernels::quantize::q8_words(k);
        let out_bytes = if q8 { q8_stride * 4 } else { k * 4 } as u64;
        if !Self::merged_fits(gpu) {
            return Err(Error::Unsupported("merged attention binds 8 storage buffers".into()));
        }
        if q8 && !sh.head_dim.is_multiple_of(Self::MERGE_LANES) {
            return Err(Error::InvalidArgument(format!(
                "an 8-bit merge output takes heads of a multiple of 32 values, not {}",
                sh.head_dim
            )));
        }
        if out.size < out_bytes || arrivals.size < sh.arrival_words() * 4 {
            return Err(Error::InvalidArgument(format!(
                "merged attention output of {} bytes (needs {out_bytes}), arrivals of {}",
                out.size, arrivals.size
            )));
        }
        let pipeline = Self::attend_pipeline(gpu, kind, sh, true, Some(q8), false)?;
        let params = AttendParams { q8_stride: q8_stride as u32, ..AttendParams::new(sh, splits) };
        let [state, qkv, k_cache, v_cache, part, rope] = d.buffers();
        Ok(Self::bind_attend_params(gpu, &pipeline, params, &[state, qkv, k_cache, v_cache, part, rope, arrivals, out]))
    }

    /// Partial values (splits x heads x head_dim) up to which a decode step merges inside
    /// attention (AttentionKernels::bind_attend_merged). The merging workgroup reads them
    /// alone, after every split is done, where the merge dispatch spreads them over many
    /// workgroups. On an H100 (benches/RESULTS.md, round 11), per layer against attend + merge:
    /// Llama-3-8B per head at 17 splits (1K keys, 2,176 values) -1.3 to -2 us, at 64 splits
    /// (8,192) +6 us, its head groups at 64 (32,768) +26 us; SmolLM2 per head at 16 splits
    /// (1,024) -1.7 us, at 64 (4,096) -0.6 us.
    pub const MERGED_MAX_VALUES: u32 = 3072;

    /// Whether a decode step with `keys` keys merges its splits in the attention kernel
    /// (the one [`AttentionKernels::decode_kind`] picks) rather than in a merge dispatch.
    pub fn merges_in_attention(sh: AttnShape, splits: u32, keys: u32) -> bool {
        // The wide kernel's merge spreads its (up to four) heads over four times the
        // invocations: as many values per invocation as one head with 64.
        let heads = match Self::decode_kind(sh, splits, keys) {
            AttendKind::PerHead => 1,
            AttendKind::Grouped => (sh.n_heads / sh.n_kv).min(4),
            // Used only where the splits are too many to merge.
            AttendKind::Wide => return false,
        };
        Self::used_splits(splits, keys) * heads * sh.head_dim <= Self::MERGED_MAX_VALUES
    }

    /// Query heads per KV head from which the grouped kernel is used: with fewer, its vec4
    /// lanes idle (SmolLM2-135M has 3; there it lost at every context on an H100).
    pub const GROUP_MIN_HEADS: u32 = 4;
    /// Keys per split from which decode uses the grouped kernel. On an H100 (Llama-3-8B
    /// shape, benches/RESULTS.md) it lost at 64 keys per split (1K context: fewer, longer
    /// workgroups) and won at 125 (8K: 131.8 -> 136.1 tok/s in f16) and 250 (16K: the cache
    /// read once instead of four times).
    pub const GROUP_MIN_KEYS: u32 = 100;

    /// Splits a step with `keys` keys uses: one per 64-key tile, at most `splits`
    /// (attend*.wgsl and the merges compute the same).
    pub fn used_splits(splits: u32, keys: u32) -> u32 {
        splits.min(keys.div_ceil(64)).max(1)
    }

    /// Keys each split of a step with `keys` keys covers.
    pub fn keys_per_split(splits: u32, keys: u32) -> u32 {
        keys.div_ceil(Self::used_splits(splits, keys))
    }

    /// Head sizes the wide kernel takes: its loads per invocation (head_dim / 16 key words
    /// and values each) are unrolled over a constant.
    pub fn wide_supports(sh: AttnShape) -> bool {
        sh.head_dim == 64 || sh.head_dim == 128
    }

    /// Head sizes whose tiles the per-head kernel loads whole before it computes (attend.wgsl's
    /// PREFETCH): hd / 4 words of keys and of values per invocation, a multiple of 4 (a key's
    /// words over its four invocations) dividing its 64 invocations, and at most 16 each. On
    /// an H200 (benches/RESULTS.md, round 21), GPU ms per token against loading a round at a
    /// time: SmolLM2 shape (hd 64) at 128 keys 0.887 -> 0.861; Llama-3-8B shape (hd 128,
    /// 32 words of each) at 1K 4.940 -> 5.044, and 4.952 with the values loaded after the
    /// softmax: there the held words cost more than the round trips they save.
    pub fn prefetch_supports(sh: AttnShape) -> bool {
        matches!(sh.head_dim, 16 | 32 | 64)
    }

    /// The kernel for a decode step over `keys` keys. With groups of at least
    /// [`AttentionKernels::GROUP_MIN_HEADS`] query heads: per head while its splits merge
    /// inside attention ([`AttentionKernels::merges_in_attention`]); then the wide kernel,
    /// with a merge dispatch after it, up to GROUP_MIN_KEYS keys per split; head groups from
    /// there. On an H100 (8B shape, Q4_0, benches/RESULTS.md, round 13), GPU ms per token
    /// against per head: 2K 2.70 / 2.72, 3K 2.76 / 2.92, 6K 3.24 / 3.29; at 8K (125 keys per
    /// split) 3.28 against head groups' 3.19. At 1K (17 splits) a wide kernel that merged its
    /// own splits lost to the per-head kernel's merge (2.64 against 2.58).
    pub fn decode_kind(sh: AttnShape, splits: u32, keys: u32) -> AttendKind {
        let grouped = sh.n_heads / sh.n_kv >= Self::GROUP_MIN_HEADS;
        let per_split = Self::keys_per_split(splits, keys);
        let per_head_merges = Self::used_splits(splits, keys) * sh.head_dim <= Self::MERGED_MAX_VALUES;
        if grouped && per_split >= Self::GROUP_MIN_KEYS {
            AttendKind::Grouped
        } else if grouped && !per_head_merges && Self::wide_supports(sh) {
            AttendKind::Wide
        } else {
            AttendKind::PerHead
        }
    }

    /// Every kernel decode steps of 1 to `max_ctx` keys use, in order of key count.
    pub fn decode_kinds(sh: AttnShape, splits: u32, max_ctx: u32) -> Vec<AttendKind> {
        let mut kinds: Vec<AttendKind> = vec![];
        for keys in 1..=max_ctx.max(1) {
            let kind = Self::decode_kind(sh, splits, keys);
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    }

    /// The kernel for prefill steps (one split, each query over all its keys).
    pub fn prefill_kind(sh: AttnShape) -> AttendKind {
        if sh.n_heads / sh.n_kv >= Self::GROUP_MIN_HEADS {
            AttendKind::Grouped
        } else {
            AttendKind::PerHead
        }
    }

    /// One workgroup per (query head, or head group of up to four, split, query).
    pub fn attend_groups(sh: AttnShape, splits: u32, n: u32, kind: AttendKind) -> [u32; 3] {
        match kind {
            AttendKind::PerHead => [sh.n_heads, splits, n],
            AttendKind::Grouped | AttendKind::Wide => [sh.n_kv * (sh.n_heads / sh.n_kv).div_ceil(4), splits, n],
        }
    }

    /// Split groups per merge workgroup and splits per group (attn_merge.wgsl): one of each
    /// for one split, 8 x 8 for up to MAX_SPLITS (one round of 8 loads per invocation).
    const MERGE_ONE: (u32, u32) = (1, 1);
    const MERGE_MANY: (u32, u32) = (8, Self::MAX_SPLITS / 8);
    /// Output values per merge workgroup (LANES in attn_merge.wgsl).
    const MERGE_LANES: u32 = 32;

    fn merge_pipeline(gpu: &Gpu, (groups, per): (u32, u32)) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = PipelineKey::new("attn_merge", &[MERGE_WGSL], gpu.flags());
        gpu.pipeline(&key.constant("GROUPS", groups).constant("PER", per))
    }

    /// Merges partials into out [n, n_heads, hd].
    pub fn bind_merge(
        &self,
        gpu: &Gpu,
        sh: AttnShape,
        splits: u32,
        state: &GpuBuffer,
        part: &GpuBuffer,
        out: &GpuBuffer,
    ) -> Bound {
        let params = gpu.uniform(
            "attn_merge",
            &MergeParams { n_heads: sh.n_heads, hd: sh.head_dim, n_splits: splits, q8_stride: 0 },
        );
        let merge = &self.merge[(splits > 1) as usize];
        let bind_group = gpu.bind_group(merge, &[params.binding(), state.binding(), part.binding(), out.binding()]);
        Bound { pipeline: merge.clone(), bind_group, params: Some(params) }
    }

    /// [`AttentionKernels::bind_merge`] with the output quantized to 8 bits per 32 values
    /// ([`crate::kernels::quantize`]'s layout, query t at word `t * q8_words(n_heads *
    /// head_dim)` of xq), for the integer-dot Wo product. Needs head_dim a multiple of 32.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_merge_q8(
        &self,
        gpu: &Gpu,
        sh: AttnShape,
        splits: u32,
        n: u32,
        state: &GpuBuffer,
        part: &GpuBuffer,
        xq: &GpuBuffer,
    ) -> Result<Bound> {
        let k = (sh.n_heads * sh.head_dim) as usize;
        let stride = crate::kernels::quantize::q8_words(k);
        if !sh.head_dim.is_multiple_of(Self::MERGE_LANES) {
            return Err(Error::InvalidArgument(format!(
                "an 8-bit merge output takes heads of a multiple of 32 values, not {}",
                sh.head_dim
            )));
        }
        if xq.size < (n as usize * stride * 4) as u64 {
            return Err(Error::InvalidArgument(format!("xq of {} bytes for {n} vectors of {k}", xq.size)));
        }
        let (groups, per) = if splits > 1 { Self::MERGE_MANY } else { Self::MERGE_ONE };
        let key = PipelineKey::new("attn_merge", &[MERGE_WGSL], gpu.flags()).define("Q8_OUT");
        let pipeline = gpu.pipeline(&key.constant("GROUPS", groups).constant("PER", per))?;
        let params = gpu.uniform(
            "attn_merge_q8",
            &MergeParams { n_heads: sh.n_heads, hd: sh.head_dim, n_splits: splits, q8_stride: stride as u32 },
        );
        let bind_group = gpu.bind_group(&pipeline, &[params.binding(), state.binding(), part.binding(), xq.binding()]);
        Ok(Bound { pipeline, bind_group, params: Some(params) })
    }

    /// One workgroup per (32 output values of a head, head, query): more workgroups than
    /// heads, so that the many splits of a long context spread over the GPU.
    pub fn merge_groups(sh: AttnShape, n: u32) -> [u32; 3] {
        [sh.head_dim.div_ceil(Self::MERGE_LANES), sh.n_heads, n]
    }
}

/// Attention over a set of keys for one query head, before normalisation: running max `m`,
/// denominator `l` (relative to `m`) and unnormalised output `o`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub m: f64,
    pub l: f64,
    pub o: Vec<f64>,
}

impl Partial {
    pub fn empty(hd: usize) -> Partial {
        Partial { m: f64::NEG_INFINITY, l: 0.0, o: vec![0.0; hd] }
    }

    /// Exact log-sum-exp merge of partials over disjoint key sets.
    pub fn merge(&self, other: &Partial) -> Partial {
        if other.l == 0.0 {
            return self.clone();
        }
        if self.l == 0.0 {
            return other.clone();
        }
        let m = self.m.max(other.m);
        let (a, b) = ((self.m - m).exp(), (other.m - m).exp());
        Partial { m, l: self.l * a + other.l * b, o: self.o.iter().zip(&other.o).map(|(x, y)| x * a + y * b).collect() }
    }

    pub fn output(&self) -> Vec<f64> {
        self.o.iter().map(|x| x / self.l).collect()
    }
}

/// CPU reference: the partial of query `q` (already rotated, unscaled) over keys/values rows.
pub fn partial_reference(q: &[f64], keys: &[Vec<f64>], values: &[Vec<f64>], scale: f64) -> Partial {
    let hd = q.len();
    let mut p = Partial::empty(hd);
    for (k, v) in keys.iter().zip(values) {
        let s: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale;
        let one = Partial { m: s, l: 1.0, o: v.clone() };
        p = p.merge(&one);
    }
    p
}

/// CPU reference of rotate-half RoPE at position `pos` (angles as the GPU table has them).
pub fn rope_reference(x: &[f32], inv_freq: &[f32], pos: usize) -> Vec<f64> {
    let half = x.len() / 2;
    let mut out = vec![0f64; x.len()];
    for i in 0..half {
        let a = (pos as f32 * inv_freq[i]) as f64;
        let (s, c) = a.sin_cos();
        let (x0, x1) = (x[i] as f64, x[i + half] as f64);
        out[i] = x0 * c - x1 * s;
        out[i + half] = x1 * c + x0 * s;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    fn f16r(v: f64) -> f64 {
        half::f16::from_f64(v).to_f64()
    }

    /// How a test step runs attention.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Mode {
        /// rope_kv, attend, merge.
        Separate,
        /// The decode kernel that rotates and appends the new key itself, then merge.
        NewKv,
        /// The decode kernel that also merges (attend_merge.wgsl): no merge dispatch.
        Merged,
        /// rope_kv, then attend in one split writing the output itself (prefill's FINAL).
        Output,
    }

    /// Runs rope_kv + attend + merge for `n` new tokens after `past` cached ones (whose K/V
    /// are written by earlier steps of the same kernels) and checks q rotation, the cache
    /// contents and the attention output against f64 references; once with each attention
    /// kernel (per head, head groups, and the wide one where the head size suits it), and
    /// for one-token steps also with the decode variants that rotate and append the new key
    /// themselves, with and without the merge inside (the wide kernel has none).
    fn check(gpu: &Gpu, sh: AttnShape, past: usize, n: usize, splits: u32, seed: u64) {
        let mut kinds = vec![AttendKind::PerHead, AttendKind::Grouped];
        if AttentionKernels::wide_supports(sh) {
            kinds.push(AttendKind::Wide);
        }
        for kind in kinds {
            check_kind(gpu, sh, past, n, splits, seed, kind, Mode::Separate);
            if splits == 1 && kind != AttendKind::Wide {
                check_kind(gpu, sh, past, n, splits, seed, kind, Mode::Output);
            }
            if n == 1 {
                check_kind(gpu, sh, past, n, splits, seed, kind, Mode::NewKv);
                if kind != AttendKind::Wide {
                    check_kind(gpu, sh, past, n, splits, seed, kind, Mode::Merged);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_kind(
        gpu: &Gpu,
        sh: AttnShape,
        past: usize,
        n: usize,
        splits: u32,
        seed: u64,
        kind: AttendKind,
        mode: Mode,
    ) {
        let k = AttentionKernels::new(gpu).unwrap();
        let hd = sh.head_dim as usize;
        let (nh, nkv) = (sh.n_heads as usize, sh.n_kv as usize);
        let mut rng = Rng::new(seed);
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
        let rope = gpu.upload("rope", &rope_table(&inv_freq, sh.max_ctx as usize)).unwrap();
        let total = past + n;
        // Raw (unrotated) q/k/v for every position.
        let qs = rng.vec(total * nh * hd, 1.0);
        let ks = rng.vec(total * nkv * hd, 1.0);
        let vs = rng.vec(total * nkv * hd, 1.0);
        let kc = gpu.storage("kc", sh.cache_bytes()).unwrap();
        let vc = gpu.storage("vc", sh.cache_bytes()).unwrap();
        let state = gpu.storage("state", 16).unwrap();
        let cap = n.max(past).max(1);
        let qb = gpu.storage("q", (cap * nh * hd * 4) as u64).unwrap();
        let row = (nh + 2 * nkv) * hd;
        let qkvb = gpu.storage("qkv", (cap * row * 4) as u64).unwrap();
        let part = gpu.storage("part", sh.partial_floats(cap as u32, splits) * 4).unwrap();
        let out = gpu.storage("out", (cap * nh * hd * 4) as u64).unwrap();
        let arrivals = gpu.storage("arrivals", sh.arrival_words() * 4).unwrap();
        let kq = nh * hd;
        let xq = gpu.storage("xq", (crate::kernels::quantize::q8_words(kq) * 4) as u64).unwrap();
        let rb = k.bind_rope_kv(gpu, sh, &state, &rope, &qkvb, &qb, &kc, &vc);
        let ab = k.bind_attend(gpu, sh, splits, &state, &qb, &kc, &vc, &part, kind).unwrap();
        let decode = DecodeAttention {
            sh,
            splits,
            kind,
            state: &state,
            rope: &rope,
            qkv: &qkvb,
            k_cache: &kc,
            v_cache: &vc,
            part: &part,
        };
        let fb = k.bind_attend_new_kv(gpu, &decode).unwrap();
        let ob =
            (mode == Mode::Output).then(|| k.bind_attend_output(gpu, sh, &state, &qb, &kc, &vc, &out, kind).unwrap());
        let merged = |out: &GpuBuffer, q8: bool| k.bind_attend_merged(gpu, &decode, &arrivals, out, q8);
        let mb = k.bind_merge(gpu, sh, splits, &state, &part, &out);
        let groups = |cnt: usize| AttentionKernels::attend_groups(sh, splits, cnt as u32, kind);
        let step = |start: usize, cnt: usize, mode: Mode| {
            gpu.write(&state, 0, &[start as u32, cnt as u32, 0, 0]);
            let mut rows = Vec::with_capacity(cnt * row);
            for t in start..start + cnt {
                rows.extend_from_slice(&qs[t * nh * hd..(t + 1) * nh * hd]);
                rows.extend_from_slice(&ks[t * nkv * hd..(t + 1) * nkv * hd]);
                rows.extend_from_slice(&vs[t * nkv * hd..(t + 1) * nkv * hd]);
            }
            gpu.write(&qkvb, 0, &rows);
            let mg = if mode == Mode::Merged { Some(merged(&out, false).unwrap()) } else { None };
            crate::kernels::run_pass(gpu, |p| {
                match (mode, &mg, &ob) {
                    (Mode::Merged, Some(b), _) => b.record(p, groups(cnt)),
                    (Mode::NewKv, _, _) => fb.record(p, groups(cnt)),
                    (Mode::Output, _, Some(b)) => {
                        rb.record(p, AttentionKernels::rope_groups(sh, cnt as u32));
                        b.record(p, groups(cnt));
                    }
                    _ => {
                        rb.record(p, AttentionKernels::rope_groups(sh, cnt as u32));
                        ab.record(p, groups(cnt));
                    }
                }
                if !matches!(mode, Mode::Merged | Mode::Output) {
                    mb.record(p, AttentionKernels::merge_groups(sh, cnt as u32));
                }
            })
            .unwrap();
        };
        if past > 0 {
            step(0, past, Mode::Separate);
        }
        step(past, n, mode);
        let what = format!("{sh:?} past {past} n {n} splits {splits} {kind:?} {mode:?} {:?}", gpu.flags());

        // Rotated q of the new tokens (the fused kernels keep theirs in workgroup memory).
        let mut want_q = vec![];
        for t in 0..n {
            for h in 0..nh {
                let b = ((past + t) * nh + h) * hd;
                want_q.extend(rope_reference(&qs[b..b + hd], &inv_freq, past + t));
            }
        }
        if matches!(mode, Mode::Separate | Mode::Output) {
            let got_q: Vec<f32> = gpu.read(&qb, 0, n * nh * hd).unwrap();
            assert_close(&format!("rope q {what}"), &got_q, &want_q, 1e-5, 1e-5);
        }

        // Cache rows: rotated keys and values, rounded to f16.
        let kcache: Vec<half::f16> = gpu.read(&kc, 0, (sh.cache_bytes() / 2) as usize).unwrap();
        let vcache: Vec<half::f16> = gpu.read(&vc, 0, (sh.cache_bytes() / 2) as usize).unwrap();
        let mut keys = vec![vec![]; nkv];
        let mut vals = vec![vec![]; nkv];
        for pos in 0..total {
            for h in 0..nkv {
                let b = (pos * nkv + h) * hd;
                let kr = rope_reference(&ks[b..b + hd], &inv_freq, pos);
                let row = (h * sh.max_ctx as usize + pos) * hd;
                for d in 0..hd {
                    assert!(
                        (kcache[row + d].to_f64() - f16r(kr[d])).abs() <= 1e-3 * (1.0 + kr[d].abs()),
                        "k cache {what}"
                    );
                    assert_eq!(vcache[row + d].to_f64(), f16r(vs[b + d] as f64), "v cache {what}");
                }
                keys[h].push(kr.iter().map(|&x| f16r(x)).collect::<Vec<_>>());
                vals[h].push(vs[b..b + hd].iter().map(|&x| f16r(x as f64)).collect::<Vec<_>>());
            }
        }
        // Attention output, causal.
        let got: Vec<f32> = gpu.read(&out, 0, n * nh * hd).unwrap();
        let mut want = vec![];
        let group = nh / nkv;
        for t in 0..n {
            let pos = past + t;
            for h in 0..nh {
                let q = &want_q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                let kh = h / group;
                let p = partial_reference(q, &keys[kh][..=pos], &vals[kh][..=pos], 1.0 / (hd as f64).sqrt());
                want.extend(p.output());
            }
        }
        assert_close(&format!("attention {what}"), &got, &want, 2e-4, 2e-3);
        // The output written by attend itself is the merge's of its one split, bit for bit
        // (the step again through attend and merge; rope_kv rewrites the same cache rows).
        if mode == Mode::Output {
            step(past, n, Mode::Separate);
            let merged: Vec<f32> = gpu.read(&out, 0, n * nh * hd).unwrap();
            assert!(got.iter().zip(&merged).all(|(a, b)| a.to_bits() == b.to_bits()), "output vs merge {what}");
        }
        // The merged kernel again (its last workgroups left the arrival counts at zero), with
        // the 8-bit output: the blocks of the f32 output as quantize_q8 makes them. The
        // step's key and value are written again, unchanged.
        if mode == Mode::Merged {
            let bound = merged(&xq, true);
            if !hd.is_multiple_of(32) {
                assert!(bound.is_err(), "{what}");
                return;
            }
            let b = bound.unwrap();
            crate::kernels::run_pass(gpu, |p| b.record(p, groups(1))).unwrap();
            let words: Vec<u32> = gpu.read(&xq, 0, crate::kernels::quantize::q8_words(kq)).unwrap();
            let blocks = crate::kernels::quantize::unpack(&words, kq);
            let wanted = crate::kernels::quantize::reference(&got[..kq]);
            crate::kernels::quantize::tests::check(&format!("merged q8 {what}"), &blocks, &wanted);
        }
    }

    #[test]
    fn rope_attend_merge_match_reference() {
        for gpu in variants() {
            // Odd shapes: GQA, a single KV head, few and many splits, partial tiles.
            check(gpu, AttnShape { n_heads: 4, n_kv: 2, head_dim: 8, max_ctx: 50 }, 0, 1, 1, 1);
            check(gpu, AttnShape { n_heads: 3, n_kv: 1, head_dim: 24, max_ctx: 97 }, 30, 3, 5, 2);
            check(gpu, AttnShape { n_heads: 2, n_kv: 2, head_dim: 16, max_ctx: 300 }, 0, 131, 2, 3);
            // SmolLM2-135M decode and prefill shapes.
            check(gpu, AttnShape { n_heads: 9, n_kv: 3, head_dim: 64, max_ctx: 400 }, 0, 37, 1, 4);
            check(gpu, AttnShape { n_heads: 9, n_kv: 3, head_dim: 64, max_ctx: 400 }, 300, 1, 16, 5);
        }
        // Llama-3-8B head shape (32 heads over 8 KV heads, 128 dims), one variant per size.
        let gpu = &variants()[0];
        check(gpu, AttnShape { n_heads: 32, n_kv: 8, head_dim: 128, max_ctx: 600 }, 500, 1, 16, 6);
        check(gpu, AttnShape { n_heads: 32, n_kv: 8, head_dim: 128, max_ctx: 600 }, 64, 9, 2, 7);
        check(gpu, AttnShape { n_heads: 32, n_kv: 8, head_dim: 128, max_ctx: 600 }, 30, 20, 1, 14);
        // Eight query heads per KV head (two head groups), and five (a group of four and one
        // of one).
        check(gpu, AttnShape { n_heads: 8, n_kv: 1, head_dim: 32, max_ctx: 300 }, 200, 1, 8, 10);
        check(gpu, AttnShape { n_heads: 10, n_kv: 2, head_dim: 16, max_ctx: 300 }, 0, 70, 1, 11);
        // All 64 splits in use at a long context (65 tiles), and few of them at a short one.
        check(gpu, AttnShape { n_heads: 2, n_kv: 1, head_dim: 8, max_ctx: 4200 }, 4150, 1, 64, 8);
        check(gpu, AttnShape { n_heads: 2, n_kv: 1, head_dim: 8, max_ctx: 4200 }, 200, 2, 64, 9);
        // Splits of several tiles (520 keys each) and the first step of an empty cache, at
        // head sizes the wide kernel takes.
        check(gpu, AttnShape { n_heads: 4, n_kv: 1, head_dim: 64, max_ctx: 4200 }, 4150, 1, 8, 12);
        check(gpu, AttnShape { n_heads: 8, n_kv: 2, head_dim: 64, max_ctx: 100 }, 0, 1, 4, 13);
    }

    /// Which kernel decode steps use, by keys per split and head group size.
    #[test]
    fn decode_kernel_by_keys_per_split() {
        let llama = AttnShape { n_heads: 32, n_kv: 8, head_dim: 128, max_ctx: 16384 };
        let smol = AttnShape { n_heads: 9, n_kv: 3, head_dim: 64, max_ctx: 8192 };
        let kind = AttentionKernels::decode_kind;
        // Splits that merge inside attention (up to 24 of 128 values): per head; then the
        // wide kernel up to 99 keys per split; then head groups.
        assert_eq!(kind(llama, 64, 1), AttendKind::PerHead);
        assert_eq!(kind(llama, 64, 24 * 64), AttendKind::PerHead);
        assert_eq!(kind(llama, 64, 24 * 64 + 1), AttendKind::Wide);
        assert_eq!(kind(llama, 64, 64 * 99), AttendKind::Wide);
        assert_eq!(kind(llama, 64, 64 * 99 + 1), AttendKind::Grouped);
        let kinds = AttentionKernels::decode_kinds(llama, 64, 16384);
        assert_eq!(kinds, [AttendKind::PerHead, AttendKind::Wide, AttendKind::Grouped]);
        // Three heads per KV head: per head at every length.
        assert_eq!(AttentionKernels::decode_kinds(smol, 64, 8192), [AttendKind::PerHead]);
        // Heads the wide kernel does not take.
        let big = AttnShape { head_dim: 256, ..llama };
        assert_eq!(kind(big, 64, 4000), AttendKind::PerHead);
    }

    /// Head sizes whose tiles the per-head kernel loads whole.
    #[test]
    fn tiles_prefetched_where_their_words_fit() {
        let sh = |head_dim| AttnShape { n_heads: 4, n_kv: 1, head_dim, max_ctx: 64 };
        let fits: Vec<u32> = (1..=256).filter(|&hd| AttentionKernels::prefetch_supports(sh(hd))).collect();
        assert_eq!(fits, [16, 32, 64]);
    }

    /// Which decode steps merge inside attention: few partial values per merging workgroup.
    #[test]
    fn merged_attention_only_over_few_partials() {
        let llama = AttnShape { n_heads: 32, n_kv: 8, head_dim: 128, max_ctx: 16384 };
        let smol = AttnShape { n_heads: 9, n_kv: 3, head_dim: 64, max_ctx: 8192 };
        let m = AttentionKernels::merges_in_attention;
        // 24 splits of 128 values per head fit, 25 do not; head groups (4 heads) at 16K not.
        assert!(m(llama, 64, 1056) && m(llama, 64, 24 * 64) && !m(llama, 64, 24 * 64 + 1));
        assert!(!m(llama, 64, 16384));
        // SmolLM2 (3 heads per KV head: the per-head kernel) up to 48 splits.
        assert!(m(smol, 64, 48 * 64) && !m(smol, 64, 48 * 64 + 1));
        // At most 16 splits: 1K keys per head (16 x 128), 16K keys through head groups
        // (16 x 4 x 128).
        assert!(m(llama, 16, 1024) && !m(llama, 16, 16384));
    }

    #[test]
    fn merging_any_split_equals_attention_over_the_union() {
        let mut rng = Rng::new(11);
        let hd = 16;
        let n = 37;
        let q: Vec<f64> = rng.vec(hd, 2.0).iter().map(|&x| x as f64).collect();
        let keys: Vec<Vec<f64>> = (0..n).map(|_| rng.vec(hd, 2.0).iter().map(|&x| x as f64).collect()).collect();
        let vals: Vec<Vec<f64>> = (0..n).map(|_| rng.vec(hd, 1.0).iter().map(|&x| x as f64).collect()).collect();
        let whole = partial_reference(&q, &keys, &vals, 0.25).output();
        for cut in [0, 1, 17, 36, 37] {
            let a = partial_reference(&q, &keys[..cut], &vals[..cut], 0.25);
            let b = partial_reference(&q, &keys[cut..], &vals[cut..], 0.25);
            for (x, y) in a.merge(&b).output().iter().zip(&whole) {
                assert!((x - y).abs() < 1e-12);
            }
        }
    }

    /// The merge alone on random partials: few and many splits (odd counts, more splits than
    /// the context uses, some splits without keys), head sizes that are and are not multiples
    /// of 32, odd head counts and several queries.
    #[test]
    fn merge_matches_reference() {
        let gpu = &variants()[0];
        let k = AttentionKernels::new(gpu).unwrap();
        let cases = [
            // (heads, hd, splits, past, n)
            (9, 64, 1, 0, 5),
            (9, 64, 2, 100, 3),
            (9, 64, 37, 5000, 2),
            (9, 64, 64, 4000, 1),
            (32, 128, 64, 4100, 2),
            (3, 128, 64, 20, 70),
            (5, 128, 37, 2300, 1),
            (3, 24, 64, 4090, 3),
            (1, 8, 5, 200, 4),
        ];
        for (seed, &(nh, hd, splits, past, n)) in cases.iter().enumerate() {
            let sh = AttnShape { n_heads: nh, n_kv: 1, head_dim: hd, max_ctx: past + n };
            let mut rng = Rng::new(seed as u64 + 100);
            let (nh, hd, ns) = (nh as usize, hd as usize, splits as usize);
            let mut parts = vec![];
            let mut data = vec![0f32; sh.partial_floats(n, splits) as usize];
            for t in 0..n as usize {
                let used = ns.min((past as usize + t + 1).div_ceil(64));
                for h in 0..nh {
                    let mut want = Partial::empty(hd);
                    for s in 0..ns {
                        let at = ((t * nh + h) * ns + s) * (hd + 2);
                        let row = &mut data[at..at + hd + 2];
                        // Splits past `used` hold garbage the merge must not read; every
                        // seventh split in use has no keys.
                        if s >= used {
                            row.fill(f32::NAN);
                            continue;
                        }
                        let empty = s % 7 == 6;
                        let p = Partial {
                            m: if empty { -3.0e38 } else { (rng.uniform() * 8.0) as f64 },
                            l: if empty { 0.0 } else { (1.5 + rng.uniform()) as f64 },
                            o: rng.vec(hd, 2.0).iter().map(|&x| if empty { 0.0 } else { x as f64 }).collect(),
                        };
                        for (r, &o) in row.iter_mut().zip(&p.o) {
                            *r = o as f32;
                        }
                        row[hd] = p.m as f32;
                        row[hd + 1] = p.l as f32;
                        want = want.merge(&p);
                    }
                    parts.push(want);
                }
            }
            let part = gpu.upload("part", &data).unwrap();
            let state = gpu.upload("state", &[past, n, 0, 0]).unwrap();
            let out = gpu.storage("out", (n as usize * nh * hd * 4) as u64).unwrap();
            let mb = k.bind_merge(gpu, sh, splits, &state, &part, &out);
            crate::kernels::run_pass(gpu, |p| mb.record(p, AttentionKernels::merge_groups(sh, n))).unwrap();
            let got: Vec<f32> = gpu.read(&out, 0, n as usize * nh * hd).unwrap();
            let want: Vec<f64> = parts.iter().flat_map(|p| p.output()).collect();
            assert_close(&format!("merge {sh:?} splits {splits} past {past} n {n}"), &got, &want, 1e-5, 1e-4);
            // The 8-bit output: the blocks of the f32 output as quantize_q8 makes them.
            let kq = nh * hd;
            let stride = crate::kernels::quantize::q8_words(kq);
            let xq = gpu.storage("xq", (n as usize * stride * 4) as u64).unwrap();
            let bound = k.bind_merge_q8(gpu, sh, splits, n, &state, &part, &xq);
            if hd % 32 != 0 {
                assert!(bound.is_err());
                continue;
            }
            let mb = bound.unwrap();
            crate::kernels::run_pass(gpu, |p| mb.record(p, AttentionKernels::merge_groups(sh, n))).unwrap();
            let words: Vec<u32> = gpu.read(&xq, 0, n as usize * stride).unwrap();
            for t in 0..n as usize {
                let blocks = crate::kernels::quantize::unpack(&words[t * stride..], kq);
                let wanted = crate::kernels::quantize::reference(&got[t * kq..(t + 1) * kq]);
                crate::kernels::quantize::tests::check(&format!("merge q8 {sh:?} t {t}"), &blocks, &wanted);
            }
        }
    }
}
