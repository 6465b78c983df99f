//! safetensors files: named tensors plus string metadata (torchvision state_dicts
//! converted with `safetensors.torch.save_file`, the fixtures, our checkpoints).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

/// A safetensors file read into memory.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Read and validate the header of `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<TensorFile> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(path, bytes)
    }

    /// Validate the bytes of a safetensors file held in memory; `path` names it in
    /// errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<TensorFile> {
        let path = path.into();
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        // Validate offsets of every tensor now, so later lookups cannot fail on format.
        SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(TensorFile {
            path,
            bytes,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn st(&self) -> SafeTensors<'_> {
        // Validated in `open`; the bytes are immutable since.
        SafeTensors::deserialize(&self.bytes).expect("validated in TensorFile::open")
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st().names().into_iter().map(String::from).collect();
        v.sort();
        v
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    /// String metadata of the file.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The `params` metadata entry parsed as JSON (the fixtures' case settings).
    pub fn params(&self) -> Result<serde_json::Value> {
        let s = self
            .metadata
            .get("params")
            .ok_or_else(|| Error::Safetensors {
                path: self.path.clone(),
                msg: "no `params` metadata".into(),
            })?;
        serde_json::from_str(s).map_err(|e| Error::Safetensors {
            path: self.path.clone(),
            msg: format!("`params` is not JSON: {e}"),
        })
    }

    fn raw(&self, name: &str) -> Result<(StDtype, Vec<usize>, &[u8])> {
        let st = SafeTensors::deserialize(&self.bytes).expect("validated in TensorFile::open");
        let v = st.tensor(name).map_err(|_| Error::Tensor {
            name: name.to_string(),
            msg: format!("missing from {}", self.path.display()),
        })?;
        let (dtype, shape) = (v.dtype(), v.shape().to_vec());
        let off = v.data().as_ptr() as usize - self.bytes.as_ptr() as usize;
        let len = v.data().len();
        Ok((dtype, shape, &self.bytes[off..off + len]))
    }

    /// A float tensor (F32 stays f32, F64 becomes an f64 tensor), on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (dtype, shape, data) = self.raw(name)?;
        match dtype {
            StDtype::F32 => Tensor::from_vec(read_le::<4, f32>(data, f32::from_le_bytes), shape),
            StDtype::F64 => Tensor::from_vec(read_le::<8, f64>(data, f64::from_le_bytes), shape),
            other => Err(Error::Tensor {
                name: name.into(),
                msg: format!(
                    "dtype {other:?} where a float tensor is expected ({})",
                    self.path.display()
                ),
            }),
        }
    }

    /// A float tensor that must have `shape`; the error names the tensor and both shapes.
    pub fn tensor_shaped(&self, name: &str, shape: &Shape) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.shape() != shape {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!(
                    "shape {} in {}, expected {shape}",
                    t.shape(),
                    self.path.display()
                ),
            });
        }
        Ok(t)
    }

    /// An integer tensor (I64, I32, U8 or BOOL) as an i64 [`Tensor`] on the CPU.
    pub fn int_tensor(&self, name: &str) -> Result<Tensor> {
        let (v, shape) = self.ints(name)?;
        Tensor::from_vec_i64(v, shape)
    }

    /// An integer tensor (I64, I32 or U8) as i64 values and its shape.
    pub fn ints(&self, name: &str) -> Result<(Vec<i64>, Shape)> {
        let (dtype, shape, data) = self.raw(name)?;
        let v = match dtype {
            StDtype::I64 => read_le::<8, i64>(data, i64::from_le_bytes),
            StDtype::I32 => read_le::<4, i32>(data, i32::from_le_bytes)
                .into_iter()
                .map(i64::from)
                .collect(),
            StDtype::U8 => data.iter().map(|&b| b as i64).collect(),
            StDtype::BOOL => data.iter().map(|&b| (b != 0) as i64).collect(),
            other => {
                return Err(Error::Tensor {
                    name: name.into(),
                    msg: format!("dtype {other:?} where an integer tensor is expected"),
                })
            }
        };
        Ok((v, Shape::new(shape)))
    }
}

fn read_le<const N: usize, T>(data: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact gives N bytes")))
        .collect()
}

/// Write `path` so that a crash at any point leaves either the old file or the new
/// one: write a temporary file beside it, fsync, rename over, fsync the directory.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // A full disk or a failed rename must not leave a partial file behind (a
        // `--resume` after each failure would add another).
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // best effort: not every filesystem allows fsync on a directory
    }
    Ok(())
}

/// Save named tensors (copied to the host) with string metadata, atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut owned: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dt, bytes) = match t.dtype() {
            DType::F32 => (
                StDtype::F32,
                t.to_vec::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F64 => (
                StDtype::F64,
                t.to_vec::<f64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                StDtype::I64,
                t.to_vec_i64()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                StDtype::BF16,
                t.to_vec_bf16()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        };
        owned.push((name.to_string(), dt, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, shape, b)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Tensor {
                    name: n.clone(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}
