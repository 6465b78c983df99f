//! Embedding Kestrel: load a checkpoint (Kestrel's own, or a torchvision state_dict
//! saved as safetensors) and detect objects in an image.

fn main() -> Result<(), kestrel::Error> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || kestrel::Error::invalid("embed", "usage: embed CHECKPOINT IMAGE");
    let mut model = kestrel::FasterRcnn::from_checkpoint(args.get(1).ok_or_else(usage)?)?;
    model.to_device(kestrel::Device::best())?;
    let detections: kestrel::Detections = model.detect_image(args.get(2).ok_or_else(usage)?)?;
    println!("{detections:?}");
    Ok(())
}
