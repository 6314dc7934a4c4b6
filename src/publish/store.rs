//! Ollama's on-disk model store: content-addressed blobs, JSON manifests, listing.
//!
//! Layout (Ollama's `manifest` package): `<root>/blobs/sha256-<hex>` holds every layer by the
//! sha256 of its bytes; `<root>/manifests/<host>/<namespace>/<model>/<tag>` is a Docker v2
//! manifest naming the config blob and the layers. Ollama reads manifests without locking and
//! at start-up deletes any file in `blobs/` that is not named like a digest, and blobs no
//! manifest references. So this module stages every file outside `blobs/` and `manifests/`
//! (in `<root>/.jobd-staging/`), renames complete blobs into place first and the manifest
//! last, and creates only names derived from validated model-name parts and checked digests,
//! so no path leaves the models directory.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PublishError;
use crate::spec::publish::ModelName;

/// Media type of the manifest itself.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of the config blob.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";
/// The GGUF weights.
pub const MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";
/// Go text/template prompt template.
pub const TEMPLATE_MEDIA_TYPE: &str = "application/vnd.ollama.image.template";
/// Default system prompt.
pub const SYSTEM_MEDIA_TYPE: &str = "application/vnd.ollama.image.system";
/// JSON object of default options.
pub const PARAMS_MEDIA_TYPE: &str = "application/vnd.ollama.image.params";
/// License text.
pub const LICENSE_MEDIA_TYPE: &str = "application/vnd.ollama.image.license";

/// Where staged files live while they are written (outside `blobs/`, which Ollama prunes).
const STAGING_DIR: &str = ".jobd-staging";

/// A manifest as Ollama writes it (`manifest/manifest.go`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The config blob ([`CONFIG_MEDIA_TYPE`]).
    pub config: Layer,
    /// The model first, then template, system, params, license.
    pub layers: Vec<Layer>,
}

/// One blob reference in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// What the blob is (`application/vnd.ollama.image.*`).
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<64 lower-case hex>`.
    pub digest: String,
    /// Bytes of the blob.
    pub size: u64,
    /// The parent model a layer came from (Ollama's; never written here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Tensor name of Ollama's MLX layers (never written here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Manifest {
    /// What `ollama list` shows as SIZE: the sizes of the layers and the config, summed.
    pub fn total_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum::<u64>() + self.config.size
    }

    /// The manifest's bytes as Ollama's `json.Encoder` writes them: compact, one line, `\n`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).expect("a manifest always serializes");
        b.push(b'\n');
        b
    }
}

/// The config blob (`types/model/config.go`, `ConfigV2`), with the fields `ollama create`
/// fills for a GGUF; `ollama list`/`show` display them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `"gguf"`.
    pub model_format: String,
    /// `general.architecture`: `"llama"` or `"qwen3"`.
    pub model_family: String,
    /// `[model_family]`.
    pub model_families: Vec<String>,
    /// Parameter count for display, e.g. `"124K"`, `"135M"`.
    pub model_type: String,
    /// Quantization for display, e.g. `"Q8_0"`.
    pub file_type: String,
    /// Always `"amd64"` (Ollama hard-codes it).
    pub architecture: String,
    /// Always `"linux"` (Ollama hard-codes it).
    pub os: String,
}

/// `sha256:` + hex of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks `sha256:<64 hex>` (or Ollama's `sha256-` file spelling) and returns the hex.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Ollama's `format.HumanNumber`: `124K`, `1.5M`, `7B`.
pub fn human_number(n: u64) -> String {
    let scaled = |v: f64, unit: &str| {
        if v.fract() == 0.0 {
            format!("{v:.0}{unit}")
        } else {
            format!("{v:.1}{unit}")
        }
    };
    match n {
        n if n >= 1_000_000_000 => scaled(n as f64 / 1e9, "B"),
        n if n >= 1_000_000 => scaled(n as f64 / 1e6, "M"),
        n if n >= 1_000 => format!("{:.0}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Ollama's `format.HumanBytes` as `ollama list` prints SIZE (1024-based, "KB"/"MB"/"GB").
pub fn human_bytes(b: u64) -> String {
    const KIB: f64 = 1024.0;
    let (value, unit) = match b as f64 {
        v if v >= KIB.powi(4) => (v / KIB.powi(4), "TB"),
        v if v >= KIB.powi(3) => (v / KIB.powi(3), "GB"),
        v if v >= KIB.powi(2) => (v / KIB.powi(2), "MB"),
        v if v >= KIB => (v / KIB, "KB"),
        _ => return format!("{b} B"),
    };
    if value >= 10.0 || value.fract() == 0.0 {
        format!("{} {unit}", value as u64)
    } else {
        format!("{value:.1} {unit}")
    }
}

/// A file being written in the staging directory; removed on drop unless persisted.
pub(crate) struct StagedFile {
    path: PathBuf,
    file: Option<File>,
}

impl StagedFile {
    /// The open file, for writing.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("open until persisted")
    }

    /// The staged path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// fsyncs, sets mode 0644 and renames to `dest`.
    fn persist(mut self, dest: &Path) -> io::Result<()> {
        let file = self.file.take().expect("persisted once");
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.path, dest)?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// An Ollama models directory opened for writing.
pub struct Store {
    root: PathBuf,
    /// The owner to give new files when running as root in another user's store (the
    /// systemd service runs as `ollama`, which must be able to delete what we create).
    owner: Option<(u32, u32)>,
    staging: PathBuf,
    /// Held while this store stages: a staging directory nobody holds is a crashed
    /// publish's, which the next publish removes.
    _staging_lock: Option<nix::fcntl::Flock<File>>,
    /// Complete blobs waiting in the staging directory for the commit.
    pending: Vec<PendingBlob>,
}

/// A staged blob and where it goes.
struct PendingBlob {
    staged: StagedFile,
    dest: PathBuf,
    size: u64,
}

fn io_at<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PublishError + 'a {
    move |e| PublishError::io(action, path, e)
}

impl Store {
    /// Opens `root` for writing, creating `root`, `blobs/` and `manifests/` if needed, and a
    /// private staging directory. Fails early, before any export work, if it is not writable.
    pub fn open(root: &Path) -> Result<Store, PublishError> {
        let dir_err = |reason: String| PublishError::ModelsDir {
            path: root.to_path_buf(),
            reason,
        };
        if !root.is_absolute() {
            return Err(dir_err("must be an absolute path".into()));
        }
        match fs::metadata(root) {
            Ok(m) if !m.is_dir() => return Err(dir_err("is not a directory".into())),
            Ok(_) => {}
            Err(_) => match root.parent() {
                Some(parent) if parent.is_dir() => {}
                _ => return Err(dir_err("does not exist, nor does its parent".into())),
            },
        }
        create_dir(root).map_err(|e| dir_err(format!("cannot create it: {e}")))?;
        let meta = fs::metadata(root).map_err(|e| dir_err(e.to_string()))?;
        if !meta.is_dir() {
            return Err(dir_err("is not a directory".into()));
        }
        // Root writing with its own file rights hands what it creates to the directory's
        // owner; with a user's rights (`Credentials::enter`) the files are theirs already.
        let owner = (nix::unistd::geteuid().is_root()
            && crate::jobfs::current_fsuid() == 0
            && meta.uid() != 0)
            .then(|| (meta.uid(), meta.gid()));
        let unique = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let staging = root.join(STAGING_DIR).join(unique);
        let mut store = Store {
            root: root.to_path_buf(),
            owner,
            staging,
            _staging_lock: None,
            pending: Vec::new(),
        };
        for sub in ["blobs", "manifests", STAGING_DIR] {
            store
                .ensure_dir(&root.join(sub))
                .map_err(|e| dir_err(format!("cannot create {sub}/: {e}")))?;
        }
        fs::create_dir(&store.staging).map_err(|e| dir_err(format!("not writable: {e}")))?;
        store._staging_lock = File::open(&store.staging)
            .ok()
            .and_then(|d| nix::fcntl::Flock::lock(d, nix::fcntl::FlockArg::LockExclusive).ok());
        store.sweep_stale_staging();
        // Probe now: a read-only store should fail before minutes of export, not after.
        let probe = store
            .stage("probe")
            .map_err(|e| dir_err(format!("not writable: {e}")))?;
        drop(probe);
        Ok(store)
    }

    /// Removes the staging directories of publishes that crashed (a daemon killed while
    /// exporting left a partial GGUF, gigabytes for a big model): those no live publish holds
    /// locked, and older than a minute (one just made may not be locked yet).
    fn sweep_stale_staging(&self) {
        let staging_root = self.root.join(STAGING_DIR);
        let Ok(entries) = fs::read_dir(&staging_root) else {
            return;
        };
        let a_minute_ago = SystemTime::now() - std::time::Duration::from_secs(60);
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if path == self.staging
                || !meta.is_dir()
                || meta.modified().is_ok_and(|t| t > a_minute_ago)
            {
                continue;
            }
            let unheld = File::open(&path).ok().and_then(|d| {
                nix::fcntl::Flock::lock(d, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
            });
            if unheld.is_some() {
                match fs::remove_dir_all(&path) {
                    Ok(()) => {
                        tracing::info!(dir = %path.display(), "removed a crashed publish's staging directory")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %path.display(), error = %e, "cannot remove a crashed publish's staging directory")
                    }
                }
            }
        }
    }

    /// The models directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `dir` (mode 0755, owned like the store) unless it exists; refuses symlinks,
    /// which could lead outside the store.
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        match fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() && dir != self.root => Err(io::Error::other(
                format!("{} is a symbolic link", dir.display()),
            )),
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dir(dir)?;
                self.chown(dir)
            }
            Err(e) => Err(e),
        }
    }

    fn chown(&self, path: &Path) -> io::Result<()> {
        match self.owner {
            Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// A new empty file in the staging directory.
    pub(crate) fn stage(&self, what: &str) -> io::Result<StagedFile> {
        let path = self.staging.join(what);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        Ok(StagedFile {
            path,
            file: Some(file),
        })
    }

    /// `<root>/blobs/sha256-<hex>` for a checked digest.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, PublishError> {
        blob_path(&self.root, digest)
    }

    /// Keeps a complete staged blob, hashed as `digest`, for [`Store::commit`] to move into
    /// `blobs/`. Nothing in `blobs/` changes before the commit, so a publish that fails never
    /// removes or replaces a blob that another publish's manifest uses.
    pub(crate) fn add_blob(
        &mut self,
        staged: StagedFile,
        digest: &str,
        size: u64,
    ) -> Result<(), PublishError> {
        let dest = self.blob_path(digest)?;
        if self.pending.iter().all(|b| b.dest != dest) {
            self.pending.push(PendingBlob { staged, dest, size });
        }
        Ok(())
    }

    /// Stores `bytes` as a blob and returns its layer entry.
    pub fn add_bytes(&mut self, media_type: &str, bytes: &[u8]) -> Result<Layer, PublishError> {
        let digest = digest_of(bytes);
        let size = bytes.len() as u64;
        let layer = Layer {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size,
            from: None,
            name: None,
        };
        let dest = self.blob_path(&digest)?;
        if self.pending.iter().any(|b| b.dest == dest) {
            // The same bytes as another layer of this publish (a system prompt equal to the
            // template, say): one blob serves both.
            return Ok(layer);
        }
        let staged = self
            .stage(&format!("layer-{}", &digest[7..19]))
            .map_err(io_at("create a file in", &self.staging))?;
        let path = staged.path().to_path_buf();
        (&mut staged.file.as_ref().expect("open"))
            .write_all(bytes)
            .map_err(io_at("write", &path))?;
        self.add_blob(staged, &digest, size)?;
        Ok(layer)
    }

    /// Moves the staged blobs into `blobs/`, writes the manifest for `name` atomically
    /// (staged, fsynced, renamed over any old one) and then removes blobs only the replaced
    /// manifest used. Returns the manifest digest.
    ///
    /// Commits in this store are serialised by a lock on `manifests/` (a directory, so no lock
    /// file is left behind), and every change to `blobs/` happens under it: another publish's
    /// clean-up cannot delete a blob between its move here and this manifest referencing it.
    /// A staged blob always replaces a file of the same name: its bytes were hashed as they
    /// were written, whereas the old file may have been damaged since. Ollama itself never
    /// takes the lock; it only reads.
    pub fn commit(
        &mut self,
        name: &ModelName,
        manifest: &Manifest,
    ) -> Result<String, PublishError> {
        let manifests = self.root.join("manifests");
        let dir_handle = File::open(&manifests).map_err(io_at("open", &manifests))?;
        let _lock = nix::fcntl::Flock::lock(dir_handle, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| PublishError::io("lock", &manifests, io::Error::from(errno)))?;
        let mut moved_new = Vec::new();
        let result = self.commit_locked(name, manifest, &mut moved_new);
        if result.is_err() {
            // Still under the lock: no other manifest can have come to use a blob that was not
            // there before this commit.
            for blob in moved_new {
                let _ = fs::remove_file(blob);
            }
        }
        result
    }

    fn commit_locked(
        &mut self,
        name: &ModelName,
        manifest: &Manifest,
        moved_new: &mut Vec<PathBuf>,
    ) -> Result<String, PublishError> {
        for blob in std::mem::take(&mut self.pending) {
            let PendingBlob { staged, dest, size } = blob;
            let staged_path = staged.path().to_path_buf();
            let len = staged
                .file()
                .metadata()
                .map_err(io_at("check", &staged_path))?
                .len();
            if len != size {
                return Err(PublishError::Manifest {
                    path: staged_path,
                    reason: format!("staged blob is {len} bytes, expected {size}"),
                });
            }
            self.chown(&staged_path)
                .map_err(io_at("change the owner of", &staged_path))?;
            let existed = fs::symlink_metadata(&dest).is_ok();
            staged
                .persist(&dest)
                .map_err(io_at("move into place", &dest))?;
            if !existed {
                moved_new.push(dest);
            }
        }
        if let Ok(d) = File::open(self.root.join("blobs")) {
            // The blobs' renames are durable before the manifest that names them.
            let _ = d.sync_all();
        }
        for layer in manifest.layers.iter().chain([&manifest.config]) {
            let path = self.blob_path(&layer.digest)?;
            let size = fs::metadata(&path).map_err(io_at("check", &path))?.len();
            if size != layer.size {
                return Err(PublishError::Manifest {
                    path,
                    reason: format!("blob is {size} bytes, the manifest says {}", layer.size),
                });
            }
        }
        let dest = manifest_path(&self.root, name)?;
        let mut dir = self.root.join("manifests");
        for part in [&name.host, &name.namespace, &name.model] {
            dir.push(part);
            self.ensure_dir(&dir).map_err(io_at("create", &dir))?;
        }
        let old = read_manifest(&dest).ok();
        let bytes = manifest.to_bytes();
        let staged = self
            .stage("manifest")
            .map_err(io_at("create a file in", &self.staging))?;
        let staged_path = staged.path().to_path_buf();
        (&mut staged.file.as_ref().expect("open"))
            .write_all(&bytes)
            .map_err(io_at("write", &staged_path))?;
        self.chown(&staged_path)
            .map_err(io_at("change the owner of", &staged_path))?;
        staged
            .persist(&dest)
            .map_err(io_at("move into place", &dest))?;
        if let Ok(d) = File::open(&dir) {
            // Make the rename durable before reporting success.
            let _ = d.sync_all();
        }
        if let Some(old) = old {
            self.remove_unreferenced(&old, manifest);
        }
        Ok(digest_of(&bytes))
    }

    /// Deletes blobs of a replaced manifest that no manifest references any more, as
    /// `ollama create` does. Skipped if any manifest cannot be read (Ollama's prune does the
    /// same: better an orphan than a deleted blob someone uses).
    fn remove_unreferenced(&self, old: &Manifest, new: &Manifest) {
        let Ok(in_use) = referenced_digests(&self.root) else {
            tracing::warn!(target: "publish", "a manifest is unreadable; not removing old blobs");
            return;
        };
        let kept: BTreeSet<&str> = new
            .layers
            .iter()
            .chain([&new.config])
            .map(|l| l.digest.as_str())
            .collect();
        for layer in old.layers.iter().chain([&old.config]) {
            let d = layer.digest.as_str();
            if kept.contains(d) || in_use.contains(d) {
                continue;
            }
            if let Ok(path) = self.blob_path(d) {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(target: "publish", blob = %path.display(), "removed unused blob")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(target: "publish", blob = %path.display(), error = %e, "cannot remove unused blob")
                    }
                }
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Blobs not committed are still staged: removing the staging directory removes them.
        self.pending.clear();
        let _ = fs::remove_dir_all(&self.staging);
        // Succeeds only when no other publish is staging.
        let _ = fs::remove_dir(self.root.join(STAGING_DIR));
    }
}

fn create_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// `<root>/blobs/sha256-<hex>` for a checked digest.
pub fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, PublishError> {
    let hex = digest_hex(digest).ok_or_else(|| PublishError::Manifest {
        path: root.to_path_buf(),
        reason: format!("invalid digest {digest:?}"),
    })?;
    Ok(root
        .join("blobs")
        .join(format!("sha256-{}", hex.to_ascii_lowercase())))
}

/// `<root>/manifests/<host>/<namespace>/<model>/<tag>`; every part is a single normal path
/// component by construction (Ollama's name rules), checked again here.
pub fn manifest_path(root: &Path, name: &ModelName) -> Result<PathBuf, PublishError> {
    let rel = name.manifest_relpath();
    if rel.components().count() != 4 || !rel.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(PublishError::Name(crate::spec::publish::ModelNameError {
            name: name.to_string(),
            reason: "does not map to host/namespace/model/tag".into(),
        }));
    }
    Ok(root.join("manifests").join(rel))
}

/// Reads and parses a manifest file.
pub fn read_manifest(path: &Path) -> Result<Manifest, PublishError> {
    let bytes = fs::read(path).map_err(io_at("read", path))?;
    parse_manifest(path, &bytes)
}

fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, PublishError> {
    serde_json::from_slice(bytes).map_err(|e| PublishError::Manifest {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Every manifest file, as Ollama enumerates them (`manifests/*/*/*/*`), with its name.
fn manifest_files(root: &Path) -> Result<Vec<(ModelName, PathBuf)>, PublishError> {
    let mut out = Vec::new();
    let dirs = |p: &Path| -> Result<Vec<(String, PathBuf)>, PublishError> {
        let rd = match fs::read_dir(p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(PublishError::io("list", p, e)),
        };
        let mut v: Vec<(String, PathBuf)> = rd
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .collect();
        v.sort();
        Ok(v)
    };
    for (host, hp) in dirs(&root.join("manifests"))? {
        for (ns, np) in dirs(&hp)? {
            for (model, mp) in dirs(&np)? {
                for (tag, tp) in dirs(&mp)? {
                    if !tp.is_file() {
                        continue;
                    }
                    let name = ModelName {
                        host: host.clone(),
                        namespace: ns.clone(),
                        model: model.clone(),
                        tag,
                    };
                    out.push((name, tp));
                }
            }
        }
    }
    Ok(out)
}

/// Digests referenced by any manifest; an error if any manifest is unreadable.
fn referenced_digests(root: &Path) -> Result<BTreeSet<String>, PublishError> {
    let mut set = BTreeSet::new();
    for (_, path) in manifest_files(root)? {
        let m = read_manifest(&path)?;
        set.extend(m.layers.into_iter().map(|l| l.digest));
        set.insert(m.config.digest);
    }
    Ok(set)
}

/// One row of `ollama list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// As `ollama list` shows it (`tiny:latest`, `local/tiny:v1`).
    pub name: String,
    /// Fully qualified (`registry.ollama.ai/local/tiny:v1`).
    pub full_name: String,
    /// `sha256:<hex>` of the manifest file's bytes.
    pub digest: String,
    /// The first 12 hex digits of `digest`, Ollama's model ID.
    pub id: String,
    /// Sum of the layer and config sizes.
    pub size: u64,
    /// The manifest's modification time.
    pub modified: SystemTime,
    /// From the config blob, when readable: `"135M"`.
    pub parameter_size: Option<String>,
    /// From the config blob, when readable: `"Q8_0"`.
    pub quantization: Option<String>,
}

/// A listed model as the API and `jobctl models` show it.
impl From<ModelEntry> for crate::spec::api::ModelView {
    fn from(e: ModelEntry) -> Self {
        crate::spec::api::ModelView {
            name: e.name,
            id: e.id,
            size: e.size,
            modified: e
                .modified
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            parameter_size: e.parameter_size,
            quantization: e.quantization,
        }
    }
}

/// The models in a store, newest first, as `ollama list` shows them. Unreadable manifests are
/// skipped with a warning, as Ollama does.
pub fn list_models(root: &Path) -> Result<Vec<ModelEntry>, PublishError> {
    let mut out = Vec::new();
    for (name, path) in manifest_files(root)? {
        let entry = (|| -> Result<ModelEntry, PublishError> {
            let bytes = fs::read(&path).map_err(io_at("read", &path))?;
            let manifest = parse_manifest(&path, &bytes)?;
            let modified = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io_at("stat", &path))?;
            let config: Option<ModelConfig> = blob_path(root, &manifest.config.digest)
                .ok()
                .and_then(|p| fs::read(p).ok())
                .and_then(|b| serde_json::from_slice(&b).ok());
            let digest = digest_of(&bytes);
            Ok(ModelEntry {
                name: name.display_shortest(),
                full_name: name.to_string(),
                id: digest[7..19].to_string(),
                digest,
                size: manifest.total_size(),
                modified,
                parameter_size: config.as_ref().map(|c| c.model_type.clone()),
                quantization: config.map(|c| c.file_type),
            })
        })();
        match entry {
            Ok(e) => out.push(e),
            Err(e) => tracing::warn!(target: "publish", error = %e, "skipping manifest"),
        }
    }
    out.sort_by(|a, b| b.modified.cmp(&a.modified).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// Ollama's `format.HumanTime` for MODIFIED: docker's `HumanDuration` plus " ago"
/// ("Less than a second ago", "About a minute ago", "3 hours ago", "2 weeks ago").
pub fn human_time(t: SystemTime, now: SystemTime) -> String {
    let secs = now
        .duration_since(t)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let seconds = secs as u64;
    let minutes = seconds / 60;
    let hours = (secs / 3600.0).round() as u64;
    let d = match () {
        _ if seconds < 1 => "Less than a second".to_string(),
        _ if seconds == 1 => "1 second".to_string(),
        _ if seconds < 60 => format!("{seconds} seconds"),
        _ if minutes == 1 => "About a minute".to_string(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".to_string(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", seconds / 3600 / 24 / 365),
    };
    format!("{d} ago")
}

/// The `ollama list` table: NAME, ID, SIZE, MODIFIED, columns padded like Ollama's.
pub fn render_list(models: &[ModelEntry], now: SystemTime) -> String {
    let rows: Vec<[String; 4]> = models
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.id.clone(),
                human_bytes(m.size),
                human_time(m.modified, now),
            ]
        })
        .collect();
    let header = ["NAME", "ID", "SIZE", "MODIFIED"].map(String::from);
    let mut widths = [0usize; 4];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}    ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_formats_match_ollama() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KB");
        assert_eq!(human_bytes(2048), "2 KB");
        assert_eq!(human_bytes(259_232), "253 KB");
        assert_eq!(human_bytes(4_700_000_000), "4.4 GB");
        assert_eq!(human_number(124_416), "124K");
        assert_eq!(human_number(135_000_000), "135M");
        assert_eq!(human_number(1_240_000_000), "1.2B");
        assert_eq!(human_number(7_000_000_000), "7B");
        assert_eq!(human_number(999), "999");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        assert_eq!(human_time(t, t), "Less than a second ago");
        let ago = |s: u64| human_time(t, t + std::time::Duration::from_secs(s));
        assert_eq!(ago(120), "2 minutes ago");
        assert_eq!(ago(61), "About a minute ago");
        assert_eq!(ago(3600), "About an hour ago");
        assert_eq!(ago(5 * 86_400), "5 days ago");
        assert_eq!(ago(20 * 86_400), "2 weeks ago");
    }

    #[test]
    fn digests_are_checked_before_becoming_paths() {
        let root = Path::new("/m");
        let hex = "ab".repeat(32);
        assert_eq!(
            blob_path(root, &format!("sha256:{hex}")).unwrap(),
            PathBuf::from(format!("/m/blobs/sha256-{hex}"))
        );
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:abc",
            "md5:00",
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(blob_path(root, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_bytes_are_compact_with_newline() {
        let l = Layer {
            media_type: MODEL_MEDIA_TYPE.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 3,
            from: None,
            name: None,
        };
        let m = Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.into(),
            config: l.clone(),
            layers: vec![l],
        };
        let b = String::from_utf8(m.to_bytes()).unwrap();
        assert!(b.starts_with("{\"schemaVersion\":2,\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\",\"config\":{\"mediaType\""), "{b}");
        assert!(b.ends_with("}]}\n") && !b.contains("from"), "{b}");
        assert_eq!(m.total_size(), 6);
    }
}
