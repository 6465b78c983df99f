//! Gathering sharded evaluation results: each rank detects its stride of the
//! evaluation set (`kestrel::app::dist::evaluate_sharded`), the detections are
//! gathered on every rank in dataset order, and COCO evaluation runs on the gathered
//! list, so N ranks give the single-device numbers.

use super::Collective;
use crate::error::{Error, Result};
use crate::eval::DetBox;

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
