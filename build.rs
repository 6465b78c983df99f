//! Compiles kernels/*.cu to PTX with nvcc (compute_80) and embeds it; without nvcc,
//! embeds the sources (headers inlined) for NVRTC at run time.
//!
//! nvcc is looked up in `KESTREL_NVCC`, then `$CUDA_HOME/bin/nvcc`, then `PATH`.
//! `KESTREL_REQUIRE_NVCC=1` turns a missing nvcc into a build error (CI uses it);
//! `KESTREL_NO_NVCC=1` skips nvcc even when present (to exercise the NVRTC path).
//! A kernel that nvcc rejects fails the build with nvcc's message.
//!
//! It also builds the emulated CUDA device (see `emu` below and kernels/emu/shim.h):
//! every kernels/*.cu compiled as host C++ with the shim, plus one trampoline per
//! entry, into a static library linked into the crate (`cfg(kestrel_emu)`). Without a
//! C++ compiler the emulator is left out with a warning; `KESTREL_EMU=0` leaves it
//! out on purpose, and so does building without the `emulator` Cargo feature. `KESTREL_EMU_SANITIZE=address|thread` builds the emulated kernels
//! with AddressSanitizer or ThreadSanitizer and links that runtime statically into
//! the crate's binaries and tests.

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
        "KESTREL_EMU",
        "KESTREL_EMU_SANITIZE",
        "PATH",
        "LD_LIBRARY_PATH",
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
    // What the kernel-build tests can check in this build (tests/kernels_build.rs marks
    // the others ignored, with the reason, rather than letting them pass untested).
    println!("cargo:rustc-check-cfg=cfg(kestrel_ptx)");
    println!("cargo:rustc-check-cfg=cfg(kestrel_nvrtc)");
    if nvcc.is_some() {
        println!("cargo:rustc-cfg=kestrel_ptx");
    }
    if nvrtc_library_found() {
        println!("cargo:rustc-cfg=kestrel_nvrtc");
    }

    let mut gen = String::from(
        "/// Every kernels/*.cu file compiled into the crate, in file-name order.\npub static KERNEL_FILES: &[KernelFile] = &[\n",
    );
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

    emu::build(kdir, &files, &out);
}

/// Whether a libnvrtc shared library is in `LD_LIBRARY_PATH`, `$CUDA_HOME/lib64` or
/// the usual system directories (where the dynamic loader will look at run time).
fn nvrtc_library_found() -> bool {
    let mut dirs: Vec<PathBuf> = env::var_os("LD_LIBRARY_PATH")
        .map(|v| env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CUDA_HOME") {
        dirs.push(Path::new(&home).join("lib64"));
        dirs.push(Path::new(&home).join("lib"));
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.iter().any(|d| {
        fs::read_dir(d).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so"))
        })
    })
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

/// The emulated device: kernels/*.cu as host C++ (see kernels/emu/shim.h).
mod emu {
    use std::env;
    use std::fmt::Write as _;
    use std::fs;
    use std::path::{Path, PathBuf};

    pub fn build(kdir: &Path, files: &[PathBuf], out: &Path) {
        println!("cargo:rustc-check-cfg=cfg(kestrel_emu)");
        // Launch records (which kernels emulated tests ran) live beside the profile
        // directories, so `kestrel kernels` of any profile finds them.
        let record = out
            .ancestors()
            .nth(4)
            .unwrap_or(out)
            .join("kestrel-emu-launches");
        println!(
            "cargo:rustc-env=KESTREL_EMU_RECORD_DIR={}",
            record.display()
        );
        // Without the `emulator` feature (an embedding build) the C++ runtime is not
        // compiled at all, silently: nothing asked for it.
        if env::var_os("CARGO_FEATURE_EMULATOR").is_none() {
            return;
        }
        if env::var("KESTREL_EMU").is_ok_and(|v| v == "0") {
            println!("cargo:warning=KESTREL_EMU=0: the emulated CUDA device is not built");
            return;
        }
        let sanitize = env::var("KESTREL_EMU_SANITIZE").unwrap_or_default();
        if !["", "address", "thread"].contains(&sanitize.as_str()) {
            panic!("KESTREL_EMU_SANITIZE={sanitize}: expected `address` or `thread`");
        }
        let probe = cc::Build::new()
            .cpp(true)
            .cargo_warnings(false)
            .try_get_compiler();
        let cxx_ok = probe.is_ok_and(|c| {
            std::process::Command::new(c.path())
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !cxx_ok {
            println!("cargo:warning=no C++ compiler found: the emulated CUDA device is not built");
            return;
        }

        let src = out.join("emu");
        fs::create_dir_all(&src).unwrap();
        // Headers: rewritten copies, so `extern __shared__` works in them too.
        for e in fs::read_dir(kdir).expect("kernels/").flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cuh") {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let text = fs::read_to_string(&p).unwrap();
                fs::write(src.join(&name), rewrite(&text, &format!("kernels/{name}"))).unwrap();
            }
        }
        let mut units = Vec::new();
        let mut table = String::from("#include \"shim.h\"\n");
        let mut all = Vec::new();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let stem = f
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .replace(|c: char| !c.is_alphanumeric(), "_");
            let text = fs::read_to_string(f).unwrap();
            let entries = super::parse_entries(&text);
            let mut tu = String::from("#include \"shim.h\"\n");
            writeln!(tu, "namespace kemu_file_{stem} {{").unwrap();
            tu.push_str(&rewrite(&text, &format!("kernels/{name}")));
            tu.push_str("\n}\n");
            for e in &entries {
                writeln!(
                    tu,
                    "static void kemu_tramp_{e}(void** a) {{ kemu::Sig<decltype(kemu_file_{stem}::{e})>::call(&kemu_file_{stem}::{e}, a); }}\n\
                     extern \"C\" const kemu::EntryInfo kemu_info_{e} = {{\"{e}\", &kemu_tramp_{e}, \
                     kemu::Sig<decltype(kemu_file_{stem}::{e})>::n, kemu::Sig<decltype(kemu_file_{stem}::{e})>::params}};"
                )
                .unwrap();
                writeln!(table, "extern \"C\" const kemu::EntryInfo kemu_info_{e};").unwrap();
                all.push(e.clone());
            }
            let path = src.join(format!("{stem}.cpp"));
            fs::write(&path, tu).unwrap();
            units.push(path);
        }
        table.push_str("extern \"C\" const kemu::EntryInfo* const kemu_entries[] = {");
        for e in &all {
            write!(table, "&kemu_info_{e}, ").unwrap();
        }
        writeln!(
            table,
            "nullptr}};\nextern \"C\" const unsigned long kemu_entry_count = {};",
            all.len()
        )
        .unwrap();
        let table_path = src.join("kemu_table.cpp");
        fs::write(&table_path, table).unwrap();

        let base = |b: &mut cc::Build| {
            b.cpp(true)
                .std("c++17")
                .include(kdir.join("emu"))
                .include(&src)
                .opt_level(3)
                .flag("-ffp-contract=off")
                .debug(true)
                .warnings(false)
                .extra_warnings(false)
                .flag("-pthread")
                .flag("-ftls-model=initial-exec")
                .flag_if_supported("-fno-strict-aliasing")
                .cargo_metadata(false);
        };
        // Kernel units compile in parallel: g++ is the slow part of this build.
        let jobs: usize = env::var("NUM_JOBS")
            .ok()
            .and_then(|j| j.parse().ok())
            .unwrap_or(2)
            .max(1);
        let chunks: Vec<Vec<PathBuf>> = (0..jobs)
            .map(|j| units.iter().skip(j).step_by(jobs).cloned().collect())
            .filter(|c: &Vec<PathBuf>| !c.is_empty())
            .collect();
        // The runtime (never instrumented: it only tells the sanitizers about its
        // fiber switches) and the entry table compile alongside the kernels.
        let runtime = [kdir.join("emu/runtime.cpp"), table_path.clone()];
        let (base_ref, sanitize_ref, runtime_ref) = (&base, &sanitize, &runtime);
        let objects: Vec<PathBuf> = std::thread::scope(|s| {
            let mut handles: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    s.spawn(move || {
                        let (base, sanitize) = (base_ref, sanitize_ref);
                        let mut b = cc::Build::new();
                        base(&mut b);
                        match sanitize.as_str() {
                            "address" => {
                                b.flag("-fsanitize=address")
                                    .flag("-fno-omit-frame-pointer")
                                    .opt_level(1);
                            }
                            "thread" => {
                                b.flag("-fsanitize=thread").opt_level(1);
                            }
                            _ => {}
                        }
                        b.files(chunk);
                        b.try_compile_intermediates().map_err(|e| {
                            format!(
                                "the emulated CUDA device failed to compile a kernel with the host shim \
                                 (kernels/emu/shim.h); fix the kernel or the shim, or build with KESTREL_EMU=0:\n{e}"
                            )
                        })
                    })
                })
                .collect();
            handles.push(s.spawn(move || {
                let mut b = cc::Build::new();
                base_ref(&mut b);
                match sanitize_ref.as_str() {
                    "address" => {
                        b.define("KEMU_ASAN", None);
                    }
                    "thread" => {
                        b.define("KEMU_TSAN", None);
                    }
                    _ => {}
                }
                b.files(runtime_ref);
                b.try_compile_intermediates().map_err(|e| {
                    format!(
                        "building the emulated CUDA device runtime (kernels/emu/runtime.cpp): {e}"
                    )
                })
            }));
            handles
                .into_iter()
                .flat_map(|h| match h.join().expect("compile thread") {
                    Ok(o) => o,
                    Err(e) => panic!("{e}"),
                })
                .collect()
        });
        let mut lib = cc::Build::new();
        base(&mut lib);
        lib.cargo_metadata(true).objects(objects);
        if let Err(e) = lib.try_compile("kestrel_emu") {
            panic!("archiving the emulated CUDA device: {e}");
        }
        if !sanitize.is_empty() {
            link_sanitizer_runtime(&sanitize);
        }
        println!("cargo:rustc-cfg=kestrel_emu");
    }

    /// Link libasan/libtsan statically into the crate's binaries and tests, as
    /// `g++ -static-libasan` would: the runtime must be complete (whole archive) and
    /// initialised first (its preinit object).
    fn link_sanitizer_runtime(kind: &str) {
        let lib = if kind == "address" { "asan" } else { "tsan" };
        let cxx = cc::Build::new().cpp(true).get_compiler();
        let find = |f: &str| -> String {
            let o = std::process::Command::new(cxx.path())
                .arg(format!("-print-file-name={f}"))
                .output()
                .expect("asking the C++ compiler for its sanitizer runtime");
            let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !Path::new(&p).is_file() {
                panic!("KESTREL_EMU_SANITIZE={kind}: {f} not found (install the compiler's lib{lib} package)");
            }
            p
        };
        let archive = find(&format!("lib{lib}.a"));
        let preinit = find(&format!("lib{lib}_preinit.o"));
        for arg in [
            "-Wl,--whole-archive".to_string(),
            archive,
            "-Wl,--no-whole-archive".to_string(),
            preinit,
            "-lstdc++".to_string(),
            "-ldl".to_string(),
            "-lrt".to_string(),
            "-lm".to_string(),
            "-lpthread".to_string(),
        ] {
            println!("cargo:rustc-link-arg={arg}");
        }
    }

    /// The text g++ compiles for a kernel file or header: line-for-line the same (a
    /// `#line` keeps reports pointing at the original), with each
    /// `extern __shared__ T name[];` turned into a macro for the block's dynamic
    /// shared memory, undefined again where the enclosing block closes.
    pub fn rewrite(text: &str, shown: &str) -> String {
        let mut out = format!("#line 1 \"{shown}\"\n");
        let depths = brace_depths(text);
        // (macro name, depth of the block that declared it)
        let mut live: Vec<(String, i64)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let depth_after = depths[i];
            if let Some((ty, name)) = dynamic_shared_decl(line) {
                let depth_before = if i == 0 { 0 } else { depths[i - 1] };
                writeln!(out, "#undef {name}").unwrap();
                writeln!(
                    out,
                    "#define {name} (reinterpret_cast<{ty}*>(::kemu::dynamic_shared()))"
                )
                .unwrap();
                writeln!(out, "#line {} \"{shown}\"", i + 2).unwrap();
                live.push((name, depth_before));
                continue;
            }
            out.push_str(line);
            out.push('\n');
            let closed: Vec<String> = live
                .iter()
                .filter(|(_, d)| *d > 0 && depth_after < *d)
                .map(|(n, _)| n.clone())
                .collect();
            if !closed.is_empty() {
                for n in &closed {
                    writeln!(out, "#undef {n}").unwrap();
                }
                writeln!(out, "#line {} \"{shown}\"", i + 2).unwrap();
                live.retain(|(n, _)| !closed.contains(n));
            }
        }
        out
    }

    /// `extern __shared__ <type> <name>[];` -> (type without alignment attributes, name).
    fn dynamic_shared_decl(line: &str) -> Option<(String, String)> {
        let code = line.split("//").next().unwrap_or("").trim();
        let rest = code
            .strip_prefix("extern")?
            .trim_start()
            .strip_prefix("__shared__")?;
        let rest = rest
            .trim()
            .strip_suffix(';')?
            .trim_end()
            .strip_suffix("[]")?
            .trim_end();
        let name: String = rest
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if name.is_empty() {
            return None;
        }
        let mut ty = rest[..rest.len() - name.len()].to_string();
        for attr in ["__align__", "alignas", "__attribute__"] {
            while let Some(s) = ty.find(attr) {
                let open = ty[s..].find('(').map(|o| o + s)?;
                let mut depth = 0;
                let mut end = open;
                for (k, c) in ty[open..].char_indices() {
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                ty.replace_range(s..end, "");
            }
        }
        let ty = ty.split_whitespace().collect::<Vec<_>>().join(" ");
        (!ty.is_empty()).then_some((ty, name))
    }

    /// Brace depth at the end of each line, ignoring comments, strings and chars.
    fn brace_depths(text: &str) -> Vec<i64> {
        let mut depths = Vec::new();
        let mut depth = 0i64;
        let mut in_block = false;
        for line in text.lines() {
            let b = line.as_bytes();
            let mut k = 0;
            while k < b.len() {
                if in_block {
                    if b[k] == b'*' && k + 1 < b.len() && b[k + 1] == b'/' {
                        in_block = false;
                        k += 1;
                    }
                } else if b[k] == b'/' && k + 1 < b.len() && b[k + 1] == b'/' {
                    break;
                } else if b[k] == b'/' && k + 1 < b.len() && b[k + 1] == b'*' {
                    in_block = true;
                    k += 1;
                } else if b[k] == b'"' || b[k] == b'\'' {
                    let q = b[k];
                    k += 1;
                    while k < b.len() && b[k] != q {
                        if b[k] == b'\\' {
                            k += 1;
                        }
                        k += 1;
                    }
                } else if b[k] == b'{' {
                    depth += 1;
                } else if b[k] == b'}' {
                    depth -= 1;
                }
                k += 1;
            }
            depths.push(depth);
        }
        depths
    }
}
