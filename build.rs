//! Compiles kernels/*.cu to PTX with nvcc (compute_80) and embeds it; without nvcc,
//! embeds the sources (headers inlined) for NVRTC at run time.
//!
//! nvcc is looked up in `KESTREL_NVCC`, then `$CUDA_HOME/bin/nvcc`, then `PATH`.
//! `KESTREL_REQUIRE_NVCC=1` turns a missing nvcc into a build error (CI uses it);
//! `KESTREL_NO_NVCC=1` skips nvcc even when present (to exercise the NVRTC path).
//! A kernel that nvcc rejects fails the build with nvcc's message.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH: &str = "compute_80";

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "KESTREL_NVCC",
        "CUDA_HOME",
        "KESTREL_REQUIRE_NVCC",
        "KESTREL_NO_NVCC",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kdir = Path::new("kernels");
    let mut files: Vec<PathBuf> = fs::read_dir(kdir)
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let nvcc = if env::var("KESTREL_NO_NVCC").is_ok_and(|v| v == "1") {
        None
    } else {
        find_nvcc()
    };
    if nvcc.is_none() && env::var("KESTREL_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
        panic!("KESTREL_REQUIRE_NVCC=1 but no nvcc found (KESTREL_NVCC, CUDA_HOME/bin/nvcc, PATH)");
    }
    if nvcc.is_none() {
        println!("cargo:warning=nvcc not found: kernels are embedded as source and compiled with NVRTC at first use");
    }

    let mut gen = String::from("pub static KERNEL_FILES: &[KernelFile] = &[\n");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let raw = fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        let source = inline_includes(&raw, kdir, &mut Vec::new());
        let entries = parse_entries(&raw);
        let src_path = out.join(format!("{name}.src"));
        fs::write(&src_path, &source).unwrap();
        let ptx = nvcc.as_ref().map(|nvcc| {
            let ptx_path = out.join(format!("{name}.ptx"));
            compile_ptx(nvcc, f, &ptx_path);
            ptx_path
        });
        writeln!(gen, "    KernelFile {{ file: {name:?}, source: include_str!({:?}), ptx: {}, entries: &{entries:?} }},",
            src_path.display().to_string(),
            match &ptx { Some(p) => format!("Some(include_str!({:?}))", p.display().to_string()), None => "None".into() },
        ).unwrap();
    }
    gen.push_str("];\n");
    fs::write(out.join("kernels_gen.rs"), gen).unwrap();
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("KESTREL_NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        panic!("KESTREL_NVCC={} is not a file", p.display());
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

fn compile_ptx(nvcc: &Path, src: &Path, out: &Path) {
    let res = Command::new(nvcc)
        .args([
            "-ptx",
            &format!("-arch={ARCH}"),
            "-std=c++17",
            "-lineinfo",
            "-Ikernels",
            "-o",
        ])
        .arg(out)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    if !res.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
    }
}

/// Replace `#include "x.cuh"` with the header's text (once per header), so NVRTC
/// needs no include paths.
fn inline_includes(src: &str, dir: &Path, seen: &mut Vec<String>) -> String {
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.split('"').next().unwrap_or_default().to_string();
            if !seen.contains(&name) {
                seen.push(name.clone());
                let path = dir.join(&name);
                println!("cargo:rerun-if-changed={}", path.display());
                let text = fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("include {}: {e}", path.display()));
                out.push_str(&inline_includes(&text, dir, seen));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Names of the `extern "C" __global__` functions in a source file.
fn parse_entries(src: &str) -> Vec<String> {
    let code = strip_comments(src);
    let mut names = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + "extern \"C\"".len()..];
        let head = rest.trim_start();
        if !head.starts_with("__global__") {
            continue;
        }
        let Some(paren) = head.find('(') else { break };
        // Skip `__launch_bounds__(...)`: the name is the identifier right before the
        // first '(' that is not an attribute.
        let mut upto = head;
        let mut offset = 0;
        loop {
            let p = upto[offset..]
                .find('(')
                .map(|p| p + offset)
                .unwrap_or(paren);
            let before = upto[..p].trim_end();
            let ident: String = before
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if ident == "__launch_bounds__" {
                let close = upto[p..].find(')').map(|c| c + p + 1).unwrap_or(upto.len());
                offset = close;
                continue;
            }
            names.push(ident);
            upto = &upto[p..];
            break;
        }
        rest = upto;
    }
    names
}

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}
