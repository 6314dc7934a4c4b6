//! Checkpoints: `checkpoint-<step>/` directories under the checkpoint directory, each holding
//! the trainable weights, the optimizer moments, the trainer state (step, schedule, data
//! position, generator state, metrics history, best metric) and a manifest with the size
//! and SHA-256 of every file.
//!
//! A checkpoint is built in a hidden temporary directory, fsynced and renamed into place, so
//! a directory named `checkpoint-<step>` is complete unless the disk lied; the manifest then
//! catches truncation and corruption, and resume falls back to the previous checkpoint.
//! Rotation (`save_total_limit`) deletes old checkpoints only after the new one is in place.
//! Writing happens on a background thread from a host snapshot, so training goes on while a
//! checkpoint is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::TrainError;
use super::data::Position;
use super::rng::Rng;
use super::weights::{load_safetensors, sync_dir, write_safetensors};
use crate::spec::JobSpec;

/// File names inside a checkpoint directory.
pub mod names {
    /// Trainable weights (all weights, or the LoRA adapters only).
    pub const WEIGHTS: &str = "weights.safetensors";
    /// AdamW moments, `m.<name>` and `v.<name>`.
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    /// [`super::TrainerState`] as JSON.
    pub const STATE: &str = "trainer_state.json";
    /// The tokenizer in use (so a scratch run keeps its trained tokenizer).
    pub const TOKENIZER: &str = "tokenizer.json";
    /// Sizes and checksums of the files above; written last.
    pub const MANIFEST: &str = "manifest.json";
}

/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// Everything besides tensors a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Steps planned in total.
    pub total_steps: u64,
    /// AdamW's update count (bias correction).
    pub adam_step: u64,
    /// Where the next step's data starts.
    pub position: Position,
    /// Micro-batches already accumulated into the next step (0: checkpoints are taken between
    /// optimizer steps).
    pub accumulated_micro_batches: u64,
    /// The learning-rate schedule's position: the next step's index, with the schedule.
    pub lr_scheduler: SchedulerState,
    /// Dropout generator state.
    pub rng: Rng,
    /// Every metrics record written so far, as its `metrics.jsonl` line (kept as text so the
    /// file is rewritten byte for byte on resume).
    pub log_history: Vec<String>,
    /// Sum of step losses since the last record.
    #[serde(with = "exact")]
    pub pending_loss_sum: f64,
    /// Steps since the last record.
    pub pending_steps: u64,
    /// Best evaluation metric so far.
    #[serde(with = "exact_opt")]
    pub best_metric: Option<f64>,
    /// The checkpoint holding the best metric (`checkpoint-<step>`).
    pub best_checkpoint: Option<String>,
    /// Hash of the training-relevant job spec ([`spec_hash`]).
    pub spec_hash: String,
    /// Those settings ([`settings`]), so that a mismatch can name what differs (absent in
    /// older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
    /// Hash of the tokenized training data.
    pub data_key: String,
    /// `"full"` or `"lora"`.
    pub trainable: String,
    /// f16 training's dynamic loss scale (absent for f32/bf16 and in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<super::optim::LossScale>,
}

/// The schedule's settings and position, recorded for inspection and checked on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// `lr_scheduler_type`.
    pub kind: String,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Total steps.
    pub total_steps: u64,
    /// The schedule's position: optimizer steps applied so far (an f16 step skipped on
    /// overflow does not advance it, as in Trainer), the index of the next step's rate.
    pub next_step: u64,
}

/// f64 as its shortest round-trip decimal string: serde_json's default float parsing is
/// only best-effort, and resume must restore these sums exactly.
mod exact {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&x.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// [`exact`] for optional values.
mod exact_opt {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match x {
            Some(v) => s.serialize_some(&v.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(D::Error::custom))
            .transpose()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    step: u64,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    bytes: u64,
    sha256: String,
}

/// Everything in the job spec that changes the trained weights, as JSON: `[model]`, `[data]`,
/// `[training]` and `[lora]`, less what only logs, saves or resumes (`logging_steps`,
/// `logging_first_step`, `save_steps`, `save_total_limit`, `resume_from_checkpoint`), what
/// computes the same bits another way (`gradient_checkpointing`), how evaluation is batched,
/// and, unless `load_best_model_at_end` picks the output by it, when and on what it is judged.
/// A run may resume with any of those changed.
pub fn settings(spec: &JobSpec) -> serde_json::Value {
    let mut t = spec.training.clone().unwrap_or_default();
    t.save_steps = 0;
    t.save_total_limit = None;
    t.resume_from_checkpoint = Default::default();
    // Recomputing activations gives the same gradients, bit for bit.
    t.gradient_checkpointing = false;
    t.logging_steps = 0;
    t.logging_first_step = false;
    t.per_device_eval_batch_size = 0;
    if !t.load_best_model_at_end {
        t.eval_strategy = Default::default();
        t.eval_steps = None;
        t.metric_for_best_model = None;
        t.greater_is_better = None;
    }
    serde_json::json!({
        "model": spec.model,
        "data": spec.data,
        "training": t,
        "lora": spec.lora,
    })
}

/// The hash of [`settings`], recorded in each checkpoint.
pub fn spec_hash(spec: &JobSpec) -> String {
    hex::encode(Sha256::digest(settings(spec).to_string().as_bytes()))
}

/// The hash checkpoints written before [`settings`] left out logging and evaluation options:
/// they still resume.
fn spec_hash_v1(spec: &JobSpec) -> String {
    let mut t = spec.training.clone().unwrap_or_default();
    t.save_steps = 0;
    t.save_total_limit = None;
    t.resume_from_checkpoint = Default::default();
    t.gradient_checkpointing = false;
    let v = serde_json::json!({
        "model": spec.model,
        "data": spec.data,
        "training": t,
        "lora": spec.lora,
    });
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// Whether a checkpoint was written by a job with the same [`settings`] as `spec`; if not, the
/// settings that differ (`training.learning_rate: 0.003 there, 0.001 here`), when the
/// checkpoint records its own (older ones keep only the hash).
pub fn matches(state: &TrainerState, spec: &JobSpec) -> Result<(), Vec<String>> {
    if state.spec_hash == spec_hash(spec) || state.spec_hash == spec_hash_v1(spec) {
        return Ok(());
    }
    let Some(theirs) = &state.settings else {
        return Err(Vec::new());
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", theirs, &mut a);
    flatten("", &settings(spec), &mut b);
    let theirs: std::collections::BTreeMap<_, _> = a.into_iter().collect();
    let ours: std::collections::BTreeMap<_, _> = b.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = theirs.keys().chain(ours.keys()).collect();
    let shown = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| theirs.get(*k) != ours.get(*k))
        .filter(|k| !same_file_named(theirs.get(*k), ours.get(*k)))
        .map(|k| {
            format!(
                "{k}: {} there, {} here",
                shown(theirs.get(k)),
                shown(ours.get(k))
            )
        })
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(differ)
    }
}

/// Whether two settings (JSON-encoded) are absolute paths of one existing file or directory,
/// written differently (`a/../b`, a symlink, a bind mount): the same data, the same base.
fn same_file_named(a: Option<&String>, b: Option<&String>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let path = |v: Option<&String>| {
        let s: String = serde_json::from_str(v?).ok()?;
        s.starts_with('/')
            .then(|| std::fs::metadata(s).ok())
            .flatten()
    };
    match (path(a), path(b)) {
        (Some(x), Some(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `{"a": {"b": 1}}` as `[("a.b", "1")]`.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// The directory name of the checkpoint at `step`.
pub fn dir_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// The checkpoints in `dir`, newest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.file_type().ok()?.is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

/// Checks a checkpoint against its manifest; returns its state, or why it is unusable.
pub fn verify(dir: &Path) -> Result<TrainerState, String> {
    let manifest_path = dir.join(names::MANIFEST);
    let text =
        std::fs::read_to_string(&manifest_path).map_err(|e| format!("{}: {e}", names::MANIFEST))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", names::MANIFEST))?;
    if manifest.version != FORMAT_VERSION {
        return Err(format!(
            "layout version {} (this worker reads {FORMAT_VERSION})",
            manifest.version
        ));
    }
    for required in [names::WEIGHTS, names::OPTIMIZER, names::STATE] {
        if !manifest.files.iter().any(|f| f.name == required) {
            return Err(format!("the manifest does not list {required}"));
        }
    }
    for f in &manifest.files {
        if f.name.contains('/') {
            return Err(format!("bad file name {:?} in the manifest", f.name));
        }
        let bytes = std::fs::read(dir.join(&f.name)).map_err(|e| format!("{}: {e}", f.name))?;
        if bytes.len() as u64 != f.bytes {
            return Err(format!(
                "{} has {} bytes, the manifest says {} (truncated?)",
                f.name,
                bytes.len(),
                f.bytes
            ));
        }
        if hex::encode(Sha256::digest(&bytes)) != f.sha256 {
            return Err(format!("{} does not match its checksum (corrupt)", f.name));
        }
    }
    let state_text = std::fs::read_to_string(dir.join(names::STATE)).map_err(|e| e.to_string())?;
    let state: TrainerState =
        serde_json::from_str(&state_text).map_err(|e| format!("{}: {e}", names::STATE))?;
    if state.step != manifest.step {
        return Err(format!(
            "state step {} but manifest step {}",
            state.step, manifest.step
        ));
    }
    Ok(state)
}

/// The newest checkpoint in `dir` that verifies. Unusable newer ones are reported on stderr
/// (a line the daemon shows in the job's log) and skipped.
pub fn latest_valid(dir: &Path) -> Option<(PathBuf, TrainerState)> {
    let all = list(dir);
    for (i, (_, path)) in all.iter().enumerate() {
        match verify(path) {
            Ok(state) => return Some((path.clone(), state)),
            Err(reason) => {
                tracing::warn!(checkpoint = %path.display(), %reason, "skipping unusable checkpoint");
                let next = if i + 1 < all.len() {
                    "trying the previous one"
                } else {
                    "no usable checkpoint is left: training starts again from step 0"
                };
                eprintln!(
                    "jobd worker: skipping checkpoint {}: {reason}; {next}",
                    path.display()
                );
            }
        }
    }
    None
}

/// Tensors of a verified checkpoint: trainable weights and the optimizer's `m`/`v`.
pub struct Loaded {
    /// Trainable weights by name.
    pub weights: BTreeMap<String, Tensor>,
    /// First moments by parameter name.
    pub m: BTreeMap<String, Tensor>,
    /// Second moments by parameter name.
    pub v: BTreeMap<String, Tensor>,
    /// The tokenizer saved with the checkpoint, if any.
    pub tokenizer_json: Option<String>,
}

/// Reads the tensors of a verified checkpoint onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded, TrainError> {
    let weights = load_safetensors(&dir.join(names::WEIGHTS), device)?;
    let mut m = BTreeMap::new();
    let mut v = BTreeMap::new();
    for (k, t) in load_safetensors(&dir.join(names::OPTIMIZER), device)? {
        if let Some(n) = k.strip_prefix("m.") {
            m.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("v.") {
            v.insert(n.to_string(), t);
        }
    }
    let tokenizer_json = std::fs::read_to_string(dir.join(names::TOKENIZER)).ok();
    Ok(Loaded {
        weights,
        m,
        v,
        tokenizer_json,
    })
}

/// A checkpoint's contents copied to the host, ready to be written without touching the
/// (still training) model. Taking it costs a memory copy; serialising, hashing and writing
/// happen in [`Snapshot::write`], off the training thread.
pub struct Snapshot {
    /// The step.
    pub step: u64,
    weights: BTreeMap<String, Tensor>,
    moments: BTreeMap<String, Tensor>,
    state: Vec<u8>,
    tokenizer: Vec<u8>,
}

/// A copy of `t` on the host that later in-place updates of `t` do not reach.
fn host_copy(t: &Tensor) -> Result<Tensor, TrainError> {
    Ok(if t.device().is_cpu() {
        t.copy()?
    } else {
        t.to_device(&Device::Cpu)?
    })
}

impl Snapshot {
    /// Copies the trainable weights, moments, state and tokenizer.
    pub fn take(
        weights: &BTreeMap<String, Tensor>,
        moments: &BTreeMap<String, Tensor>,
        state: &TrainerState,
        tokenizer_json: &str,
    ) -> Result<Self, TrainError> {
        let copy = |m: &BTreeMap<String, Tensor>| -> Result<BTreeMap<String, Tensor>, TrainError> {
            m.iter()
                .map(|(k, t)| Ok((k.clone(), host_copy(t)?)))
                .collect()
        };
        Ok(Snapshot {
            step: state.step,
            weights: copy(weights)?,
            moments: copy(moments)?,
            state: serde_json::to_vec_pretty(state).expect("state serializes"),
            tokenizer: tokenizer_json.as_bytes().to_vec(),
        })
    }

    /// Approximate size of the checkpoint on disk, in bytes.
    pub fn bytes(&self) -> usize {
        let tensors: usize = self
            .weights
            .values()
            .chain(self.moments.values())
            .map(|t| t.elem_count() * 4)
            .sum();
        tensors + self.state.len() + self.tokenizer.len()
    }

    /// Writes the checkpoint durably into `root/checkpoint-<step>` (temp dir, fsync, rename),
    /// then applies the rotation policy.
    pub fn write(self, root: &Path, keep: Rotation) -> Result<PathBuf, TrainError> {
        let final_dir = root.join(dir_name(self.step));
        let ck_err = |reason: String| TrainError::Checkpoint {
            path: final_dir.clone(),
            reason,
        };
        std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        if final_dir.exists() && verify(&final_dir).is_ok() {
            let on_disk = std::fs::read(final_dir.join(names::STATE)).unwrap_or_default();
            if on_disk == self.state {
                // Resumed exactly at a saved step: the same state is already on disk.
                return Ok(final_dir);
            }
        }
        let tmp = root.join(format!(
            ".tmp-{}-{}",
            dir_name(self.step),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        let mut manifest = Manifest {
            version: FORMAT_VERSION,
            step: self.step,
            files: Vec::new(),
        };
        let meta = [("format", "pt")];
        let tensors = [
            (names::WEIGHTS, &self.weights),
            (names::OPTIMIZER, &self.moments),
        ];
        for (name, map) in tensors {
            let path = tmp.join(name);
            let (bytes, sha256) = write_synced(&path, |w| write_safetensors(w, map, &meta))?;
            manifest.files.push(ManifestFile {
                name: name.to_string(),
                bytes,
                sha256,
            });
        }
        for (name, data) in [
            (names::STATE, &self.state),
            (names::TOKENIZER, &self.tokenizer),
        ] {
            let path = tmp.join(name);
            let (bytes, sha256) = write_synced(&path, |w| {
                w.write_all(data).map_err(|e| TrainError::io(&path, e))
            })?;
            manifest.files.push(ManifestFile {
                name: name.to_string(),
                bytes,
                sha256,
            });
        }
        let m = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let manifest_path = tmp.join(names::MANIFEST);
        write_synced(&manifest_path, |w| {
            w.write_all(&m)
                .map_err(|e| TrainError::io(&manifest_path, e))
        })?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| TrainError::io(&tmp, e))?;
        sync_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        // A different checkpoint of the same step (from an earlier run with
        // resume_from_checkpoint = false, or a damaged one) is moved aside rather than deleted
        // until the new one is in place; leftovers are cleaned at the next start.
        let old = root.join(format!(
            ".tmp-{}-old-{}",
            dir_name(self.step),
            std::process::id()
        ));
        let replaced = final_dir.exists();
        if replaced {
            std::fs::rename(&final_dir, &old).map_err(|e| ck_err(format!("rename: {e}")))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| ck_err(format!("rename: {e}")))?;
        sync_dir(root).map_err(|e| TrainError::io(root, e))?;
        if replaced {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        rotate(root, keep)?;
        Ok(final_dir)
    }
}

/// Writes a file through `fill`, fsyncs it and returns its size and SHA-256, computed while
/// writing (no second read of a large file).
fn write_synced(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), TrainError>,
) -> Result<(u64, String), TrainError> {
    struct Hashing<W> {
        inner: W,
        sha: Sha256,
        bytes: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.sha.update(&buf[..n]);
            self.bytes += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let io = |e| TrainError::io(path, e);
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = Hashing {
        inner: std::io::BufWriter::with_capacity(1 << 20, f),
        sha: Sha256::new(),
        bytes: 0,
    };
    fill(&mut w)?;
    let f = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok((w.bytes, hex::encode(w.sha.finalize())))
}

/// Which checkpoints survive rotation.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// Keep this many newest (`save_total_limit`); `None` keeps all.
    pub limit: Option<u64>,
    /// Also keep this one (the best, with `load_best_model_at_end`).
    pub protect: Option<String>,
}

/// Deletes checkpoints beyond the newest `limit` (never `protect`), and stale temporary
/// directories of this worker's earlier runs.
pub fn rotate(root: &Path, keep: Rotation) -> Result<(), TrainError> {
    let Some(limit) = keep.limit else {
        return Ok(());
    };
    for (i, (_, path)) in list(root).into_iter().enumerate() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if (i as u64) < limit || name == keep.protect {
            continue;
        }
        tracing::info!(checkpoint = %path.display(), "removing old checkpoint (save_total_limit)");
        std::fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
    }
    Ok(())
}

/// Removes temporary directories left by interrupted checkpoint writes.
pub fn clean_temporaries(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(".tmp-checkpoint-")
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A checkpoint being written on a background thread. Dropping it waits for the write, so
/// an error elsewhere in the loop does not cut a checkpoint off half-way.
#[derive(Default)]
pub struct Writer {
    pending: Option<JoinHandle<Result<(PathBuf, f64), TrainError>>>,
    /// Seconds the last finished write took, as f64 bits (0: none yet); set by the writing
    /// thread so the trainer can read it without waiting.
    last_secs: Arc<AtomicU64>,
}

impl Writer {
    /// Waits for the write in progress, if any; returns its error, if it failed.
    pub fn wait(&mut self) -> Result<(), TrainError> {
        if let Some(h) = self.pending.take() {
            let (path, secs) = h.join().map_err(|_| TrainError::Checkpoint {
                path: PathBuf::new(),
                reason: "the checkpoint writer panicked".into(),
            })??;
            tracing::info!(checkpoint = %path.display(), seconds = secs, "checkpoint written");
        }
        Ok(())
    }

    /// Seconds the last finished write took, if one finished.
    pub fn last_write_secs(&self) -> Option<f64> {
        match self.last_secs.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// Starts writing `snap` (after the previous write finished).
    pub fn start(
        &mut self,
        snap: Snapshot,
        root: PathBuf,
        keep: Rotation,
    ) -> Result<(), TrainError> {
        self.wait()?;
        let last_secs = self.last_secs.clone();
        self.pending = Some(std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let path = snap.write(&root, keep)?;
            let secs = t0.elapsed().as_secs_f64();
            last_secs.store(secs.max(f64::MIN_POSITIVE).to_bits(), Ordering::Relaxed);
            Ok((path, secs))
        }));
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::warn!(error = %e, "checkpoint write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra_training: &str) -> JobSpec {
        let text = include_str!("../../jobs/tiny.toml")
            .replace("[training]\n", &format!("[training]\n{extra_training}\n"));
        crate::spec::job::parse("tiny.toml", &text).expect("tiny job parses")
    }

    #[test]
    fn spec_hash_ignores_what_keeps_the_bits_and_sees_what_changes_them() {
        let base = spec_hash(&job(""));
        // Same gradients bit for bit: a run may resume with these changed.
        assert_eq!(base, spec_hash(&job("gradient_checkpointing = true")));
        assert_eq!(base, spec_hash(&job("tf32 = false")));
        // TF32 products round differently: resuming across it is a different run.
        assert!(job("tf32 = true").training.unwrap().tf32);
        assert_ne!(base, spec_hash(&job("tf32 = true")));
        // Logging and how evaluation is batched leave the weights alone (QA: a resume with
        // only logging_steps changed was refused). Evaluation options count only when the
        // output is the best evaluated checkpoint.
        let variant = |from: &str, to: &str, extra: &str| {
            let text = include_str!("../../jobs/tiny.toml")
                .replace(from, to)
                .replace("[training]\n", &format!("[training]\n{extra}\n"));
            crate::spec::job::parse("tiny.toml", &text).expect("variant parses")
        };
        for (from, to, extra) in [
            ("logging_steps = 25", "logging_steps = 7", ""),
            ("", "", "logging_first_step = true"),
            ("", "", "per_device_eval_batch_size = 64"),
            ("eval_steps = 100", "eval_steps = 50", ""),
        ] {
            assert_eq!(base, spec_hash(&variant(from, to, extra)), "{to}{extra}");
        }
        let best = "load_best_model_at_end = true";
        assert_ne!(
            spec_hash(&variant("", "", best)),
            spec_hash(&variant("eval_steps = 100", "eval_steps = 50", best))
        );
        assert_ne!(
            base,
            spec_hash(&variant("learning_rate = 3e-3", "learning_rate = 1e-3", ""))
        );
    }

    #[test]
    fn a_mismatch_names_the_settings_that_differ() {
        let spec = job("");
        let mut state = TrainerState {
            version: FORMAT_VERSION,
            step: 4,
            total_steps: 10,
            adam_step: 4,
            position: super::super::data::Position {
                epoch: 0,
                micro_batch: 4,
            },
            accumulated_micro_batches: 0,
            lr_scheduler: SchedulerState {
                kind: "Linear".into(),
                warmup_steps: 0,
                total_steps: 10,
                next_step: 4,
            },
            rng: super::super::rng::Rng { state: 1 },
            log_history: Vec::new(),
            pending_loss_sum: 0.0,
            pending_steps: 0,
            best_metric: None,
            best_checkpoint: None,
            spec_hash: spec_hash(&spec),
            settings: None,
            data_key: "k".into(),
            trainable: "full".into(),
            loss_scale: None,
        };
        assert_eq!(matches(&state, &spec), Ok(()));
        // A checkpoint of the hash before logging options were left out still resumes.
        state.spec_hash = spec_hash_v1(&spec);
        assert_eq!(matches(&state, &spec), Ok(()));
        let other = crate::spec::job::parse(
            "tiny.toml",
            &include_str!("../../jobs/tiny.toml")
                .replace("learning_rate = 3e-3", "learning_rate = 1e-3")
                .replace("seed = 1\n", "seed = 9\n"),
        )
        .unwrap();
        state.spec_hash = spec_hash(&other);
        assert_eq!(matches(&state, &spec), Err(vec![]), "no recorded settings");
        state.settings = Some(settings(&other));
        let diff = matches(&state, &spec).unwrap_err();
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(
            diff[0].starts_with("training.learning_rate: 0.001 there, "),
            "{diff:?}"
        );
        assert!(diff[1].starts_with("training.seed: 9 there, "), "{diff:?}");

        // The same data file named another way (`x/../`, a symlink) is the same setting; a
        // different file is not.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::create_dir_all(d.join("x")).unwrap();
        std::fs::write(d.join("data/t.jsonl"), "{}").unwrap();
        std::fs::write(d.join("data/u.jsonl"), "{}").unwrap();
        std::os::unix::fs::symlink(d.join("data"), d.join("link")).unwrap();
        let with_data = |path: std::path::PathBuf| {
            let mut s = spec.clone();
            s.data.as_mut().unwrap().train_file = path;
            s
        };
        let theirs = with_data(d.join("data/t.jsonl"));
        state.spec_hash = spec_hash(&theirs);
        state.settings = Some(settings(&theirs));
        for same in [d.join("x/../data/t.jsonl"), d.join("link/t.jsonl")] {
            assert_eq!(matches(&state, &with_data(same)), Ok(()));
        }
        let diff = matches(&state, &with_data(d.join("data/u.jsonl"))).unwrap_err();
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(diff[0].starts_with("data.train_file: "), "{diff:?}");
    }
}
