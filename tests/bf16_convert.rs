//! The CPU's bulk f32 <-> bf16 conversions (kestrel::tensor::bf16, used by
//! `Tensor::to_dtype` and the bf16 ops' CPU paths) against `half`'s scalar
//! conversions, the reference the device kernels were checked against: every bf16
//! widened, and 16.8 million f32 bit patterns spread over the whole range plus the
//! edges of each rounding case (ties, carries into the exponent, overflow to
//! infinity, subnormals, signalling and quiet NaNs of both signs) rounded.

use kestrel::tensor::bf16::{
    round_bits, round_f32_vec, round_in_place, round_relu_vec, round_vec, widen_bits, widen_vec,
};
use kestrel::tensor::{DType, Tensor};

fn edge_patterns() -> Vec<u32> {
    let mut xs = Vec::new();
    for hi in [
        0u32, 0x0001, 0x007f, 0x0080, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0x7f81, 0x7fbf, 0x7fc0,
        0x7fff, 0x8000, 0x8001, 0xff7f, 0xff80, 0xff81, 0xffc0, 0xffff,
    ] {
        for lo in [0u32, 1, 0x3fff, 0x7fff, 0x8000, 0x8001, 0xbfff, 0xffff] {
            xs.push((hi << 16) | lo);
        }
    }
    xs
}

#[test]
fn widen_matches_half_for_every_bf16() {
    for b in 0..=u16::MAX {
        let want = half::bf16::from_bits(b).to_f32().to_bits();
        assert_eq!(widen_bits(b), want, "widen {b:#06x}");
    }
}

#[test]
fn round_matches_half_round_to_nearest_even() {
    // 257 is odd, so i * 257 mod 2^32 visits 2^24 distinct patterns spread over the
    // range, with all low 16-bit halves represented.
    let spread = (0..1u32 << 24).map(|i| i.wrapping_mul(257));
    for x in spread.chain(edge_patterns()) {
        let want = half::bf16::from_f32(f32::from_bits(x)).to_bits();
        assert_eq!(round_bits(x), want, "round {x:#010x}");
    }
}

/// The slice conversions (parallel above 65536 elements) and `to_dtype` give the
/// scalar results element for element, at sizes on both sides of the threshold.
#[test]
fn bulk_conversions_match_scalar() {
    for n in [0usize, 1, 17, 65_535, 65_536, 200_003] {
        let xs: Vec<f32> = (0..n)
            .map(|i| {
                let e = edge_patterns();
                if i < e.len() {
                    f32::from_bits(e[i])
                } else {
                    f32::from_bits((i as u32).wrapping_mul(2_654_435_761))
                }
            })
            .collect();
        let want16: Vec<u16> = xs
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let got16: Vec<u16> = round_vec(&xs).iter().map(|b| b.to_bits()).collect();
        assert_eq!(got16, want16, "round_vec n={n}");
        let back: Vec<u32> = widen_vec(&round_vec(&xs))
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want_back: Vec<u32> = want16
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32().to_bits())
            .collect();
        assert_eq!(back, want_back, "widen_vec n={n}");
        let once: Vec<u32> = round_f32_vec(&xs).iter().map(|v| v.to_bits()).collect();
        assert_eq!(once, want_back, "round_f32_vec n={n}");
        // With ReLU first, by the f32 relu op's rule (`v > 0 ? v : 0`: -0, negatives
        // and NaN give +0).
        for relu in [false, true] {
            let pre: Vec<f32> = if relu {
                xs.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect()
            } else {
                xs.clone()
            };
            let want: Vec<u16> = pre
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let got: Vec<u16> = round_relu_vec(&xs, relu)
                .iter()
                .map(|b| b.to_bits())
                .collect();
            assert_eq!(got, want, "round_relu_vec n={n} relu={relu}");
            let mut inplace = xs.clone();
            round_in_place(&mut inplace, relu);
            let want_f: Vec<u32> = want
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32().to_bits())
                .collect();
            let got_f: Vec<u32> = inplace.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_f, want_f, "round_in_place n={n} relu={relu}");
        }

        let t = Tensor::from_vec(xs.clone(), [n]).unwrap();
        let t16 = t.to_dtype(DType::BF16).unwrap();
        let bits: Vec<u16> = t16
            .to_vec_bf16()
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect();
        assert_eq!(bits, want16, "to_dtype(bf16) n={n}");
        let w: Vec<u32> = t16
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(w, want_back, "to_dtype(f32) n={n}");
    }
}
