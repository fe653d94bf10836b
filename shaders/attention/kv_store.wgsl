// Half-precision K/V rows, read and written four elements at a time. With shader-f16 the
// cache is an array of vec4<f16>; without, the same bytes as pairs of packed u32 words.

#if F16
alias KvWord = vec4<f16>;
fn kv_unpack(w: KvWord) -> vec4<f32> { return vec4<f32>(w); }
fn kv_pack(v: vec4<f32>) -> KvWord { return vec4<f16>(v); }
#else
alias KvWord = vec2<u32>;
fn kv_unpack(w: KvWord) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
fn kv_pack(v: vec4<f32>) -> KvWord {
    return vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw));
}
#endif
