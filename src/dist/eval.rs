//! Sharded evaluation: each rank detects its stride of the evaluation set, the
//! detections are gathered on every rank in dataset order, and COCO evaluation runs
//! on the gathered list, so N ranks give the single-device numbers.

use super::Collective;
use crate::data::Dataset;
use crate::detection::trainer::{to_coco, DetBatch};
use crate::detection::FasterRcnn;
use crate::error::{Error, Result};
use crate::eval::{CocoEvaluation, DetBox, GroundTruth};
use crate::Device;

const RECORD: usize = 8 + 8 + 8 + 4 * 8 + 8;

/// Every rank's detections, as `(dataset index, detections of that image)`, gathered
/// on every rank: ordered by dataset index, each index once (the padding of the last
/// round of shards repeats images; their copies are dropped).
pub fn gather_detections(
    comm: &dyn Collective,
    local: &[(usize, Vec<DetBox>)],
) -> Result<Vec<(usize, Vec<DetBox>)>> {
    let mut bytes = Vec::new();
    for (index, dets) in local {
        for d in dets {
            bytes.extend((*index as u64).to_le_bytes());
            bytes.extend(d.image_id.to_le_bytes());
            bytes.extend(d.category_id.to_le_bytes());
            for v in d.bbox {
                bytes.extend(v.to_le_bytes());
            }
            bytes.extend(d.score.to_le_bytes());
        }
        // An image without detections still marks its index as done.
        bytes.extend((*index as u64 | 1 << 63).to_le_bytes());
        bytes.extend([0u8; RECORD - 8]);
    }
    let parts = comm.all_gather_bytes(&bytes)?;
    let mut by_index: std::collections::BTreeMap<usize, (usize, Vec<DetBox>)> =
        std::collections::BTreeMap::new();
    for (rank, part) in parts.iter().enumerate() {
        if part.len() % RECORD != 0 {
            return Err(Error::Distributed(format!(
                "rank {rank} sent {} bytes of detections",
                part.len()
            )));
        }
        let mut cur: Vec<DetBox> = Vec::new();
        for r in part.chunks_exact(RECORD) {
            let u = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().expect("8 bytes"));
            let head = u(0);
            if head & 1 << 63 != 0 {
                let index = (head & !(1 << 63)) as usize;
                // The first rank to report an image wins; a padded copy is identical.
                let dets = std::mem::take(&mut cur);
                by_index.entry(index).or_insert((rank, dets));
                continue;
            }
            let f = |o: usize| f64::from_bits(u(o));
            cur.push(DetBox {
                image_id: u(8) as i64,
                category_id: u(16) as i64,
                bbox: [f(24), f(32), f(40), f(48)],
                score: f(56),
            });
        }
    }
    Ok(by_index
        .into_iter()
        .map(|(i, (_, dets))| (i, dets))
        .collect())
}

/// COCO evaluation of `model` on `dataset`, sharded over the ranks of `comm`: rank
/// `r` detects images `r, r + W, ...` in batches of `batch_size`, the detections are
/// gathered in dataset order and every rank evaluates them (same numbers on every
/// rank). Equal to [`crate::detection::trainer::evaluate_model`] on one device
/// whenever an image's detections do not depend on which images share its batch
/// (batch size 1, or images of one size).
pub fn evaluate_sharded(
    comm: &dyn Collective,
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    gt: &GroundTruth,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<CocoEvaluation> {
    // DistributedSampler's stride without its padding: padded copies would be
    // detected twice for nothing.
    let mine: Vec<usize> = (comm.rank()..dataset.len())
        .step_by(comm.world_size())
        .collect();
    let mut local = Vec::with_capacity(mine.len());
    for chunk in mine.chunks(batch_size.max(1)) {
        let samples = chunk
            .iter()
            .map(|&i| dataset.get(i))
            .collect::<Result<Vec<_>>>()?;
        let batch = DetBatch::from_samples(&samples)?;
        let images = batch
            .images
            .iter()
            .map(|t| t.to_device(device))
            .collect::<Result<Vec<_>>>()?;
        let dets = crate::autograd::no_grad(|| model.detect(&images))?;
        for ((d, id), &i) in dets.iter().zip(&batch.image_ids).zip(chunk) {
            local.push((i, to_coco(d, *id, category_id)?));
        }
    }
    let gathered = gather_detections(comm, &local)?;
    let dets: Vec<DetBox> = gathered.into_iter().flat_map(|(_, d)| d).collect();
    crate::eval::evaluate(gt, &dets)
}
