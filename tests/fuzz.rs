//! Fuzzing every parser of user files (issue 15, part 5): COCO annotations, COCO
//! results, TOML configs, safetensors, PNG/JPEG images. Seeded mutations of valid
//! files (see tests/common/fuzz.rs); any panic fails the test and prints the seed,
//! the case and the input.
//!
//! This is the short run of `cargo test` (`KESTREL_FUZZ_CASES` cases per target, 1500
//! by default; `KESTREL_FUZZ_SEED` to vary the inputs). The long run is
//! `cargo run --release --example fuzz -- --minutes 10`.

#[path = "common/fuzz.rs"]
mod fuzz;

fn cases() -> u64 {
    std::env::var("KESTREL_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500)
}

fn seed() -> u64 {
    std::env::var("KESTREL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201)
}

fn check(target: fuzz::Target) {
    let r = fuzz::run(&target, seed(), cases(), None);
    assert_eq!(r.cases, cases());
    let shown: Vec<String> = r.findings.iter().take(5).map(|f| f.to_string()).collect();
    assert!(
        r.findings.is_empty(),
        "{} panics in {} cases of {}:\n{}",
        r.findings.len(),
        r.cases,
        target.name,
        shown.join("\n")
    );
    // The mutations must not all be refused up front, or the parser's deeper code is
    // never reached: the seeds themselves (case 0) and some mutants are accepted.
    assert!(r.accepted > 0, "{}: no input accepted", target.name);
}

#[test]
fn fuzz_coco_annotations() {
    check(fuzz::coco_target());
}

#[test]
fn fuzz_coco_results() {
    check(fuzz::results_target());
}

#[test]
fn fuzz_toml_config() {
    check(fuzz::toml_target());
}

#[test]
fn fuzz_safetensors() {
    check(fuzz::safetensors_target());
}

#[test]
fn fuzz_images() {
    check(fuzz::image_target());
}

/// The harness finds panics: a target that panics on some inputs is reported with
/// its seed and case (a fuzzer that cannot fail proves nothing).
#[test]
fn the_harness_reports_a_planted_panic() {
    let t = fuzz::Target {
        name: "planted",
        seeds: vec![b"{\"a\": 12345}".to_vec()],
        text: true,
        run: Box::new(|b| {
            if !b.starts_with(b"{") {
                panic!("planted: input does not start with a brace");
            }
            true
        }),
    };
    let r = fuzz::run(&t, 7, 300, None);
    assert!(!r.findings.is_empty(), "no finding in {} cases", r.cases);
    let f = &r.findings[0];
    assert!(f.message.contains("planted"), "{}", f.message);
    assert!(!f.input.starts_with(b"{"));
    // The finding reproduces from its (seed, case) alone.
    assert!(fuzz::run_input(&t, &f.input).is_err());
    assert!(f
        .to_string()
        .contains(&format!("--seed 7 --cases {}", f.case + 1)));
}

/// Deep nesting, which random mutations rarely build: a recursive parser without a
/// depth limit overflows the stack, an abort no `catch_unwind` can stop.
#[test]
fn deeply_nested_inputs_are_refused_without_overflowing_the_stack() {
    let depth = 200_000;
    let json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let coco = format!("{{\"images\": {json}}}");
    for t in [fuzz::coco_target(), fuzz::results_target()] {
        assert!(fuzz::run_input(&t, coco.as_bytes()).is_ok(), "{}", t.name);
        assert!(fuzz::run_input(&t, json.as_bytes()).is_ok(), "{}", t.name);
    }
    let toml_array = format!("x = {}{}", "[".repeat(depth), "]".repeat(depth));
    let toml_table = format!("x = {}{}", "{a = ".repeat(depth), "}".repeat(depth));
    let toml_keys = format!("{} = 1", vec!["a"; depth].join("."));
    let t = fuzz::toml_target();
    for text in [toml_array, toml_table, toml_keys] {
        assert!(fuzz::run_input(&t, text.as_bytes()).is_ok());
    }
}
