//! Plain f64 references for the detection ops, written from torchvision's Python
//! (torchvision/ops/boxes.py, models/detection/_utils.py) and independent of the
//! engine: the random device checks compare each device (the CPU included) with these.

/// A box `[x1, y1, x2, y2]` in pixels.
pub type Box4 = [f64; 4];

/// `[N, 4]` row-major values as boxes.
pub fn boxes_of(v: &[f32]) -> Vec<Box4> {
    v.chunks_exact(4)
        .map(|b| [b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64])
        .collect()
}

/// `box_area`: `(x2 - x1) * (y2 - y1)`.
pub fn area(b: &Box4) -> f64 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// `box_iou` `[N, M]`: intersection (clamped at 0 per side) over union.
pub fn iou(a: &[Box4], b: &[Box4]) -> Vec<f64> {
    let mut out = Vec::with_capacity(a.len() * b.len());
    for p in a {
        for q in b {
            let w = (p[2].min(q[2]) - p[0].max(q[0])).max(0.0);
            let h = (p[3].min(q[3]) - p[1].max(q[1])).max(0.0);
            let inter = w * h;
            out.push(inter / (area(p) + area(q) - inter));
        }
    }
    out
}

/// `clip_boxes_to_image`: x into `[0, width]`, y into `[0, height]`.
pub fn clip(b: &[Box4], (height, width): (f64, f64)) -> Vec<f64> {
    b.iter()
        .flat_map(|b| {
            [
                b[0].clamp(0.0, width),
                b[1].clamp(0.0, height),
                b[2].clamp(0.0, width),
                b[3].clamp(0.0, height),
            ]
        })
        .collect()
}

/// `remove_small_boxes`: indices of boxes with width and height `>= min_size`.
pub fn keep_large(b: &[Box4], min_size: f64) -> Vec<i64> {
    (0..b.len())
        .filter(|&i| b[i][2] - b[i][0] >= min_size && b[i][3] - b[i][1] >= min_size)
        .map(|i| i as i64)
        .collect()
}

/// Whether a box's width or height is within `eps` of `min_size` (where f32 and f64
/// arithmetic may legitimately disagree on `remove_small_boxes`).
pub fn near_min_size(b: &[Box4], min_size: f64, eps: f64) -> bool {
    b.iter()
        .any(|b| ((b[2] - b[0]) - min_size).abs() < eps || ((b[3] - b[1]) - min_size).abs() < eps)
}

fn centre_size(b: &Box4) -> (f64, f64, f64, f64) {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    (b[0] + 0.5 * w, b[1] + 0.5 * h, w, h)
}

/// `BoxCoder.encode_single`: targets of `gt[i]` relative to `proposals[i]`, `[N, 4]`.
pub fn encode(weights: [f64; 4], gt: &[Box4], proposals: &[Box4]) -> Vec<f64> {
    let [wx, wy, ww, wh] = weights;
    gt.iter()
        .zip(proposals)
        .flat_map(|(g, p)| {
            let (gx, gy, gw, gh) = centre_size(g);
            let (px, py, pw, ph) = centre_size(p);
            [
                wx * (gx - px) / pw,
                wy * (gy - py) / ph,
                ww * (gw / pw).ln(),
                wh * (gh / ph).ln(),
            ]
        })
        .collect()
}

/// `BoxCoder.decode_single`: boxes `[N, 4K]` from codes `[N, 4K]` relative to
/// `boxes[i]`; `dw`, `dh` clamped above at `clip`.
pub fn decode(weights: [f64; 4], clip: f64, codes: &[f64], boxes: &[Box4]) -> Vec<f64> {
    let [wx, wy, ww, wh] = weights;
    let k = codes.len() / 4 / boxes.len().max(1);
    let mut out = Vec::with_capacity(codes.len());
    for (i, b) in boxes.iter().enumerate() {
        let (cx, cy, w, h) = centre_size(b);
        for c in codes[4 * k * i..4 * k * (i + 1)].chunks_exact(4) {
            let (dx, dy) = (c[0] / wx, c[1] / wy);
            let (dw, dh) = ((c[2] / ww).min(clip), (c[3] / wh).min(clip));
            let (px, py) = (dx * w + cx, dy * h + cy);
            let (pw, ph) = (dw.exp() * w, dh.exp() * h);
            out.extend([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph]);
        }
    }
    out
}

/// torchvision's `Matcher.__call__` on a quality matrix `[G, A]` (row-major): for each
/// anchor the best gt (first on ties, as `max(dim=0)`), -1 below `low`, -2 between
/// `low` and `high`; with low-quality matches, anchors that reach a gt's best quality
/// get their best gt back. Thresholds are compared in the matrix's type (f32 here:
/// torch promotes the Python scalar to the tensor's dtype).
pub fn matches(q: &[f32], g: usize, a: usize, high: f64, low: f64, low_quality: bool) -> Vec<i64> {
    let (high, low) = (high as f32, low as f32);
    if g == 0 {
        return vec![-1; a];
    }
    let best: Vec<(f32, usize)> = (0..a)
        .map(|j| {
            let mut b = (q[j], 0);
            for i in 1..g {
                if q[i * a + j] > b.0 {
                    b = (q[i * a + j], i);
                }
            }
            b
        })
        .collect();
    let mut m: Vec<i64> = best
        .iter()
        .map(|&(v, i)| {
            if v < low {
                -1
            } else if v < high {
                -2
            } else {
                i as i64
            }
        })
        .collect();
    if low_quality {
        for i in 0..g {
            let row = &q[i * a..(i + 1) * a];
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for j in 0..a {
                if row[j] == top {
                    m[j] = best[j].1 as i64;
                }
            }
        }
    }
    m
}
