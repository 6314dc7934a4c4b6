//! Writing a llama-family GGUF (version 3, little-endian) from a Hugging Face model directory.
//!
//! The file is streamed: every tensor's size is known from its shape and type, so the header
//! with all offsets is written first and tensors follow one at a time (read from the memory
//! map, permuted, quantized with candle's ggml-compatible quantizers, written, dropped). The
//! sha256 is computed while writing, so the Ollama blob name costs no second pass.
//! Metadata is exactly the keys llama.cpp reads for `llama` (or `qwen3`) with the types it
//! checks (u32 hyper-parameters, f32 eps/theta, i32 token types): nothing extra.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use sha2::{Digest, Sha256};

use super::PublishError;
use super::hf::{HfModel, RopeScaling, TensorPlan};
use super::tokenizer::{GgufTokenizer, read_tokenizer};
use crate::spec::publish::Quantization;

/// GGUF's default data alignment; candle and llama.cpp use it when `general.alignment` is
/// absent, which it is here.
pub const ALIGNMENT: u64 = 32;

/// What an export produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    /// The file written.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256 of its bytes (the Ollama blob name without `sha256:`).
    pub sha256: String,
    /// Tensor type of the 2-D weights.
    pub quantization: Quantization,
    /// `general.file_type` written (llama.cpp's `llama_ftype`).
    pub file_type: u32,
    /// Tensors written.
    pub tensor_count: usize,
    /// Parameters written (tied embeddings counted once).
    pub parameter_count: u64,
    /// `llama.context_length`.
    pub context_length: u32,
    /// Wall time of the export.
    pub seconds: f64,
    /// What of the model the GGUF does not carry ([`GgufTokenizer::dropped`]).
    pub dropped: Option<&'static str>,
}

/// llama.cpp's `llama_ftype` for a file whose 2-D weights all have one type.
pub fn file_type(q: Quantization) -> u32 {
    match q {
        Quantization::F32 => 0,
        Quantization::F16 => 1,
        Quantization::Q4_0 => 2,
        Quantization::Q8_0 => 7,
        // MOSTLY_Q4_K_S: every 2-D weight Q4_K (llama.cpp's own Q4_K_S mixes in some Q5_K).
        Quantization::Q4K => 14,
    }
}

/// ggml's type id (`enum ggml_type`).
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The metadata of a llama (or qwen3) GGUF, in the order llama.cpp's converter writes it.
pub fn metadata(
    model: &HfModel,
    tok: &GgufTokenizer,
    name: &str,
    quantization: Quantization,
) -> Vec<(String, Value)> {
    let c = &model.config;
    let arch = c.arch.name();
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    // The architecture's own keys are named after it (`llama.block_count`, `qwen3.block_count`).
    let own = |key: &str| format!("{arch}.{key}");
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.to_string())),
        (
            "general.file_type".into(),
            Value::U32(file_type(quantization)),
        ),
        (own("context_length"), Value::U32(c.context_length)),
        (own("embedding_length"), Value::U32(c.hidden_size)),
        (own("block_count"), Value::U32(c.num_layers)),
        (own("feed_forward_length"), Value::U32(c.intermediate_size)),
        (own("attention.head_count"), Value::U32(c.num_heads)),
        (own("attention.head_count_kv"), Value::U32(c.num_kv_heads)),
        (own("rope.dimension_count"), Value::U32(c.head_dim)),
        (own("rope.freq_base"), Value::F32(c.rope_theta)),
        (
            own("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps),
        ),
        (own("vocab_size"), Value::U32(c.vocab_size)),
    ];
    if c.explicit_head_dim() {
        kv.push((own("attention.key_length"), Value::U32(c.head_dim)));
        kv.push((own("attention.value_length"), Value::U32(c.head_dim)));
    }
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        kv.push((own("rope.scaling.type"), Value::String("linear".into())));
        kv.push((own("rope.scaling.factor"), Value::F32(factor)));
    }
    let tokenizer: [(&str, Value); 7] = [
        ("tokenizer.ggml.model", Value::String(tok.model.into())),
        ("tokenizer.ggml.pre", Value::String(tok.pre.into())),
        ("tokenizer.ggml.tokens", strings(&tok.tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(tok.token_types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&tok.merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(tok.bos_token_id)),
        ("tokenizer.ggml.eos_token_id", Value::U32(tok.eos_token_id)),
    ];
    kv.extend(tokenizer.map(|(k, v)| (k.to_string(), v)));
    if let Some(pad) = tok.padding_token_id {
        kv.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(pad)));
    }
    kv.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.add_bos_token),
    ));
    kv.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(tok.add_eos_token),
    ));
    if let Some(t) = &tok.chat_template {
        kv.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    kv
}

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_string<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF value type ids (`enum gguf_type`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_string(w, s),
        Value::Array(items) => {
            // Arrays are homogeneous and never nested (llama.cpp rejects nesting); callers
            // only build arrays of strings or i32.
            let elem = items.first().map_or(4, value_type);
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
    }
}

fn pad_to_alignment<W: Write>(w: &mut HashingWriter<W>) -> io::Result<()> {
    let pad = (ALIGNMENT - w.bytes % ALIGNMENT) % ALIGNMENT;
    w.write_all(&[0u8; ALIGNMENT as usize][..pad as usize])
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Writes the GGUF for `model` to `out` (any writer; nothing is seeked). Returns the bytes
/// written and their sha256 (hex). `progress` hears about each tensor.
pub(crate) fn write_gguf<W: Write>(
    model: &HfModel,
    metadata: &[(String, Value)],
    out: W,
    out_path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(u64, String), PublishError> {
    let io_err = |e: io::Error| PublishError::io("write", out_path, e);
    let mut w = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, out),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let header = |w: &mut HashingWriter<_>| -> io::Result<()> {
        w.write_all(b"GGUF")?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(model.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            write_string(w, key)?;
            w.write_all(&value_type(value).to_le_bytes())?;
            write_value(w, value)?;
        }
        let mut offset = 0u64;
        for t in &model.tensors {
            write_string(w, &t.gguf_name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            // GGUF lists dimensions innermost first: PyTorch [out, in] becomes [in, out]
            // with the same row-major bytes.
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&ggml_type_id(t.dtype).to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += padded(t.data_bytes());
        }
        pad_to_alignment(w)
    };
    header(&mut w).map_err(io_err)?;
    let total = model.tensors.len();
    for (i, plan) in model.tensors.iter().enumerate() {
        let data = quantized_bytes(model, plan)?;
        w.write_all(&data).map_err(io_err)?;
        pad_to_alignment(&mut w).map_err(io_err)?;
        if i + 1 == total || (i + 1) % 16 == 0 {
            progress(&format!(
                "wrote tensor {}/{total} ({})",
                i + 1,
                plan.gguf_name
            ));
        }
    }
    w.flush().map_err(io_err)?;
    let bytes = w.bytes;
    let sha = hex::encode(w.hasher.finalize());
    let file = w
        .inner
        .into_inner()
        .map_err(|e| PublishError::io("write", out_path, e.into_error()))?;
    drop(file);
    Ok((bytes, sha))
}

fn quantized_bytes(model: &HfModel, plan: &TensorPlan) -> Result<Vec<u8>, PublishError> {
    let err = |reason: String| PublishError::Tensor {
        path: model.weights_path.clone(),
        name: plan.hf_name.clone(),
        reason,
    };
    let t = model.load_f32(plan)?;
    // F32 goes through QTensor too: its byte copy is optimised code in candle.
    let q = QTensor::quantize(&t, plan.dtype).map_err(|e| err(e.to_string()))?;
    let data = q.data().map_err(|e| err(e.to_string()))?.into_owned();
    if data.len() as u64 != plan.data_bytes() {
        return Err(err(format!(
            "quantized to {} bytes, expected {}",
            data.len(),
            plan.data_bytes()
        )));
    }
    Ok(data)
}

/// Everything an export needs, opened and checked before any byte is written.
pub(crate) struct Prepared {
    pub model: HfModel,
    pub tokenizer: GgufTokenizer,
}

/// Opens and checks a model directory for export.
pub(crate) fn prepare(
    model_dir: &Path,
    quantization: Quantization,
) -> Result<Prepared, PublishError> {
    let model = HfModel::open(model_dir, quantization)?;
    let tokenizer = read_tokenizer(model_dir, &model.config)?;
    Ok(Prepared { model, tokenizer })
}

/// Exports the Hugging Face-layout model in `model_dir` as a llama GGUF at `out`, written to
/// a temporary file beside it and renamed, so `out` is never half-written.
pub fn export_gguf(
    model_dir: &Path,
    quantization: Quantization,
    out: &Path,
) -> Result<GgufSummary, PublishError> {
    let started = Instant::now();
    let p = prepare(model_dir, quantization)?;
    // general.name: the output's stem ("tiny-q8_0" for tiny-q8_0.gguf) says more than the
    // model directory's name, which is usually the job's "output".
    let name = out
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let meta = metadata(&p.model, &p.tokenizer, &name, quantization);
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.gguf".into());
    // Beside `out` so the rename stays on one filesystem; removed on any error.
    let tmp =
        PartialFile::create(&dir.join(format!(".{file_name}.partial-{}", std::process::id())))?;
    let (bytes, sha256) = write_gguf(
        &p.model,
        &meta,
        &tmp.file,
        out,
        &mut |m| tracing::debug!(target: "publish", "{m}"),
    )?;
    tmp.persist(out)?;
    let summary = GgufSummary {
        path: out.to_path_buf(),
        bytes,
        sha256,
        quantization,
        file_type: file_type(quantization),
        tensor_count: p.model.tensors.len(),
        parameter_count: p.model.parameter_count(),
        context_length: p.model.config.context_length,
        seconds: started.elapsed().as_secs_f64(),
        dropped: p.tokenizer.dropped,
    };
    tracing::info!(
        target: "publish",
        path = %out.display(),
        bytes,
        quantization = %quantization,
        seconds = summary.seconds,
        "exported GGUF"
    );
    Ok(summary)
}

/// A file written under a temporary name and renamed when complete; removed if dropped
/// before that.
struct PartialFile {
    path: PathBuf,
    file: std::fs::File,
    done: bool,
}

impl PartialFile {
    fn create(path: &Path) -> Result<PartialFile, PublishError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| PublishError::io("create", path, e))?;
        Ok(PartialFile {
            path: path.to_path_buf(),
            file,
            done: false,
        })
    }

    fn persist(mut self, dest: &Path) -> Result<(), PublishError> {
        self.file
            .sync_all()
            .map_err(|e| PublishError::io("sync", &self.path, e))?;
        std::fs::rename(&self.path, dest)
            .map_err(|e| PublishError::io("rename into place", dest, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
