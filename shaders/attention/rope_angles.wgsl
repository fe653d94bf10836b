// The rotary embedding's cos and sin for pairs i..i+3 at position pos, from the table
// `rope` ([max_ctx][hd / 2] of (cos, sin), computed on the CPU in f64) that the including
// kernel declares. Used by rope_kv.wgsl (prefill) and the decode attention (NEW_KV).
fn rope_cos_sin(pos: u32, i: u32, half_d: u32) -> array<vec4<f32>, 2> {
    let b = pos * half_d + i;
    let cs0 = rope[b];
    let cs1 = rope[b + 1u];
    let cs2 = rope[b + 2u];
    let cs3 = rope[b + 3u];
    return array<vec4<f32>, 2>(vec4<f32>(cs0.x, cs1.x, cs2.x, cs3.x), vec4<f32>(cs0.y, cs1.y, cs2.y, cs3.y));
}
