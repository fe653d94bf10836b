//! Shader variants. WGSL has no preprocessor, so kernels mark variant-specific lines with
//! `#if NAME` / `#if !NAME` / `#else` / `#endif` (whole lines) and sizes with `override`
//! constants; a [`PipelineKey`] names the sources, the defines and the constants of a variant.

use super::Caps;
use crate::error::{Error, Result};

/// The capability bits a shader variant depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShaderFlags {
    pub f16: bool,
    pub subgroups: bool,
}

impl ShaderFlags {
    pub fn from_caps(caps: &Caps) -> ShaderFlags {
        ShaderFlags { f16: caps.f16, subgroups: caps.subgroups }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub name: &'static str,
    pub entry: &'static str,
    /// Concatenated in order (shared helpers first).
    pub sources: Vec<&'static str>,
    pub flags: ShaderFlags,
    /// Extra names that `#if` tests (e.g. the weight format `W_Q4_1`).
    pub defines: Vec<&'static str>,
    /// Values for `override` constants.
    pub constants: Vec<(&'static str, u32)>,
}

impl PipelineKey {
    pub fn new(name: &'static str, sources: &[&'static str], flags: ShaderFlags) -> PipelineKey {
        PipelineKey {
            name,
            entry: "main",
            sources: sources.to_vec(),
            flags,
            defines: Vec::new(),
            constants: Vec::new(),
        }
    }
    pub fn entry(mut self, entry: &'static str) -> Self {
        self.entry = entry;
        self
    }
    pub fn define(mut self, d: &'static str) -> Self {
        self.defines.push(d);
        self
    }
    pub fn constant(mut self, name: &'static str, v: u32) -> Self {
        self.constants.push((name, v));
        self
    }
}

/// The WGSL text of a variant.
pub fn compose(key: &PipelineKey) -> Result<String> {
    let mut defines: Vec<&str> = key.defines.clone();
    if key.flags.f16 {
        defines.push("F16");
    }
    if key.flags.subgroups {
        defines.push("SUBGROUPS");
    }
    let mut out = String::new();
    if key.flags.f16 {
        out.push_str("enable f16;\n");
    }
    // Directives must precede every declaration, so the variant that uses matrix units asks
    // for its extension through a define.
    if key.defines.contains(&"COOP") {
        out.push_str("enable wgpu_cooperative_matrix;\n");
    }
    for src in &key.sources {
        preprocess(src, &defines, &mut out).map_err(|e| Error::Gpu(format!("shader {}: {e}", key.name)))?;
    }
    Ok(out)
}

fn preprocess(src: &str, defines: &[&str], out: &mut String) -> std::result::Result<(), String> {
    // Each open #if holds (branch taken, parent active).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &Vec<(bool, bool)>| stack.last().map(|&(t, p)| t && p).unwrap_or(true);
    for (n, line) in src.lines().enumerate() {
        let t = line.trim_start();
        if let Some(cond) = t.strip_prefix("#if ") {
            let cond = cond.trim();
            let (neg, name) = match cond.strip_prefix('!') {
                Some(n) => (true, n.trim()),
                None => (false, cond),
            };
            let taken = defines.contains(&name) != neg;
            let parent = active(&stack);
            stack.push((taken, parent));
        } else if t.starts_with("#else") {
            let top = stack.last_mut().ok_or(format!("line {}: #else without #if", n + 1))?;
            top.0 = !top.0;
        } else if t.starts_with("#endif") {
            stack.pop().ok_or(format!("line {}: #endif without #if", n + 1))?;
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err("unterminated #if".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessor_selects_branches() {
        let src = "a\n#if F16\nb\n#if !X\nc\n#else\nd\n#endif\n#else\ne\n#endif\nf\n";
        let mut out = String::new();
        preprocess(src, &["F16"], &mut out).unwrap();
        assert_eq!(out, "a\nb\nc\nf\n");
        out.clear();
        preprocess(src, &["X"], &mut out).unwrap();
        assert_eq!(out, "a\ne\nf\n");
        assert!(preprocess("#if A\n", &[], &mut out).is_err());
        assert!(preprocess("#endif\n", &[], &mut out).is_err());
    }
}
