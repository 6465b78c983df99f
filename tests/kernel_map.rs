//! `kestrel kernel-check NAME` finds real tests for every name `kestrel kernels`
//! lists: each kernel entry, file and stem maps (kestrel::device::kernels::KERNEL_TESTS)
//! to test targets that exist in tests/, whose filters select tests there, and which
//! run the kernel's checks on the emulated device. (tests/zz_emu_coverage.rs checks the
//! other half: that those targets really launch every entry of the file.)

use std::collections::BTreeSet;
use std::path::Path;

use kestrel::device::kernels::{self, KERNEL_TESTS};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The test paths a test file defines: `#[test] fn name` and, for each
/// `device_tests!` entry `name`, `name::cpu`, `name::emulated` and `name::cuda` (or the
/// devices listed in parentheses).
fn test_names(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let lines: Vec<&str> = src.lines().map(str::trim).collect();
    let mut in_macro = false;
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("crate::device_tests!") {
            in_macro = true;
            continue;
        }
        if in_macro {
            if *l == "}" {
                in_macro = false;
            } else if let Some((head, _)) = l.split_once("=>") {
                let head = head.trim();
                let (name, devs) = match head.split_once('(') {
                    Some((n, d)) => (n.trim(), d.trim_end_matches(')').to_string()),
                    None => (head, "cpu, emulated, cuda".to_string()),
                };
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    for d in devs.split(',') {
                        // `emulated_errors` makes the test `emulated` (see device_tests!).
                        let d = d.trim().trim_end_matches("_errors");
                        out.insert(format!("{name}::{d}"));
                    }
                }
            }
            continue;
        }
        if let Some(rest) = l.strip_prefix("fn ") {
            // The attributes and docs above, up to the blank line or the end of the
            // previous item (attributes may span lines, e.g. `#[cfg_attr(..., ignore)]`).
            let mut attrs_before = lines[..i]
                .iter()
                .rev()
                .take_while(|p| !p.is_empty() && !p.ends_with('}') && !p.ends_with(';'));
            if attrs_before.any(|p| *p == "#[test]") {
                out.insert(rest.split('(').next().unwrap().to_string());
            }
        }
    }
    out
}

fn target_source(target: &str) -> String {
    let p = root().join("tests").join(format!("{target}.rs"));
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("test target `{target}`: {} ({e})", p.display()))
}

#[test]
fn every_kernel_file_has_exactly_one_mapping_and_no_mapping_is_stale() {
    let stems: BTreeSet<&str> = kernels::files().iter().map(kernels::stem).collect();
    let mapped: Vec<&str> = KERNEL_TESTS.iter().map(|k| k.stem).collect();
    let unique: BTreeSet<&str> = mapped.iter().copied().collect();
    assert_eq!(
        unique.len(),
        mapped.len(),
        "a stem is mapped twice: {mapped:?}"
    );
    assert_eq!(
        stems, unique,
        "kernels/*.cu stems vs KERNEL_TESTS stems (left: files, right: mapping)"
    );
}

#[test]
fn every_name_kestrel_kernels_lists_resolves_to_its_file() {
    for f in kernels::files() {
        let stem = kernels::stem(f);
        for name in f.entries.iter().copied().chain([f.file, stem]) {
            let (file, tests) = kernels::tests_for(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(file.file, f.file, "{name}");
            assert_eq!(tests.stem, stem, "{name}");
            assert!(!tests.tests.is_empty(), "{name}: no test target");
        }
    }
    assert!(matches!(
        kernels::tests_for("no_such_kernel_f32"),
        Err(kestrel::Error::UnknownKernel(_))
    ));
}

#[test]
fn mapped_test_targets_exist_and_their_filters_select_emulated_tests() {
    for k in KERNEL_TESTS {
        for t in k.tests {
            let src = target_source(t.target);
            let names = test_names(&src);
            assert!(
                !names.is_empty(),
                "{}: tests/{}.rs has no test",
                k.stem,
                t.target
            );
            let selected: Vec<&String> = names
                .iter()
                .filter(|n| t.filters.is_empty() || t.filters.iter().any(|f| n.contains(f)))
                .collect();
            for f in t.filters {
                assert!(
                    names.iter().any(|n| n.contains(f)),
                    "{}: filter {f:?} selects no test of tests/{}.rs (tests: {names:?})",
                    k.stem,
                    t.target
                );
            }
            // kernel-check runs the selection on the emulated device where no GPU is.
            assert!(
                selected.iter().any(|n| n.contains("emulated")),
                "{}: tests/{}.rs {:?} selects no emulated test (selected: {selected:?})",
                k.stem,
                t.target,
                t.filters
            );
        }
        if let Some((bench, _)) = k.bench {
            let p = root().join("benches").join(format!("{bench}.rs"));
            assert!(p.is_file(), "{}: bench target {}", k.stem, p.display());
        }
    }
}

/// The parser above reads what libtest lists (guards the mapping test itself).
#[test]
fn test_name_parser_reads_plain_tests_and_device_tests() {
    let src = "#[test]\n#[cfg_attr(\n    not(x),\n    ignore = \"x\"\n)]\nfn plain() {}\n\nfn helper() {}\n\n\
               crate::device_tests! {\n    /// doc\n    a => check_a;\n    b(emulated_errors, cuda) => |d| f(d, 1);\n}\n";
    let want: BTreeSet<String> = [
        "plain",
        "a::cpu",
        "a::emulated",
        "a::cuda",
        "b::emulated",
        "b::cuda",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(test_names(src), want);
}

/// What `kestrel kernel-check NAME` runs, for every name `kestrel kernels` lists: one
/// `cargo test --test T -- FILTERS` per mapped target (each a file in tests/), with
/// `--include-ignored` only where a GPU is, then the bench (a file in benches/).
#[test]
fn kernel_check_plan_runs_real_targets_for_every_listed_name() {
    use kestrel::app::kernel_check::plan;
    for f in kernels::files() {
        for name in f.entries.iter().copied().chain([f.file]) {
            let (_, map) = kernels::tests_for(name).unwrap();
            let cmds = plan(name, true, false).unwrap();
            let tests: Vec<&Vec<String>> = cmds.iter().filter(|c| c[0] == "test").collect();
            assert_eq!(tests.len(), map.tests.len(), "{name}: {cmds:?}");
            for (c, t) in tests.iter().zip(map.tests) {
                assert_eq!(c[1..4], ["--test", t.target, "--"], "{name}: {c:?}");
                assert_eq!(c[4..], *t.filters, "{name}: {c:?}");
                target_source(t.target);
            }
            let benches: Vec<&Vec<String>> = cmds.iter().filter(|c| c[0] == "bench").collect();
            assert_eq!(benches.len(), usize::from(map.bench.is_some()), "{name}");
            for b in benches {
                assert!(root()
                    .join("benches")
                    .join(format!("{}.rs", b[2]))
                    .is_file());
            }
            let gpu = plan(name, false, true).unwrap();
            assert!(gpu
                .iter()
                .all(|c| c[0] == "test" && c.last().unwrap() == "--include-ignored"));
        }
    }
    assert!(plan("no_such_kernel_f32", true, false).is_err());
}
