//! Bad data (issue 15, part 4): images that fail to decode during training under
//! `skip_bad_images`, num_classes against the dataset's categories, size limits,
//! image_std zeros, degenerate annotation boxes, file names that leave the image
//! folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kestrel::config::Config;
use kestrel::data::coco::{CocoJson, MIN_BOX_SIDE};
use kestrel::data::image_io::save_png;
use kestrel::data::loader::{MAX_PREFETCH, MAX_WORKERS};
use kestrel::data::shapes::MAX_SHAPES_IMAGE_SIZE;
use kestrel::data::{
    generate_shapes, Batches, CocoDataset, CocoOptions, Dataset, Loader, LoaderConfig, LoaderState,
};
use kestrel::ops;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::runner::hooks::OptimizerHook;
use kestrel::runner::{DataLoader, Mode, Model, Runner, Schedule};
use kestrel::{Result, Tensor};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-df-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Four 32x32 shapes images with image 2 (`000002.png`) cut after its header: the
/// header check at opening passes, decoding fails.
fn dataset_with_truncated_image(name: &str, skip: bool) -> (PathBuf, Arc<CocoDataset>) {
    let dir = tmp_dir(name);
    generate_shapes(&dir, 5, 4, 32).unwrap();
    let bad = dir.join("images/000002.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let opts = CocoOptions {
        skip_bad_images: skip,
        ..CocoOptions::default()
    };
    let ds = CocoDataset::open_dir(&dir, opts).unwrap();
    assert_eq!(ds.len(), 4, "the header check passes the truncated image");
    (dir, Arc::new(ds))
}

fn loader(ds: Arc<CocoDataset>, workers: usize) -> Loader {
    Loader::new(
        ds,
        LoaderConfig {
            batch_size: 2,
            shuffle: false,
            hflip_prob: 0.0,
            workers,
            prefetch: 2,
            ..LoaderConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn a_truncated_image_is_replaced_at_load_time_when_skipping() {
    let (_dir, ds) = dataset_with_truncated_image("skip-load", true);
    for workers in [0, 2] {
        let l = loader(ds.clone(), workers);
        let b = l.load_batch(0, 0).unwrap();
        // Batch 0 is images 0 and 1; 1 fails and the next readable one, 2, stands in.
        assert_eq!(b.indices, [0, 2]);
        assert_eq!(b.samples.len(), 2);
        assert_eq!(b.samples[1].image_id, ds.images()[2].id);
        assert_eq!(b.skipped.len(), 1, "{:?}", b.skipped);
        assert!(b.skipped[0].contains("000002.png"), "{}", b.skipped[0]);
        // Through the worker threads, a whole epoch.
        let all: Vec<_> = l.epoch(0).collect::<Result<_>>().unwrap();
        let skipped: usize = all.iter().map(|b| b.skipped.len()).sum();
        assert_eq!((all.len(), skipped), (2, 1));
    }
}

#[test]
fn a_truncated_image_stops_the_loader_without_skipping() {
    let (_dir, ds) = dataset_with_truncated_image("no-skip-load", false);
    let e = loader(ds, 0).load_batch(0, 0).unwrap_err().to_string();
    assert!(e.contains("000002.png"), "{e}");
}

/// A runner loader over the dataset whose "model" reads one number per image.
struct PixelLoader {
    loader: Loader,
    batches: Option<Batches>,
    skipped: Vec<String>,
}

impl DataLoader for PixelLoader {
    type Batch = Vec<Vec<f32>>;
    fn len(&self) -> usize {
        self.loader.batches_per_epoch()
    }
    fn start(&mut self, epoch: u64, position: usize) -> Result<()> {
        self.batches = None;
        self.batches = Some(self.loader.resume_epoch(LoaderState {
            epoch,
            batch: position,
        }));
        Ok(())
    }
    fn next_batch(&mut self) -> Option<Result<Self::Batch>> {
        let b = self.batches.as_mut()?.next()?;
        Some(b.map(|mut b| {
            self.skipped.append(&mut b.skipped);
            b.samples
                .iter()
                .map(|s| vec![s.image[0] as f32 / 255.0, 1.0])
                .collect()
        }))
    }
    fn take_skipped(&mut self) -> Vec<String> {
        std::mem::take(&mut self.skipped)
    }
}

struct Dot {
    w: Tensor,
}

impl Model for Dot {
    type Batch = Vec<Vec<f32>>;
    fn params(&self) -> Vec<(String, Tensor)> {
        vec![("w".into(), self.w.clone())]
    }
    fn set_params(&mut self, p: Vec<Tensor>) -> Result<()> {
        self.w = p[0].clone();
        Ok(())
    }
    fn train_step(&mut self, batch: &Self::Batch, _: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let x = Tensor::from_vec(batch[0].clone(), [2])?;
        Ok(vec![(
            "loss_dot".into(),
            ops::sum(&ops::mul(&self.w, &x)?)?,
        )])
    }
}

#[test]
fn training_goes_on_past_a_truncated_image_and_the_log_counts_it() {
    let (dir, ds) = dataset_with_truncated_image("skip-train", true);
    let work = dir.join("work");
    let sgd = Sgd::new(SgdConfig {
        lr: 0.1,
        ..SgdConfig::default()
    })
    .unwrap();
    let model = Dot {
        w: Tensor::from_vec(vec![1.0f32, 0.0], [2]).unwrap(),
    };
    // Two epochs of two batches: the truncated image is met twice.
    let mut r = Runner::new(model, Box::new(sgd), &work, Schedule::Epochs(2), 0);
    r.log.quiet = true;
    r.set_train_loader(Box::new(PixelLoader {
        loader: loader(ds, 1),
        batches: None,
        skipped: Vec::new(),
    }));
    r.register_training_hooks(None, OptimizerHook::new(), None, None);
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(r.iter(), 4);
    assert_eq!(r.meta["skipped_samples"], 2);
    let log = std::fs::read_to_string(work.join("log.txt")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("skipped a sample"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines[1].contains("(2 so far)") && lines[1].contains("000002.png"));
}

/// A COCO dataset of one 20x20 image `img.png` in `dir/images`, with `json` patched.
fn coco_with(dir: &Path, patch: impl FnOnce(&mut serde_json::Value)) -> Result<CocoDataset> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    save_png(&images.join("img.png"), &[90u8; 3 * 20 * 20], 20, 20).unwrap();
    let mut j = serde_json::json!({
        "images": [{"id": 1, "file_name": "img.png", "width": 20, "height": 20}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2.0, 2.0, 8.0, 8.0]},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [4.0, 4.0, 6.0, 6.0]}
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"},
                       {"id": 9, "name": "bird"}]
    });
    patch(&mut j);
    let json: CocoJson = serde_json::from_value(j).unwrap();
    CocoDataset::from_json(json, &dir.join("ann.json"), &images, CocoOptions::default())
}

#[test]
fn num_classes_is_checked_against_the_categories_naming_one() {
    let dir = tmp_dir("num-classes");
    let ds = coco_with(&dir, |_| {}).unwrap();
    // Three categories need four classes (background included).
    ds.check_num_classes(4).unwrap();
    ds.check_num_classes(10).unwrap();
    let e = ds.check_num_classes(3).unwrap_err().to_string();
    assert!(
        e.contains("category id 9") && e.contains("bird") && e.contains("num_classes = 4"),
        "{e}"
    );
    let e = ds.check_num_classes(2).unwrap_err().to_string();
    assert!(e.contains("category id 7"), "{e}");
}

#[test]
fn degenerate_boxes_are_refused_naming_the_annotation() {
    for (bbox, what) in [
        (serde_json::json!([2.0, 2.0, 1e-7, 8.0]), "width 1e-7"),
        (serde_json::json!([2.0, 2.0, 8.0, 0.0]), "height 0"),
        // Inside the 1-pixel tolerance but nothing left after clamping to the image.
        (
            serde_json::json!([20.5, 2.0, 0.4, 8.0]),
            "outside after clamping",
        ),
    ] {
        let dir = tmp_dir("degenerate");
        let e = coco_with(&dir, |j| j["annotations"][1]["bbox"] = bbox.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("annotation id 11") && e.contains("degenerate"),
            "{what}: {e}"
        );
    }
    // A crowd region is no training target: a thin one is kept.
    let dir = tmp_dir("degenerate-crowd");
    let ds = coco_with(&dir, |j| {
        j["annotations"][1]["bbox"] = serde_json::json!([2.0, 2.0, 1e-7, 8.0]);
        j["annotations"][1]["iscrowd"] = serde_json::json!(1);
    })
    .unwrap();
    assert_eq!(ds.annotations(0).len(), 2);
    // The smallest accepted side.
    let dir = tmp_dir("degenerate-min");
    coco_with(&dir, |j| {
        j["annotations"][1]["bbox"] = serde_json::json!([0.0, 2.0, MIN_BOX_SIDE, 8.0])
    })
    .unwrap();
}

#[test]
fn file_names_leaving_the_image_folder_are_refused_unless_allowed() {
    let dir = tmp_dir("escape");
    // A real image outside the image folder, reachable by `..`.
    save_png(&dir.join("outside.png"), &[7u8; 3 * 20 * 20], 20, 20).unwrap();
    let abs = dir.join("outside.png").display().to_string();
    for name in ["../outside.png", abs.as_str(), "sub/../../outside.png"] {
        let e = coco_with(&dir, |j| j["images"][0]["file_name"] = name.into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image id 1") && e.contains("leaves the image directory"),
            "{name}: {e}"
        );
        assert!(e.contains("allow_outside_image_dir"), "{e}");
    }
    // skip_bad_images does not turn the refusal into a skip.
    let mut j: CocoJson = serde_json::from_value(serde_json::json!({
        "images": [{"id": 1, "file_name": "../outside.png"}, {"id": 2, "file_name": "img.png"}],
        "categories": [{"id": 1, "name": "x"}]
    }))
    .unwrap();
    let skip = CocoOptions {
        skip_bad_images: true,
        ..CocoOptions::default()
    };
    let images = dir.join("images");
    assert!(CocoDataset::from_json(j.clone(), &dir.join("a.json"), &images, skip).is_err());
    // Allowed by the option, the image loads.
    let allow = CocoOptions {
        allow_outside_image_dir: true,
        ..CocoOptions::default()
    };
    j.images.truncate(1);
    let ds = CocoDataset::from_json(j, &dir.join("a.json"), &images, allow).unwrap();
    assert_eq!(ds.load(0).unwrap().pixel(0, 0, 0), 7);
    // Sub-folders are fine.
    std::fs::create_dir_all(images.join("sub")).unwrap();
    std::fs::copy(images.join("img.png"), images.join("sub/img.png")).unwrap();
    coco_with(&dir, |j| {
        j["images"][0]["file_name"] = "./sub/img.png".into()
    })
    .unwrap();
}

#[test]
fn sizes_have_upper_bounds_that_errors_name() {
    let dir = tmp_dir("limits");
    let e = generate_shapes(&dir, 0, 1, 100_000)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&MAX_SHAPES_IMAGE_SIZE.to_string()), "{e}");
    generate_shapes(&dir, 0, 1, MAX_SHAPES_IMAGE_SIZE + 1).unwrap_err();

    let ds: Arc<dyn Dataset> = Arc::new(kestrel::data::InMemory(vec![
        kestrel::data::Sample {
            image: vec![0; 3 * 4 * 4],
            height: 4,
            width: 4,
            boxes: vec![],
            labels: vec![],
            image_id: 1,
        };
        2
    ]));
    let cfg = |workers, prefetch| LoaderConfig {
        workers,
        prefetch,
        ..LoaderConfig::default()
    };
    let e = Loader::new(ds.clone(), cfg(100_000, 2))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&MAX_WORKERS.to_string()), "{e}");
    let e = Loader::new(ds.clone(), cfg(1, 1 << 40))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&MAX_PREFETCH.to_string()), "{e}");
    Loader::new(ds, cfg(MAX_WORKERS, MAX_PREFETCH)).unwrap();

    let e = Config::from_toml_str("[data]\nnum_workers = 100000\n", "t.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.num_workers") && e.contains("256"), "{e}");
}

#[test]
fn image_std_must_be_positive() {
    for std in ["[0.0, 0.0, 0.0]", "[0.2, -0.1, 0.2]", "[0.2, nan, 0.2]"] {
        let text = format!("[model.transform]\nimage_std = {std}\n");
        let e = Config::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.transform.image_std"), "{std}: {e}");
    }
    Config::from_toml_str("[model.transform]\nimage_std = [0.5, 0.5, 0.5]\n", "t.toml").unwrap();
}
