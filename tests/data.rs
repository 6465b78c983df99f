//! Data: shapes -> COCO files -> dataset round trip, determinism by seed, COCO loading
//! (category mapping, crowd, images without annotations, JPEG), every bad-input case,
//! skipping bad images, horizontal flip, and the loader's reproducible, resumable order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kestrel::data::coco::{CocoJson, JsonAnnotation, JsonCategory, JsonImage};
use kestrel::data::image_io::save_png;
use kestrel::data::shapes::SHAPE_CLASSES;
use kestrel::data::{
    generate_shapes, generate_shapes_in_memory, hflip, CocoDataset, CocoOptions, Dataset, InMemory,
    Loader, LoaderConfig, LoaderState, Sample, ShapesConfig, VerifyImages,
};
use kestrel::eval::{evaluate, DetBox};

/// A fresh, empty directory for one test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("kestrel-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------
// Shapes.
// ---------------------------------------------------------------------------------

#[test]
fn shapes_round_trip_through_coco_files() {
    let dir = TempDir::new("round-trip");
    let (seed, count, size) = (11, 6, 64);
    let summary = generate_shapes(dir.path(), seed, count, size).unwrap();
    assert_eq!(summary.images, count);
    let mem = generate_shapes_in_memory(&ShapesConfig::new(seed, count, size)).unwrap();
    assert_eq!(summary.objects, mem.coco.annotations.len());

    let ds = CocoDataset::open_dir(dir.path(), CocoOptions::default()).unwrap();
    assert_eq!(ds.len(), count);
    assert_eq!(ds.num_classes(), SHAPE_CLASSES.len());
    for i in 0..count {
        // PNG is lossless: pixels, boxes and labels come back exactly.
        let s = ds.load(i).unwrap();
        assert_eq!(s, mem.samples[i], "image {i} differs after the round trip");
    }
    // The files' ground truth is the in-memory one.
    assert_eq!(ds.ground_truth(), mem.ground_truth());
}

#[test]
fn shapes_are_deterministic_by_seed() {
    let cfg = ShapesConfig::new(5, 8, 64);
    let a = generate_shapes_in_memory(&cfg).unwrap();
    let b = generate_shapes_in_memory(&cfg).unwrap();
    assert_eq!(a.samples, b.samples);
    let c = generate_shapes_in_memory(&ShapesConfig::new(6, 8, 64)).unwrap();
    assert_ne!(
        a.samples[0].image, c.samples[0].image,
        "seed 6 gave seed 5's image"
    );
    // Image i depends on (seed, i) only: fewer images give a prefix.
    let short = generate_shapes_in_memory(&ShapesConfig::new(5, 3, 64)).unwrap();
    assert_eq!(short.samples[..], a.samples[..3]);
}

#[test]
fn shapes_have_classes_sizes_overlaps_and_exact_boxes() {
    let size = 128;
    let data = generate_shapes_in_memory(&ShapesConfig::new(1, 60, size)).unwrap();
    let mut per_class = [0usize; 3];
    let (mut small, mut medium, mut large, mut overlaps) = (0, 0, 0, 0);
    for (s, a) in data.samples.iter().zip(data_by_image(&data.coco)) {
        assert!(!s.boxes.is_empty(), "image {} has no object", s.image_id);
        assert_eq!(s.image.len(), 3 * size * size);
        for (b, l) in s.boxes.iter().zip(&s.labels) {
            per_class[*l as usize - 1] += 1;
            assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= size as f32 && b[3] <= size as f32);
            assert!(b[2] > b[0] && b[3] > b[1]);
        }
        for ann in &a {
            let area = ann.area.unwrap();
            let [_, _, w, h] = ann.bbox.clone().unwrap()[..] else {
                unreachable!()
            };
            assert!(area > 0.0 && area <= w * h, "area {area} of a {w}x{h} box");
            match area {
                x if x < 32.0 * 32.0 => small += 1,
                x if x < 96.0 * 96.0 => medium += 1,
                _ => large += 1,
            }
        }
        for i in 0..s.boxes.len() {
            for j in 0..i {
                let (p, q) = (s.boxes[i], s.boxes[j]);
                if p[0] < q[2] && q[0] < p[2] && p[1] < q[3] && q[1] < p[3] {
                    overlaps += 1;
                }
            }
        }
    }
    assert!(
        per_class.iter().all(|&n| n >= 10),
        "objects per class {per_class:?}"
    );
    // On 128-pixel images few objects can be "large" (> 96²); none are required.
    assert!(
        small >= 10 && medium >= 10,
        "sizes {small}/{medium}/{large}"
    );
    assert!(overlaps >= 5, "only {overlaps} overlapping pairs");
}

fn data_by_image(coco: &CocoJson) -> Vec<Vec<JsonAnnotation>> {
    coco.images
        .iter()
        .map(|im| {
            coco.annotations
                .iter()
                .filter(|a| a.image_id == im.id)
                .cloned()
                .collect()
        })
        .collect()
}

#[test]
fn shapes_ground_truth_evaluates_to_one_against_itself() {
    let data = generate_shapes_in_memory(&ShapesConfig::new(2, 10, 64)).unwrap();
    let gt = data.ground_truth();
    let dets: Vec<DetBox> = gt
        .annotations
        .iter()
        .map(|a| DetBox {
            image_id: a.image_id,
            category_id: a.category_id,
            bbox: a.bbox,
            score: 1.0,
        })
        .collect();
    let ev = evaluate(&gt, &dets).unwrap();
    // 1 up to pycocotools' eps in tp / (tp + fp + eps).
    assert!((ev.stats[0] - 1.0).abs() < 1e-12, "{:?}", ev.stats);
    assert!((ev.stats[1] - 1.0).abs() < 1e-12, "{:?}", ev.stats);
}

#[test]
fn shapes_cli_writes_a_dataset() {
    let dir = TempDir::new("cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["shapes", "--out"])
        .arg(dir.path())
        .args(["--seed", "3", "--count", "4", "--size", "48"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = CocoDataset::open_dir(dir.path(), CocoOptions::default()).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!((ds.images()[0].width, ds.images()[0].height), (48, 48));
}

// ---------------------------------------------------------------------------------
// COCO loading.
// ---------------------------------------------------------------------------------

/// A valid little dataset: three 32x24 images (PNG, PNG, JPEG), categories with ids
/// 7, 3, 12 (not sorted, with gaps), image 2 without annotations, one crowd region.
fn write_dataset(dir: &Path) -> CocoJson {
    let (w, h) = (32usize, 24usize);
    let pixels: Vec<u8> = (0..3 * w * h).map(|i| (i * 7 % 251) as u8).collect();
    save_png(&dir.join("a.png"), &pixels, h, w).unwrap();
    save_png(&dir.join("b.png"), &pixels, h, w).unwrap();
    let hwc = kestrel::data::image_io::chw_to_hwc(&pixels, h, w);
    image::save_buffer_with_format(
        dir.join("c.jpg"),
        &hwc,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    let img = |id, name: &str| JsonImage {
        id,
        file_name: Some(name.into()),
        width: Some(w as u64),
        height: Some(h as u64),
    };
    let ann = |id, image_id, category_id, bbox: [f64; 4], crowd: i64| JsonAnnotation {
        id,
        image_id,
        category_id,
        bbox: Some(bbox.to_vec()),
        area: None,
        iscrowd: Some(crowd.into()),
    };
    let cat = |id, name: &str| JsonCategory {
        id,
        name: name.into(),
    };
    let coco = CocoJson {
        images: vec![img(1, "a.png"), img(2, "b.png"), img(3, "c.jpg")],
        annotations: vec![
            ann(10, 1, 12, [1.0, 2.0, 10.0, 5.0], 0),
            ann(11, 1, 3, [0.0, 0.0, 32.0, 24.0], 1),
            ann(12, 3, 7, [4.0, 4.0, 8.0, 8.0], 0),
            // Overshoots the right edge by half a pixel: within tolerance, clamped.
            ann(13, 3, 3, [20.0, 10.0, 12.5, 6.0], 0),
        ],
        categories: vec![cat(7, "seven"), cat(3, "three"), cat(12, "twelve")],
    };
    coco.write(&dir.join("ann.json")).unwrap();
    coco
}

fn open(dir: &Path, opts: CocoOptions) -> kestrel::Result<CocoDataset> {
    CocoDataset::open(&dir.join("ann.json"), dir, opts)
}

#[test]
fn coco_dataset_maps_categories_and_keeps_empty_images() {
    let dir = TempDir::new("valid");
    write_dataset(dir.path());
    let ds = open(dir.path(), CocoOptions::default()).unwrap();
    assert_eq!(ds.len(), 3, "the image without annotations is kept");
    // Ascending ids 3, 7, 12 -> labels 1, 2, 3.
    assert_eq!(
        (
            ds.label_of(3),
            ds.label_of(7),
            ds.label_of(12),
            ds.label_of(5)
        ),
        (Some(1), Some(2), Some(3), None)
    );
    assert_eq!(
        (ds.category_id(1), ds.category_id(3), ds.category_id(0)),
        (Some(3), Some(12), None)
    );

    let s = ds.load(0).unwrap();
    // The crowd region is not a training target; the box is [x1, y1, x2, y2].
    assert_eq!(s.boxes, vec![[1.0, 2.0, 11.0, 7.0]]);
    assert_eq!(s.labels, vec![3]);
    assert_eq!((s.height, s.width, s.image.len()), (24, 32, 3 * 24 * 32));
    assert_eq!(s.pixel(1, 2, 3), ((24 * 32 + 2 * 32 + 3) * 7 % 251) as u8);

    let empty = ds.load(1).unwrap();
    assert!(empty.boxes.is_empty() && empty.labels.is_empty());

    let jpeg = ds.load(2).unwrap();
    assert_eq!(
        jpeg.boxes,
        vec![[4.0, 4.0, 12.0, 12.0], [20.0, 10.0, 32.0, 16.0]]
    );
    assert_eq!(jpeg.labels, vec![2, 1]);
    assert_eq!(jpeg.image.len(), 3 * 24 * 32);

    // Evaluation sees every annotation, the crowd one included, with w*h areas.
    let gt = ds.ground_truth();
    assert_eq!(gt.annotations.len(), 4);
    assert!(gt
        .annotations
        .iter()
        .any(|a| a.iscrowd && a.area == 32.0 * 24.0));
    assert_eq!(gt.category_ids, vec![3, 7, 12]);
}

/// Write the valid dataset, let `edit` break it, and return the error text of opening
/// (or of loading every image, if opening succeeds).
fn error_after(name: &str, edit: impl FnOnce(&Path, &mut CocoJson)) -> String {
    let dir = TempDir::new(name);
    let mut coco = write_dataset(dir.path());
    edit(dir.path(), &mut coco);
    if !dir.path().join("ann.json.keep").exists() {
        coco.write(&dir.path().join("ann.json")).unwrap();
    }
    let ds = match open(dir.path(), CocoOptions::default()) {
        Err(e) => return e.to_string(),
        Ok(ds) => ds,
    };
    for i in 0..ds.len() {
        if let Err(e) = ds.load(i) {
            return e.to_string();
        }
    }
    panic!("{name}: no error");
}

/// Replace ann.json by `text` (and keep it).
fn raw_json(dir: &Path, text: &str) {
    std::fs::write(dir.join("ann.json"), text).unwrap();
    std::fs::write(dir.join("ann.json.keep"), "").unwrap();
}

fn assert_mentions(what: &str, err: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            err.contains(n),
            "{what}: error does not mention `{n}`: {err}"
        );
    }
}

#[test]
fn malformed_json_names_file_line_and_column() {
    let e = error_after("malformed", |d, _| {
        raw_json(d, "{\"images\": [\n {\"id\": 1,, }]}")
    });
    assert_mentions("malformed", &e, &["ann.json", "line 2", "column"]);
}

#[test]
fn truncated_json_names_file_and_position() {
    let e = error_after("truncated", |d, c| {
        let text = serde_json::to_string(c).unwrap();
        raw_json(d, &text[..text.len() / 2]);
    });
    assert_mentions("truncated", &e, &["ann.json", "line 1", "column"]);
}

#[test]
fn annotation_on_missing_image_is_an_error() {
    let e = error_after("missing-image-id", |_, c| c.annotations[2].image_id = 99);
    assert_mentions(
        "missing image id",
        &e,
        &["ann.json", "annotation id 12", "image id 99"],
    );
}

#[test]
fn unknown_category_is_an_error() {
    let e = error_after("unknown-category", |_, c| c.annotations[0].category_id = 5);
    assert_mentions(
        "unknown category",
        &e,
        &["ann.json", "annotation id 10", "category id 5"],
    );
}

#[test]
fn negative_box_size_is_an_error() {
    let e = error_after("negative-box", |_, c| {
        c.annotations[2].bbox = Some(vec![4.0, 4.0, -3.0, 8.0])
    });
    assert_mentions(
        "negative width",
        &e,
        &["ann.json", "annotation id 12", "negative"],
    );
}

#[test]
fn box_outside_the_image_is_an_error() {
    let e = error_after("outside-box", |_, c| {
        c.annotations[0].bbox = Some(vec![25.0, 2.0, 10.0, 5.0])
    });
    assert_mentions(
        "outside",
        &e,
        &["ann.json", "annotation id 10", "outside", "image id 1"],
    );
}

#[test]
fn empty_dataset_is_an_error() {
    let e = error_after("empty", |_, c| {
        c.images.clear();
        c.annotations.clear();
    });
    assert_mentions("empty", &e, &["ann.json", "empty dataset"]);
    let e = error_after("no-categories", |_, c| {
        c.categories.clear();
        c.annotations.clear();
    });
    assert_mentions("no categories", &e, &["ann.json", "empty dataset"]);
}

#[test]
fn missing_image_file_is_an_error() {
    let e = error_after("missing-file", |d, _| {
        std::fs::remove_file(d.join("b.png")).unwrap()
    });
    assert_mentions("missing file", &e, &["b.png"]);
}

#[test]
fn corrupt_image_file_is_an_error() {
    let e = error_after("corrupt-file", |d, _| {
        std::fs::write(d.join("b.png"), b"this is not an image at all").unwrap()
    });
    assert_mentions("corrupt file", &e, &["b.png"]);
}

/// A PNG cut in half: its header is fine, its pixels are not.
fn truncate_png(dir: &Path) {
    let p = dir.join("b.png");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn truncated_image_is_an_error_when_loaded() {
    // The default (header) check passes; decoding names the file.
    let e = error_after("truncated-png", |d, _| truncate_png(d));
    assert_mentions("truncated png", &e, &["b.png", "corrupt"]);

    // With full verification, opening already fails.
    let dir = TempDir::new("truncated-png-verify");
    write_dataset(dir.path());
    truncate_png(dir.path());
    let opts = CocoOptions {
        verify: VerifyImages::Decode,
        ..Default::default()
    };
    let e = open(dir.path(), opts).unwrap_err().to_string();
    assert_mentions("truncated png, decode check", &e, &["b.png"]);
}

#[test]
fn image_size_disagreeing_with_json_is_an_error() {
    let e = error_after("size-mismatch", |_, c| c.images[0].width = Some(40));
    assert_mentions(
        "size mismatch",
        &e,
        &["a.png", "image id 1", "32x24", "40x24"],
    );
}

#[test]
fn bad_images_can_be_skipped() {
    let dir = TempDir::new("skip");
    write_dataset(dir.path());
    std::fs::write(dir.path().join("a.png"), b"garbage").unwrap();
    truncate_png(dir.path());
    let opts = CocoOptions {
        skip_bad_images: true,
        verify: VerifyImages::Decode,
        ..Default::default()
    };
    let ds = open(dir.path(), opts).unwrap();
    assert_eq!(
        ds.len(),
        1,
        "a.png (garbage) and b.png (truncated) are skipped"
    );
    assert_eq!(ds.images()[0].file_name, "c.jpg");
    assert_eq!(ds.load(0).unwrap().labels, vec![2, 1]);
    assert!(ds
        .ground_truth()
        .annotations
        .iter()
        .all(|a| a.image_id == 3));

    // With every image bad, nothing is left: an error, not an empty dataset.
    std::fs::write(dir.path().join("c.jpg"), b"garbage").unwrap();
    let e = open(dir.path(), opts).unwrap_err().to_string();
    assert_mentions("all skipped", &e, &["ann.json", "empty dataset"]);
}

// ---------------------------------------------------------------------------------
// Transforms and loader.
// ---------------------------------------------------------------------------------

#[test]
fn hflip_mirrors_pixels_and_boxes() {
    let (h, w) = (2usize, 3usize);
    let s = Sample {
        image: (0..3 * h * w as u8 as usize).map(|v| v as u8).collect(),
        height: h,
        width: w,
        boxes: vec![[0.0, 0.0, 1.0, 2.0], [0.5, 1.0, 3.0, 1.5]],
        labels: vec![1, 2],
        image_id: 4,
    };
    let f = hflip(&s);
    // Row [0, 1, 2] becomes [2, 1, 0]; x1' = W - x2, x2' = W - x1.
    assert_eq!(&f.image[..6], &[2, 1, 0, 5, 4, 3]);
    assert_eq!(&f.image[12..], &[14, 13, 12, 17, 16, 15]);
    assert_eq!(f.boxes, vec![[2.0, 0.0, 3.0, 2.0], [0.0, 1.0, 2.5, 1.5]]);
    assert_eq!((f.labels.clone(), f.image_id), (s.labels.clone(), 4));
    assert_eq!(hflip(&f), s);
}

fn shapes_loader(n: usize, workers: usize, hflip_prob: f64) -> Loader {
    let data = generate_shapes_in_memory(&ShapesConfig::new(9, n, 32)).unwrap();
    let cfg = LoaderConfig {
        batch_size: 3,
        seed: 42,
        hflip_prob,
        workers,
        prefetch: 4,
        ..Default::default()
    };
    Loader::new(Arc::new(data), cfg).unwrap()
}

#[test]
fn loader_order_is_a_reproducible_permutation() {
    let l = shapes_loader(10, 0, 0.0);
    let o0 = l.order(0);
    let mut sorted = o0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_eq!(
        o0,
        shapes_loader(10, 2, 0.5).order(0),
        "order depends only on seed and epoch"
    );
    assert_ne!(o0, l.order(1), "epochs 0 and 1 have the same order");
    assert_eq!(l.batches_per_epoch(), 4);
    let sizes: Vec<usize> = l.epoch(0).map(|b| b.unwrap().samples.len()).collect();
    assert_eq!(sizes, vec![3, 3, 3, 1]);
}

fn collect(
    it: impl Iterator<Item = kestrel::Result<kestrel::data::Batch>>,
) -> Vec<kestrel::data::Batch> {
    it.map(|b| b.unwrap()).collect()
}

#[test]
fn loader_threads_give_the_same_batches_as_inline() {
    let inline = collect(shapes_loader(10, 0, 0.5).epoch(2));
    let threaded = collect(shapes_loader(10, 3, 0.5).epoch(2));
    assert_eq!(inline, threaded);
    // Flips happened, and only as flips of the stored samples.
    let data = generate_shapes_in_memory(&ShapesConfig::new(9, 10, 32)).unwrap();
    let mut flipped = 0;
    for b in &inline {
        for (s, &i) in b.samples.iter().zip(&b.indices) {
            let orig = data.get(i).unwrap();
            if *s != orig {
                assert_eq!(*s, hflip(&orig));
                flipped += 1;
            }
        }
    }
    assert!(flipped > 0 && flipped < 10, "{flipped} of 10 flipped");
}

#[test]
fn loader_resumes_where_it_stopped() {
    // An uninterrupted stream over 3 epochs, and one stopped after 5 batches (inside
    // epoch 1) then resumed from its saved state: the same batches, in the same order.
    let l = shapes_loader(10, 2, 0.5);
    let full = collect(l.iter_from(LoaderState::default()).take(12));
    let mut first = l.iter_from(LoaderState::default());
    let head = collect(first.by_ref().take(5));
    let state = first.state();
    assert_eq!(state, LoaderState { epoch: 1, batch: 1 });
    drop(first); // stops its workers mid-stream
    let resumed = shapes_loader(10, 1, 0.5);
    let tail = collect(resumed.iter_from(state).take(7));
    assert_eq!([head, tail].concat(), full);

    // Epoch-based: the rest of epoch 1.
    let rest = collect(l.resume_epoch(LoaderState { epoch: 1, batch: 2 }));
    assert_eq!(rest, full[6..8].to_vec());
}

#[test]
fn loader_errors_name_the_bad_file() {
    let dir = TempDir::new("loader-error");
    write_dataset(dir.path());
    truncate_png(dir.path());
    let ds = open(dir.path(), CocoOptions::default()).unwrap();
    let cfg = LoaderConfig {
        batch_size: 1,
        shuffle: false,
        workers: 2,
        ..Default::default()
    };
    let results: Vec<_> = Loader::new(Arc::new(ds), cfg).unwrap().epoch(0).collect();
    assert!(results[0].is_ok() && results[2].is_ok());
    let e = results[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("b.png"), "{e}");
}

#[test]
fn loader_rejects_bad_settings() {
    let ds: Arc<dyn Dataset> = Arc::new(InMemory(Vec::new()));
    assert!(Loader::new(ds, LoaderConfig::default()).is_err());
    let data = Arc::new(generate_shapes_in_memory(&ShapesConfig::new(0, 2, 32)).unwrap());
    let zero = LoaderConfig {
        batch_size: 0,
        ..Default::default()
    };
    assert!(Loader::new(data.clone(), zero).is_err());
    let drop_all = LoaderConfig {
        batch_size: 3,
        drop_last: true,
        ..Default::default()
    };
    assert!(Loader::new(data, drop_all).is_err());
}
