//! Drawn detections name their class and small images are drawn enlarged.

use kestrel::data::image_io::load_rgb;
use kestrel::detection::draw::{draw_scale, label_text, save_detections_png, Canvas};
use kestrel::Detections;

fn names() -> Vec<String> {
    ["rectangle", "ellipse", "triangle"]
        .map(String::from)
        .to_vec()
}

#[test]
fn labels_name_the_class_and_fall_back_to_the_number() {
    assert_eq!(label_text(2, 0.974, &names()), "ELLIPSE 0.97");
    assert_eq!(label_text(1, 0.5, &names()), "RECTANGLE 0.50");
    assert_eq!(
        label_text(4, 0.5, &names()),
        "4 0.50",
        "no name for label 4"
    );
    assert_eq!(label_text(3, 0.5, &[]), "3 0.50");
}

#[test]
fn small_images_are_drawn_enlarged_by_an_integer_factor() {
    assert_eq!(draw_scale(128, 128), 4);
    assert_eq!(draw_scale(100, 60), 5);
    assert_eq!(draw_scale(800, 1216), 1);
    assert_eq!(draw_scale(1, 1), 8, "capped");
    let (h, w) = (64, 96);
    let chw = vec![40u8; 3 * h * w];
    let d = Detections {
        boxes: vec![[10.0, 20.0, 50.0, 60.0]],
        scores: vec![0.9],
        labels: vec![3],
    };
    let dir = std::env::temp_dir().join(format!("kestrel-draw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("det.png");
    save_detections_png(&p, &chw, h, w, &d, 0.5, &names()).unwrap();
    let img = load_rgb(&p).unwrap();
    let k = draw_scale(h, w);
    assert_eq!((img.height, img.width), (h * k, w * k));
    // The box's left edge lands at x = 10 * k in the enlarged image, in the class
    // colour; the background stays grey.
    let px = |x: usize, y: usize| {
        (0..3)
            .map(|c| img.data[(c * img.height + y) * img.width + x])
            .collect::<Vec<u8>>()
    };
    assert_ne!(px(10 * k, 40 * k), vec![40, 40, 40]);
    assert_eq!(px(30 * k, 40 * k), vec![40, 40, 40]);
}

/// Letters render (a name label is not blank where a digit-only font drew nothing).
#[test]
fn the_font_draws_letters() {
    let mut a = Canvas::from_chw(&vec![0u8; 3 * 10 * 40], 10, 40).unwrap();
    a.text(0, 0, "TRIANGLE", [255, 255, 255], [0, 0, 0]);
    let lit = a.rgb.iter().filter(|&&v| v == 255).count();
    assert!(lit > 3 * 30, "{lit} lit channels");
}
