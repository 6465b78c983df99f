//! NMS on the CPU: sort once, then check each candidate only against the kept boxes
//! that could suppress it, through a spatial index (see the parent module docs).

use rayon::prelude::*;

use crate::tensor::Element;

/// Sort key whose ascending order is torch's stable descending order of scores:
/// NaN first, then +inf .. -inf, with -0.0 == +0.0. Widening f32 to f64 keeps order.
pub(crate) fn descending_key(s: f64) -> u64 {
    let s = if s.is_nan() {
        f64::NAN
    } else if s == 0.0 {
        0.0
    } else {
        s
    };
    let b = s.to_bits();
    let ascending = if b >> 63 == 1 { !b } else { b | (1 << 63) };
    !ascending
}

/// Below this many boxes the CPU paths run on one thread.
const PAR_MIN: usize = 16 * 1024;

/// Positions `0..n` in torch's stable descending order of `scores`.
pub(crate) fn sort_descending<T: Element>(scores: &[T]) -> Vec<u32> {
    // (key, index) pairs are unique, so an unstable sort gives the stable order. The
    // keys live in a per-thread vector reused across calls.
    crate::tensor::pool::with_vec::<(u64, u32), _>(scores.len(), |keyed| {
        keyed.extend(
            scores
                .iter()
                .enumerate()
                .map(|(i, s)| (descending_key(s.f64()), i as u32)),
        );
        if keyed.len() >= PAR_MIN {
            keyed.par_sort_unstable();
        } else {
            keyed.sort_unstable();
        }
        keyed.iter().map(|&(_, i)| i).collect()
    })
}

/// One box in sorted order: its position, coordinates, area and class (0 when not
/// batched). Kept boxes are copied into the index lists, so a candidate's checks
/// read memory sequentially.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rec<T> {
    pos: u32,
    x1: T,
    y1: T,
    x2: T,
    y2: T,
    area: T,
    cls: i64,
}

/// C++ `std::max(a, b)`: `a < b ? b : a` (NaN in `b` is ignored, in `a` kept).
#[inline(always)]
fn std_max<T: Element>(a: T, b: T) -> T {
    if a < b {
        b
    } else {
        a
    }
}

/// C++ `std::min(a, b)`: `b < a ? b : a`.
#[inline(always)]
fn std_min<T: Element>(a: T, b: T) -> T {
    if b < a {
        b
    } else {
        a
    }
}

impl<T: Element> Rec<T> {
    /// Whether kept box `self` suppresses candidate `c`: torchvision's CPU arithmetic.
    #[inline(always)]
    fn suppresses(&self, c: &Rec<T>, thr: f64) -> bool {
        if self.cls != c.cls {
            return false;
        }
        let xx1 = std_max(self.x1, c.x1);
        let yy1 = std_max(self.y1, c.y1);
        let xx2 = std_min(self.x2, c.x2);
        let yy2 = std_min(self.y2, c.y2);
        let w = std_max(T::zero(), xx2 - xx1);
        let h = std_max(T::zero(), yy2 - yy1);
        let inter = w * h;
        let ovr = inter / (self.area + c.area - inter);
        ovr.f64() > thr
    }

    /// Whether the box can take part in a suppression at a threshold >= 0: only
    /// finite boxes of positive width and height can have a positive intersection
    /// and a finite union (others give IoU 0, -0 or NaN with every box).
    fn participates(&self) -> bool {
        let (x1, y1, x2, y2) = (self.x1, self.y1, self.x2, self.y2);
        x1.is_finite() && y1.is_finite() && x2.is_finite() && y2.is_finite() && x2 > x1 && y2 > y1
    }

    fn f64s(&self) -> [f64; 4] {
        [self.x1.f64(), self.y1.f64(), self.x2.f64(), self.y2.f64()]
    }
}

/// The boxes in sorted order.
pub(super) fn gather<T: Element>(boxes: &[T], cls: Option<&[i64]>, order: &[u32]) -> Vec<Rec<T>> {
    let mut sb = Vec::with_capacity(order.len());
    gather_into(&mut sb, boxes, cls, order);
    sb
}

/// [`gather`] into `sb` (emptied first).
fn gather_into<T: Element>(sb: &mut Vec<Rec<T>>, boxes: &[T], cls: Option<&[i64]>, order: &[u32]) {
    sb.clear();
    sb.extend(order.iter().enumerate().map(|(p, &i)| {
        let b = &boxes[4 * i as usize..4 * i as usize + 4];
        Rec {
            pos: p as u32,
            x1: b[0],
            y1: b[1],
            x2: b[2],
            y2: b[3],
            area: (b[2] - b[0]) * (b[3] - b[1]),
            cls: cls.map_or(0, |c| c[i as usize]),
        }
    }));
}

/// The vectors of one CPU NMS, kept per thread for the next call (emptied, capacity
/// kept): a warm step's NMS allocates nothing large.
#[derive(Default)]
struct Scratch<T> {
    sb: Vec<Rec<T>>,
    kept: Vec<usize>,
    scale: ScaleBufs<T>,
    grid: GridBufs<T>,
}

/// Kept original indices in descending score order, in a host-pool buffer.
pub(super) fn nms_cpu<T: Element>(
    boxes: &[T],
    scores: &[T],
    cls: Option<&[i64]>,
    thr: f64,
) -> Vec<i64> {
    let order = sort_descending(scores);
    crate::tensor::pool::with_kept(|s: &mut Scratch<T>| {
        gather_into(&mut s.sb, boxes, cls, &order);
        if thr >= 0.0 {
            greedy_grid(&s.sb, thr, &mut s.kept, (&mut s.scale, &mut s.grid));
        } else {
            s.kept = greedy_reference(&s.sb, thr);
        }
        let mut keep = crate::tensor::pool::take_empty::<i64>(order.len());
        keep.extend(s.kept.iter().map(|&p| order[p] as i64));
        keep
    })
}

/// torchvision's loop over sorted positions.
pub(super) fn greedy_reference<T: Element>(sb: &[Rec<T>], thr: f64) -> Vec<usize> {
    let n = sb.len();
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for i in 0..n {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        for j in i + 1..n {
            if !suppressed[j] && sb[i].suppresses(&sb[j], thr) {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Boxes processed per chunk by the parallel path.
const CHUNK: usize = 4096;

/// From this threshold up the CPU path indexes kept boxes by scale and centre
/// ([`ScaleIndex`]); below it by the cells they cover ([`OverlapGrid`]).
const SCALE_INDEX_MIN_THR: f64 = 0.6;

/// Greedy NMS over sorted positions for a threshold >= 0, into `kept`: each
/// candidate is checked only against kept boxes that an index says could suppress
/// it. The indexes' growing vectors come from and go back to `scale` and `grid`.
fn greedy_grid<T: Element>(
    sb: &[Rec<T>],
    thr: f64,
    kept: &mut Vec<usize>,
    (scale, grid): (&mut ScaleBufs<T>, &mut GridBufs<T>),
) {
    let part: Vec<bool> = sb.iter().map(Rec::participates).collect();
    if thr >= SCALE_INDEX_MIN_THR {
        let mut index = ScaleIndex::new(sb, &part, thr, std::mem::take(scale));
        greedy_indexed(sb, thr, &part, &mut index, kept);
        *scale = index.into_bufs();
    } else {
        let mut index = OverlapGrid::new(sb, &part, std::mem::take(grid));
        greedy_indexed(sb, thr, &part, &mut index, kept);
        *grid = index.into_bufs();
    }
}

/// Kept boxes, organised so that a candidate finds the ones that could suppress it.
/// Lists hold sorted positions in increasing order (boxes are kept in that order).
trait KeptIndex<T>: Sync {
    /// Record kept box `r` (a participant).
    fn insert(&mut self, r: &Rec<T>);
    /// Whether a kept box at sorted position >= `since` suppresses candidate `j`.
    fn hit(&self, c: &Rec<T>, since: usize, thr: f64) -> bool;
}

/// Whether a box of `list` at position >= `since` suppresses `j` (walks back from the
/// newest entry, so the `since` cut is a prefix of the walk).
#[inline]
fn any_since<T: Element>(list: &[Rec<T>], c: &Rec<T>, since: usize, thr: f64) -> bool {
    let since = since as u32;
    list.iter()
        .rev()
        .take_while(|k| k.pos >= since)
        .any(|k| k.suppresses(c, thr))
}

fn greedy_indexed<T: Element, I: KeptIndex<T>>(
    sb: &[Rec<T>],
    thr: f64,
    part: &[bool],
    index: &mut I,
    kept: &mut Vec<usize>,
) {
    let n = sb.len();
    kept.clear();
    kept.reserve(n);
    let chunk = if n >= PAR_MIN { CHUNK } else { n.max(1) };
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        // Against the boxes kept before this chunk, in parallel (read-only index).
        let early: Vec<bool> = if start > 0 && n >= PAR_MIN {
            (start..end)
                .into_par_iter()
                .map(|j| part[j] && index.hit(&sb[j], 0, thr))
                .collect()
        } else {
            vec![false; end - start]
        };
        // Then in order, against the boxes kept within this chunk.
        for j in start..end {
            if !part[j] {
                kept.push(j);
                continue;
            }
            if early[j - start] || index.hit(&sb[j], start, thr) {
                continue;
            }
            kept.push(j);
            index.insert(&sb[j]);
        }
    }
}

/// Cell of coordinate `v` on an axis of `g` cells from `origin`, `inv` cells per
/// unit: monotone non-decreasing in `v`, which is all the lookups rely on.
#[inline]
fn axis_cell(v: f64, origin: f64, inv: f64, g: usize) -> u32 {
    // Clamping first makes the truncating cast a floor (and avoids a libm call).
    ((v - origin) * inv).clamp(0.0, (g - 1) as f64) as u32
}

/// Cells per axis and cells per unit for `extent` split into cells of `size`.
fn axis_cells(extent: f64, size: f64) -> usize {
    if extent.is_finite() && extent > 0.0 && size > 0.0 {
        (extent / size).ceil().clamp(1.0, 1024.0) as usize
    } else {
        1
    }
}

fn axis_inv(extent: f64, g: usize) -> f64 {
    if extent > 0.0 && extent.is_finite() {
        g as f64 / extent
    } else {
        0.0
    }
}

/// Kept boxes by the grid cells they cover (any threshold >= 0): a uniform grid
/// over the participating boxes, cells about the median box size. A box is listed in
/// every cell it covers (or, if it covers many, in `big`); two overlapping boxes
/// share the cell of the larger of their left edges and of their top edges.
struct OverlapGrid<T> {
    gx: usize,
    cells: Vec<Vec<Rec<T>>>,
    big: Vec<Rec<T>>,
    all: Vec<Rec<T>>,
    cell_range: Vec<[u32; 4]>,
    /// The participants' positions (kept for the next grid).
    ps: Vec<usize>,
}

/// The vectors of an [`OverlapGrid`] that grow with the number of boxes, kept
/// between calls.
#[derive(Default)]
struct GridBufs<T> {
    ps: Vec<usize>,
    cell_range: Vec<[u32; 4]>,
    all: Vec<Rec<T>>,
}

/// A box covering more cells than this is listed in `big` instead.
const BIG_CELLS: usize = 64;
/// A candidate covering more cells than this is checked against every kept box.
const SCAN_CELLS: usize = 256;

impl<T: Element> OverlapGrid<T> {
    fn new(sb: &[Rec<T>], part: &[bool], bufs: GridBufs<T>) -> Self {
        let GridBufs {
            mut ps,
            mut cell_range,
            mut all,
        } = bufs;
        ps.clear();
        ps.extend((0..sb.len()).filter(|&p| part[p]));
        let (mut lo, mut hi) = ([f64::MAX; 2], [f64::MIN; 2]);
        for &p in &ps {
            let [x1, y1, x2, y2] = sb[p].f64s();
            lo = [lo[0].min(x1), lo[1].min(y1)];
            hi = [hi[0].max(x2), hi[1].max(y2)];
        }
        let mut g = [1usize, 1usize];
        if !ps.is_empty() {
            let mw = median(&ps, |p| sb[p].f64s()[2] - sb[p].f64s()[0]);
            let mh = median(&ps, |p| sb[p].f64s()[3] - sb[p].f64s()[1]);
            g = [axis_cells(hi[0] - lo[0], mw), axis_cells(hi[1] - lo[1], mh)];
            // Keep the grid proportional to the number of boxes.
            let cap = (2 * ps.len()).max(16);
            while g[0] * g[1] > cap {
                g = [g[0].div_ceil(2), g[1].div_ceil(2)];
            }
        }
        let inv = [axis_inv(hi[0] - lo[0], g[0]), axis_inv(hi[1] - lo[1], g[1])];
        cell_range.clear();
        cell_range.resize(sb.len(), [0u32; 4]);
        for &p in &ps {
            let [x1, y1, x2, y2] = sb[p].f64s();
            cell_range[p] = [
                axis_cell(x1, lo[0], inv[0], g[0]),
                axis_cell(y1, lo[1], inv[1], g[1]),
                axis_cell(x2, lo[0], inv[0], g[0]),
                axis_cell(y2, lo[1], inv[1], g[1]),
            ];
        }
        // Room for every box: kept boxes never make it grow.
        all.clear();
        all.reserve(sb.len());
        OverlapGrid {
            gx: g[0],
            cells: vec![Vec::new(); g[0] * g[1]],
            big: Vec::new(),
            all,
            cell_range,
            ps,
        }
    }

    /// The vectors to keep for the next grid.
    fn into_bufs(self) -> GridBufs<T> {
        GridBufs {
            ps: self.ps,
            cell_range: self.cell_range,
            all: self.all,
        }
    }

    fn cells_of(&self, p: u32) -> usize {
        let [cx0, cy0, cx1, cy1] = self.cell_range[p as usize];
        (cx1 - cx0 + 1) as usize * (cy1 - cy0 + 1) as usize
    }
}

impl<T: Element> KeptIndex<T> for OverlapGrid<T> {
    fn insert(&mut self, r: &Rec<T>) {
        self.all.push(*r);
        if self.cells_of(r.pos) > BIG_CELLS {
            self.big.push(*r);
            return;
        }
        let [cx0, cy0, cx1, cy1] = self.cell_range[r.pos as usize];
        for cy in cy0..=cy1 {
            for cx in cx0..=cx1 {
                self.cells[cy as usize * self.gx + cx as usize].push(*r);
            }
        }
    }

    fn hit(&self, c: &Rec<T>, since: usize, thr: f64) -> bool {
        if self.cells_of(c.pos) > SCAN_CELLS {
            return any_since(&self.all, c, since, thr);
        }
        if any_since(&self.big, c, since, thr) {
            return true;
        }
        let [cx0, cy0, cx1, cy1] = self.cell_range[c.pos as usize];
        (cy0..=cy1).any(|cy| {
            (cx0..=cx1).any(|cx| {
                any_since(
                    &self.cells[cy as usize * self.gx + cx as usize],
                    c,
                    since,
                    thr,
                )
            })
        })
    }
}

/// Median of `f` over the positions `ps` (on a sample of at most ~2048 of them).
fn median(ps: &[usize], f: impl Fn(usize) -> f64) -> f64 {
    let step = (ps.len() / 2048).max(1);
    let mut v: Vec<f64> = ps.iter().step_by(step).map(|&p| f(p)).collect();
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1
}

/// Kept boxes by scale and centre, for thresholds `t >= 0.6` (below, the query
/// windows grow and the [`OverlapGrid`] is faster). In exact arithmetic
/// `IoU(a, b) > t` implies `t < area_a / area_b < 1 / t` (IoU <= min/max area),
/// `w_a < w_b / t` (as `inter > t * w_a * h_a` and `inter <= iw * h_a`, so
/// `w_b >= iw > t * w_a`) and `|cx_a - cx_b| < (w_a + w_b) / 2` (overlap); the same
/// for heights. A candidate therefore looks only at kept boxes in its own and the
/// neighbouring area classes (binades of the area) whose centres lie within
/// `w * (1 + 1/t) / 2` of its own. The float IoU that decides differs from the exact
/// one by a relative 2e-6 at most for boxes with sides in [1e-10, 1e12] (no underflow
/// or overflow), so the bounds use `t * (1 - 1e-4)`; other boxes ("odd") are checked
/// against everything.
struct ScaleIndex<T> {
    t: f64,
    geo: Vec<[f64; 5]>,
    class: Vec<i32>,
    e_min: i32,
    grids: Vec<Option<ClassGrid<T>>>,
    odd: Vec<Rec<T>>,
    all: Vec<Rec<T>>,
}

/// The vectors of a [`ScaleIndex`] that grow with the number of boxes, kept between
/// calls.
#[derive(Default)]
struct ScaleBufs<T> {
    geo: Vec<[f64; 5]>,
    class: Vec<i32>,
    all: Vec<Rec<T>>,
}

/// The centre grid of one area class.
struct ClassGrid<T> {
    origin: [f64; 2],
    inv: [f64; 2],
    g: [usize; 2],
    cells: Vec<Vec<Rec<T>>>,
}

/// Not in any area class (not participating, or sides outside [1e-10, 1e12]).
const NO_CLASS: i32 = i32::MIN;

/// floor(log2(v)) for a positive normal f64, read from its exponent bits (exact and
/// monotone).
fn binade(v: f64) -> i32 {
    ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

impl<T: Element> ScaleIndex<T> {
    fn new(sb: &[Rec<T>], part: &[bool], thr: f64, bufs: ScaleBufs<T>) -> Self {
        let ScaleBufs {
            mut geo,
            mut class,
            mut all,
        } = bufs;
        // [cx, cy, w, h, area] in f64.
        geo.clear();
        geo.extend(sb.iter().map(|r| {
            let [x1, y1, x2, y2] = r.f64s();
            let (w, h) = (x2 - x1, y2 - y1);
            [0.5 * (x1 + x2), 0.5 * (y1 + y2), w, h, w * h]
        }));
        let sides = 1e-10..=1e12;
        class.clear();
        class.extend(geo.iter().zip(part).map(|(g, &p)| {
            if p && sides.contains(&g[2]) && sides.contains(&g[3]) {
                binade(g[4])
            } else {
                NO_CLASS
            }
        }));
        // Room for every box: kept boxes never make it grow.
        all.clear();
        all.reserve(sb.len());
        let present = class.iter().filter(|&&c| c != NO_CLASS);
        let (e_min, e_max) =
            present.fold((i32::MAX, i32::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        let mut grids = Vec::new();
        if e_min <= e_max {
            let mut members: Vec<Vec<usize>> = vec![Vec::new(); (e_max - e_min + 1) as usize];
            for (p, &c) in class.iter().enumerate() {
                if c != NO_CLASS {
                    members[(c - e_min) as usize].push(p);
                }
            }
            grids = members
                .iter()
                .enumerate()
                .map(|(i, m)| (!m.is_empty()).then(|| ClassGrid::new(&geo, m, e_min + i as i32)))
                .collect();
        }
        ScaleIndex {
            t: thr * (1.0 - 1e-4),
            geo,
            class,
            e_min,
            grids,
            odd: Vec::new(),
            all,
        }
    }

    /// The vectors to keep for the next index.
    fn into_bufs(self) -> ScaleBufs<T> {
        ScaleBufs {
            geo: self.geo,
            class: self.class,
            all: self.all,
        }
    }

    fn grid(&self, e: i32) -> Option<&ClassGrid<T>> {
        let i = e.checked_sub(self.e_min)?;
        self.grids.get(usize::try_from(i).ok()?)?.as_ref()
    }
}

impl<T> ClassGrid<T> {
    fn new(geo: &[[f64; 5]], members: &[usize], e: i32) -> Self {
        let (mut lo, mut hi) = ([f64::MAX; 2], [f64::MIN; 2]);
        for &p in members {
            for a in 0..2 {
                lo[a] = lo[a].min(geo[p][a]);
                hi[a] = hi[a].max(geo[p][a]);
            }
        }
        // Cells about the side of a square box of this area class.
        let side = 2f64.powf(e as f64 / 2.0);
        let mut g = [
            axis_cells(hi[0] - lo[0], side),
            axis_cells(hi[1] - lo[1], side),
        ];
        let cap = 4 * members.len() + 16;
        while g[0] * g[1] > cap {
            g = [g[0].div_ceil(2), g[1].div_ceil(2)];
        }
        ClassGrid {
            origin: lo,
            inv: [axis_inv(hi[0] - lo[0], g[0]), axis_inv(hi[1] - lo[1], g[1])],
            g,
            cells: (0..g[0] * g[1]).map(|_| Vec::new()).collect(),
        }
    }

    fn cell(&self, a: usize, v: f64) -> u32 {
        axis_cell(v, self.origin[a], self.inv[a], self.g[a])
    }
}

impl<T: Element> KeptIndex<T> for ScaleIndex<T> {
    fn insert(&mut self, r: &Rec<T>) {
        self.all.push(*r);
        let p = r.pos as usize;
        let c = self.class[p];
        if c == NO_CLASS {
            self.odd.push(*r);
            return;
        }
        let [cx, cy, ..] = self.geo[p];
        let grid = self.grids[(c - self.e_min) as usize]
            .as_mut()
            .expect("a class with members has a grid");
        let (x, y) = (grid.cell(0, cx) as usize, grid.cell(1, cy) as usize);
        let gx = grid.g[0];
        grid.cells[y * gx + x].push(*r);
    }

    fn hit(&self, c: &Rec<T>, since: usize, thr: f64) -> bool {
        let p = c.pos as usize;
        if self.class[p] == NO_CLASS {
            return any_since(&self.all, c, since, thr);
        }
        if any_since(&self.odd, c, since, thr) {
            return true;
        }
        let [cx, cy, w, h, area] = self.geo[p];
        let t = self.t;
        let (e_lo, e_hi) = (
            binade(area * t * (1.0 - 1e-9)),
            binade(area / t * (1.0 + 1e-9)),
        );
        let k = 0.5 * (1.0 + 1.0 / t) * (1.0 + 1e-9);
        let rx = w * k + 1e-9 * cx.abs() + 1e-300;
        let ry = h * k + 1e-9 * cy.abs() + 1e-300;
        (e_lo..=e_hi).any(|e| {
            let Some(g) = self.grid(e) else { return false };
            let (x0, x1) = (g.cell(0, cx - rx), g.cell(0, cx + rx));
            let (y0, y1) = (g.cell(1, cy - ry), g.cell(1, cy + ry));
            (y0..=y1).any(|y| {
                (x0..=x1)
                    .any(|x| any_since(&g.cells[y as usize * g.g[0] + x as usize], c, since, thr))
            })
        })
    }
}
