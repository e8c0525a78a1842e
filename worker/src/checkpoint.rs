#![forbid(unsafe_code)]
//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are read on demand and converted to `f32`; a tensor
//! that is never asked for is never read (its pages are never touched).

use crate::error::{ModelError, Result};
use safetensors::{Dtype, SafeTensors, tensor::TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).field("shards", &self.shards.len()).finish()
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let map = crate::kernels::mmap_file(&file).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let (n, meta) = SafeTensors::read_metadata(&map[..])
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    let tensors = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
    Ok(Shard { path: path.to_path_buf(), map, data_start: 8 + n, tensors })
}

impl Checkpoint {
    /// Open `dir`: `model.safetensors.index.json` (sharded) if present, else `model.safetensors`,
    /// else every `*.safetensors` file in the directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Safetensors { path: index_path.clone(), msg: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Safetensors {
                path: index_path.clone(),
                msg: "no weight_map".into(),
            })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort();
            names.dedup();
            for n in names {
                if n.contains("..") || n.contains('/') {
                    return Err(ModelError::Safetensors { path: index_path.clone(), msg: format!("bad shard name {n:?}") });
                }
                files.push(dir.join(n));
            }
        } else if dir.join("model.safetensors").exists() {
            files.push(dir.join("model.safetensors"));
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
            for e in rd.flatten() {
                let p = e.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".safetensors") && name != "expected.safetensors" {
                    files.push(p);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(ModelError::NoCheckpoint(dir.to_path_buf()));
        }
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for f in &files {
            let s = open_shard(f)?;
            for name in s.tensors.keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(s);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, index })
    }

    /// Releases the pages of every shard this process has read (see
    /// [`crate::kernels::release_mapped_pages`]): called once a model has copied out what it
    /// holds, so its resident memory is about its weights once. Best effort: a failure only
    /// leaves the pages resident.
    pub fn release_pages(&self) {
        for s in &self.shards {
            if let Err(e) = crate::kernels::release_mapped_pages(&s.map) {
                tracing::debug!(path = %s.path.display(), error = %e, "could not release mapped pages");
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        let s = &self.shards[*self.index.get(name)?];
        let t = s.tensors.get(name)?;
        Some((t.dtype, &t.shape))
    }

    /// Distinct dtypes of the stored tensors.
    pub fn dtypes(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.shards.iter().flat_map(|s| s.tensors.values().map(|t| format!("{:?}", t.dtype))).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.shards.iter().flat_map(|s| s.tensors.values()).map(|t| t.data_offsets.1 - t.data_offsets.0).sum()
    }

    /// Read tensor `name` as `f32`, checking its shape is `expected`.
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (shard, t) = self.lookup(name)?;
        if t.shape != expected {
            return Err(ModelError::ShapeMismatch { name: name.into(), expected: expected.to_vec(), found: t.shape.clone() });
        }
        let n: usize = expected.iter().product();
        self.convert(shard, t, name, 0, n)
    }

    /// Read rows `[row, row + rows)` of the first axis of a tensor whose full shape is
    /// `full_shape` (used for fused `[experts, ...]` tensors).
    pub fn load_slice(&self, name: &str, full_shape: &[usize], index: usize) -> Result<Vec<f32>> {
        let (shard, t) = self.lookup(name)?;
        if t.shape != full_shape {
            return Err(ModelError::ShapeMismatch { name: name.into(), expected: full_shape.to_vec(), found: t.shape.clone() });
        }
        let per: usize = full_shape[1..].iter().product();
        self.convert(shard, t, name, index * per, per)
    }

    fn lookup(&self, name: &str) -> Result<(&Shard, &TensorInfo)> {
        let missing = || ModelError::MissingTensor { name: name.to_string() };
        let s = &self.shards[*self.index.get(name).ok_or_else(missing)?];
        let t = s.tensors.get(name).ok_or_else(missing)?;
        Ok((s, t))
    }

    /// Convert `count` elements starting at element `start` of tensor `t`.
    fn convert(&self, s: &Shard, t: &TensorInfo, name: &str, start: usize, count: usize) -> Result<Vec<f32>> {
        let esize = match t.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => return Err(ModelError::UnsupportedDtype { name: name.into(), dtype: format!("{other:?}") }),
        };
        let begin = s.data_start + t.data_offsets.0 + start * esize;
        let end = begin + count * esize;
        if end > s.data_start + t.data_offsets.1 || end > s.map.len() {
            return Err(ModelError::Safetensors { path: s.path.clone(), msg: format!("tensor {name} out of bounds") });
        }
        let bytes = &s.map[begin..end];
        let out = match t.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
            _ => bytes.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        };
        // The caller keeps its own copy (converted, packed): the mapped pages need not stay
        // resident beside it. Without this the peak memory of a load was the checkpoint twice.
        let _ = crate::kernels::release_mapped_range(&s.map, begin, end - begin);
        Ok(out)
    }
}
