//! Files the worker writes and reads: safetensors (Hugging Face layout, single or sharded) and
//! the durable-write helper every file that must never be half-written goes through.
//!
//! Writes go to a temporary file in the same directory, are fsynced, get mode 0644 (others
//! on the machine, such as the Ollama publisher, must read them; Candle's `VarMap::save`
//! would leave 0600) and are renamed into place; the directory is fsynced after.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::TrainError;

/// Writes `bytes` to `path` durably and atomically (temp file, fsync, chmod 0644, rename,
/// directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    write_atomic_with(path, |w| {
        w.write_all(bytes).map_err(|e| TrainError::io(path, e))
    })
}

/// Like [`write_atomic`], with the content streamed by `fill` (so large files need not be
/// built in memory first).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| TrainError::io(&tmp, e.into_error()))?;
        let io = |e| TrainError::io(path, e);
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        sync_dir(dir).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a directory so that renames inside it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A tensor's values in f32 little-endian bytes (the layout safetensors stores).
pub fn f32_bytes(t: &Tensor) -> Result<Vec<u8>, TrainError> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// Streams `tensors` (as f32) in safetensors format to `out`: the header, then each tensor's
/// bytes in name order, converting one tensor at a time. `{"format": "pt"}` in `metadata`
/// makes `transformers` accept the file.
pub fn write_safetensors(
    out: &mut dyn Write,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &[(&str, &str)],
) -> Result<(), TrainError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        header.insert("__metadata__".into(), meta.into());
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.elem_count() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&header).expect("header serializes");
    // The format pads the header with spaces to an 8-byte boundary.
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let io = |e| TrainError::io(Path::new("safetensors"), e);
    out.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&h).map_err(io)?;
    for t in tensors.values() {
        out.write_all(&f32_bytes(t)?).map_err(io)?;
    }
    Ok(())
}

/// safetensors bytes of `tensors` in f32, built in memory (for small files and tests).
pub fn safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>, TrainError> {
    let mut out = Vec::new();
    write_safetensors(&mut out, tensors, metadata)?;
    Ok(out)
}

/// Writes `tensors` (as f32) to a safetensors file, atomically, mode 0644.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
    write_atomic_with(path, |w| write_safetensors(w, tensors, &[("format", "pt")]))
}

/// Reads a safetensors file, every tensor converted to f32 on `device`.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let map = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        TrainError::BadModel {
            path: path.to_path_buf(),
            reason: format!("not a readable safetensors file: {e}"),
        }
    })?;
    map.into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect()
}

/// Reads a Hugging Face checkpoint's weights: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn load_hf_weights(
    dir: &Path,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>, TrainError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return load_safetensors(&single, device);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| TrainError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::BadModel {
        path: index.clone(),
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| TrainError::BadModel {
            path: index.clone(),
            reason: "no weight_map".into(),
        })?;
    let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    let mut out = BTreeMap::new();
    for f in files {
        if f.contains('/') || f.contains("..") {
            return Err(TrainError::BadModel {
                path: index.clone(),
                reason: format!("shard name {f:?} leaves the model directory"),
            });
        }
        out.extend(load_safetensors(&dir.join(f), device)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let mut m = BTreeMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor::new(&[[1f32, -2.5], [3.0, 4.25]], &dev).unwrap(),
        );
        m.insert("b".to_string(), Tensor::new(&[7f32], &dev).unwrap());
        let p = dir.path().join("model.safetensors");
        save_safetensors(&p, &m).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let back = load_hf_weights(dir.path(), &dev).unwrap();
        assert_eq!(
            back["a.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, -2.5], vec![3.0, 4.25]]
        );
        assert_eq!(back.len(), 2);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Downloaded checkpoints are usually bf16 or f16: they load as f32.
    #[test]
    fn half_precision_files_load_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let t = Tensor::new(&[1.5f32, -0.333, 1000.25], &dev).unwrap();
        let mut m = std::collections::HashMap::new();
        m.insert("bf".to_string(), t.to_dtype(DType::BF16).unwrap());
        m.insert("f16".to_string(), t.to_dtype(DType::F16).unwrap());
        let p = dir.path().join("half.safetensors");
        candle_core::safetensors::save(&m, &p).unwrap();
        let back = load_safetensors(&p, &dev).unwrap();
        for (k, dt) in [("bf", DType::BF16), ("f16", DType::F16)] {
            assert_eq!(back[k].dtype(), DType::F32);
            let want = t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(
                back[k].to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap()
            );
        }
    }
}
