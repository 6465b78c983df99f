//! Core: tape semantics, gradient checks of the elementwise ops, safetensors I/O and
//! the errors bad input gets.

mod common;

use common::rand_t;
use kestrel::autograd::{gradcheck, record, Tape};
use kestrel::io::{save_safetensors, TensorFile};
use kestrel::{ops, DType, Device, Error, Tensor};

#[test]
fn inference_records_nothing() {
    let tape = Tape::new();
    let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.0], [3]).unwrap();
    tape.watch(&x);
    let _ = ops::relu(&ops::add(&x, &x).unwrap()).unwrap(); // no tape active
    assert!(
        tape.is_empty(),
        "ops recorded {} nodes without an active tape",
        tape.len()
    );
}

#[test]
fn ops_on_unwatched_inputs_are_not_recorded() {
    let tape = Tape::new();
    let _g = tape.activate();
    let x = Tensor::from_vec(vec![1.0f32, -2.0], [2]).unwrap();
    let _ = ops::relu(&x).unwrap();
    assert_eq!(tape.len(), 0);
}

#[test]
fn shared_input_gradients_accumulate() {
    // L = sum(x*x + x) => dL/dx = 2x + 1
    let tape = Tape::new();
    let x = Tensor::from_vec(vec![1.0f64, -2.0, 0.5], [3]).unwrap();
    tape.watch(&x);
    let loss = {
        let _g = tape.activate();
        ops::sum(&ops::add(&ops::mul(&x, &x).unwrap(), &x).unwrap()).unwrap()
    };
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(
        grads.expect(&x).unwrap().to_vec::<f64>().unwrap(),
        vec![3.0, -3.0, 2.0]
    );
}

#[test]
fn backward_needs_a_scalar_and_a_path_to_watched_tensors() {
    let tape = Tape::new();
    let x = Tensor::from_vec(vec![1.0f64, 2.0], [2]).unwrap();
    let y = {
        let _g = tape.activate();
        ops::relu(&x).unwrap()
    };
    assert!(
        matches!(tape.backward(&y), Err(Error::Autograd(_))),
        "non-scalar loss accepted"
    );
    let s = ops::sum(&y).unwrap();
    assert!(
        matches!(tape.backward(&s), Err(Error::Autograd(_))),
        "loss independent of watched tensors accepted"
    );
}

fn check(name: &str, f: impl Fn(&[Tensor]) -> kestrel::Result<Tensor>, shapes: &[&[usize]]) {
    for seed in 0..3u64 {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| rand_t(seed * 10 + i as u64 + 1, s))
            .collect();
        let wrt: Vec<usize> = (0..inputs.len()).collect();
        let r = gradcheck(&f, &inputs, &wrt, seed, 1e-6, 1e-6)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(r.checked > 0);
    }
}

#[test]
fn gradcheck_elementwise_and_reductions() {
    check("relu", |x| ops::relu(&x[0]), &[&[4, 5]]);
    check("add", |x| ops::add(&x[0], &x[1]), &[&[3, 4], &[3, 4]]);
    check("mul", |x| ops::mul(&x[0], &x[1]), &[&[3, 4], &[3, 4]]);
    check("scale", |x| ops::scale(&x[0], -1.7), &[&[6]]);
    check("sum", |x| ops::sum(&x[0]), &[&[2, 3, 4]]);
    check("mean", |x| ops::mean(&x[0]), &[&[2, 3, 4]]);
    check(
        "reshape",
        |x| ops::mul(&ops::reshape(&x[0], [6, 2])?, &x[1]),
        &[&[3, 4], &[6, 2]],
    );
}

#[test]
fn gradcheck_catches_a_wrong_backward() {
    // y = 2x with a backward that claims dy/dx = 3: the checker must refuse it.
    let f = |x: &[Tensor]| -> kestrel::Result<Tensor> {
        let y = ops::scale(&x[0].detach(), 2.0)?;
        record("bad_double", &[&x[0]], &y, |gy, _| {
            Ok(vec![Some(ops::scale(gy, 3.0)?)])
        });
        Ok(y)
    };
    let x = rand_t(7, &[5]);
    let err = gradcheck(f, &[x], &[0], 0, 1e-6, 1e-6).unwrap_err();
    assert!(err.to_string().contains("gradcheck failed"), "{err}");
}

#[test]
fn shape_mismatch_names_op_and_shapes() {
    let a = Tensor::zeros([2, 3], DType::F32, Device::Cpu).unwrap();
    let b = Tensor::zeros([3, 2], DType::F32, Device::Cpu).unwrap();
    let msg = ops::add(&a, &b).unwrap_err().to_string();
    assert!(
        msg.contains("add") && msg.contains("[2, 3]") && msg.contains("[3, 2]"),
        "{msg}"
    );
    let c = Tensor::zeros([2, 3], DType::F64, Device::Cpu).unwrap();
    assert!(matches!(ops::add(&a, &c), Err(Error::DType { .. })));
    assert!(Tensor::from_vec(vec![1.0f32; 5], [2, 3]).is_err());
    let idx = Tensor::from_vec_i64(vec![1, 2], [2]).unwrap();
    assert!(matches!(ops::relu(&idx), Err(Error::DType { .. })));
}

#[test]
fn device_parsing() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
    assert!(Device::parse("gpu").is_err());
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-core-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn safetensors_roundtrip_and_errors() {
    let a = Tensor::from_vec(vec![1.5f32, -2.0, 3.25, 4.0], [2, 2]).unwrap();
    let b = Tensor::from_vec(vec![0.1f64, 0.2], [2]).unwrap();
    let i = Tensor::from_vec_i64(vec![7, -1, 3], [3]).unwrap();
    let path = tmp("roundtrip.safetensors");
    let mut meta = std::collections::HashMap::new();
    meta.insert("params".to_string(), "{\"k\": 1}".to_string());
    save_safetensors(&path, &[("a", &a), ("b", &b), ("i", &i)], Some(meta)).unwrap();
    let f = TensorFile::open(&path).unwrap();
    assert_eq!(f.names(), vec!["a", "b", "i"]);
    assert_eq!(
        f.tensor("a").unwrap().to_vec::<f32>().unwrap(),
        vec![1.5, -2.0, 3.25, 4.0]
    );
    assert_eq!(f.tensor("b").unwrap().dtype(), DType::F64);
    assert_eq!(
        f.int_tensor("i").unwrap().to_vec_i64().unwrap(),
        vec![7, -1, 3]
    );
    assert_eq!(f.params().unwrap()["k"], 1);

    let missing = f
        .tensor("backbone.body.conv1.weight")
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("backbone.body.conv1.weight") && missing.contains("missing"),
        "{missing}"
    );
    let misshaped = f
        .tensor_shaped("a", &kestrel::Shape::new(vec![4]))
        .unwrap_err()
        .to_string();
    assert!(
        misshaped.contains("`a`") && misshaped.contains("[2, 2]") && misshaped.contains("[4]"),
        "{misshaped}"
    );
    assert!(f.tensor("i").is_err(), "an i64 tensor read as float");

    // Truncated and garbage files are errors naming the path.
    let bytes = std::fs::read(&path).unwrap();
    let trunc = tmp("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() - 3]).unwrap();
    let e = TensorFile::open(&trunc)
        .err()
        .expect("truncated file accepted")
        .to_string();
    assert!(e.contains("trunc.safetensors"), "{e}");
    let junk = tmp("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file at all").unwrap();
    assert!(TensorFile::open(&junk).is_err());
    assert!(matches!(
        TensorFile::open(tmp("absent.safetensors")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn fixtures_are_readable() {
    let f = common::fixture("ops/conv2d.safetensors");
    assert!(common::cases(&f).len() >= 6);
}
