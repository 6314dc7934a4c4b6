//! The job file: typed TOML with unknown fields rejected, semantic validation and path
//! resolution. A job file is parsed by `jobctl` (to fail early, with line and column) and again
//! by the daemon (the authority, also for HTTP clients).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::JobId;
use super::publish::PublishSpec;
use super::toml_source::{Issue, Source, SourceError};
use super::train::{DataSpec, LoraSpec, ModelSpec, TrainingArgs};
use super::units::{ByteSize, HumanDuration};

/// Largest job file accepted, in bytes.
pub const MAX_JOB_FILE_BYTES: usize = 256 * 1024;
/// Priorities range over `-MAX_PRIORITY..=MAX_PRIORITY`; higher runs first.
pub const MAX_PRIORITY: i32 = 1000;

/// The smallest per-GPU VRAM request taken as meant (a CUDA context alone needs more).
pub const MIN_VRAM_REQUEST: u64 = 64 << 20;

/// Whether `priority` is in `-MAX_PRIORITY..=MAX_PRIORITY`. (Not `priority.abs()`, which
/// overflows for `i32::MIN`: a panic in debug builds, a negative "absolute value" that passes
/// the check in release builds.)
pub fn priority_in_range(priority: i32) -> bool {
    (-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority)
}
/// Variables the scheduler sets for every job; a job file may not override them.
pub const RESERVED_ENV: [&str; 2] = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"];

/// A job as written in a job file (after `resolve_paths`, with absolute paths).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Display name; defaults to the job file's stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Higher runs first; may preempt lower-priority running jobs.
    #[serde(default)]
    pub priority: i32,
    /// What the worker does: run `[command]`, or fine-tune with Candle.
    pub kind: JobKind,
    /// Ids of jobs that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<JobId>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandSpec>,
    #[serde(default)]
    pub retry: RetrySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingArgs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishSpec>,
    /// A command to run when the job ends (see `spec::notify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<super::notify::NotifySpec>,
    /// A cron expression: submitting creates a recurring schedule instead of one job
    /// (see `spec::schedule` for the syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// With `schedule`: "skip" (default) a firing while the previous run is queued or running,
    /// or "queue" it anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<super::schedule::Overlap>,
    /// With `schedule`: after downtime, run a missed firing once at start-up (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<bool>,
    /// Directory the job file's relative paths were resolved against (set at submit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dir: Option<PathBuf>,
}

/// What kind of work a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Run `[command] argv` directly (no shell).
    Command,
    /// Fine-tune a model with Candle in `jobd worker`.
    Train,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Command => "command",
            JobKind::Train => "train",
        }
    }
}

/// What a job needs to run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Number of GPUs; 0 runs on CPU only.
    #[serde(default)]
    pub gpus: u32,
    /// VRAM per GPU: a size such as "20GiB", or "auto" (the estimate for train jobs, the whole
    /// card for command jobs).
    #[serde(default)]
    pub vram: VramRequest,
    /// Only these GPUs (index or UUID) may be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only_gpus: Vec<GpuSelector>,
    /// These GPUs are tried first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefer_gpus: Vec<GpuSelector>,
    /// CPU threads for the job (sets `OMP_NUM_THREADS`, `RAYON_NUM_THREADS`); default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// The longest one run may take (Slurm's `--time`): then it is stopped as a cancel is
    /// (SIGTERM, the grace period, SIGKILL) and fails, a train job having saved a checkpoint
    /// that a requeue resumes from. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<HumanDuration>,
    /// A run that shows no sign of life for this long — no new output on stdout or stderr, no
    /// new `progress.json` or metrics (a train worker writes them every step) — is taken as
    /// hung (a deadlocked data loader, a collective call waiting forever) and stopped; it is
    /// retried as a failure is (`[retry]`), else it fails. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout: Option<HumanDuration>,
}

/// A VRAM request: a fixed size per GPU, or "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VramRequest {
    #[default]
    Auto,
    PerGpu(ByteSize),
}

impl Serialize for VramRequest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            VramRequest::Auto => s.serialize_str("auto"),
            VramRequest::PerGpu(b) => b.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for VramRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"auto\" or a size such as \"20GiB\"")
        })? {
            Raw::Int(n) => Ok(VramRequest::PerGpu(ByteSize(n))),
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(VramRequest::Auto),
            Raw::Text(t) => t
                .parse()
                .map(VramRequest::PerGpu)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A GPU named by its index (as `nvidia-smi` numbers them, PCI bus order) or its UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum GpuSelector {
    Index(u32),
    Uuid(String),
}

impl<'de> Deserialize<'de> for GpuSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        let wanted = "a GPU index (0, 1, …) or UUID (\"GPU-…\")";
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom(format!("expected {wanted}")))?
        {
            Raw::Int(i) => u32::try_from(i)
                .map(GpuSelector::Index)
                .map_err(|_| serde::de::Error::custom(format!("{i} is not {wanted}"))),
            Raw::Text(t) => Ok(GpuSelector::Uuid(t)),
        }
    }
}

impl std::fmt::Display for GpuSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuSelector::Index(i) => write!(f, "{i}"),
            GpuSelector::Uuid(u) => f.write_str(u),
        }
    }
}

/// `[command]`: what a command job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program and arguments, run directly (no shell). A relative program path with a `/`
    /// resolves against the job file's directory; a bare name is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables (the environment is otherwise cleared).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; default: the job file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
}

/// `[retry]`: run again after a failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// How many times to retry (0 = never).
    #[serde(default)]
    pub max: u32,
    /// Retry only on these exit codes; empty = any failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_exit_codes: Vec<i32>,
    /// Wait before the first retry; doubles for each further retry (capped at 1 hour).
    #[serde(default = "default_backoff")]
    pub backoff: HumanDuration,
}

fn default_backoff() -> HumanDuration {
    HumanDuration::secs(10)
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            max: 0,
            on_exit_codes: Vec::new(),
            backoff: default_backoff(),
        }
    }
}

impl RetrySpec {
    /// Delay before retry number `n` (1-based): `backoff * 2^(n-1)`, capped at one hour.
    pub fn delay_for(&self, n: u32) -> std::time::Duration {
        let cap = std::time::Duration::from_secs(3600);
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff.0.checked_mul(factor).unwrap_or(cap).min(cap)
    }

    /// Should a run that ended with exit `code`, or was killed by `signal`, be retried? A
    /// signal N counts as code 128 + N, as a shell reports it, so `on_exit_codes = [137]`
    /// matches a process the kernel's OOM killer ended with SIGKILL.
    pub fn retries_on(&self, code: Option<i32>, signal: Option<i32>) -> bool {
        // An end nobody could record (a process taken over after a daemon restart is not
        // jobd's child; the job's own record of its exit was never written) was a kill that
        // could not be caught: SIGKILL, 137, the out-of-memory killer's.
        match code.or(signal.map(|s| 128 + s)).unwrap_or(137) {
            0 => false,
            c => self.on_exit_codes.is_empty() || self.on_exit_codes.contains(&c),
        }
    }
}

/// An absolute path as the kernel would walk it, written plainly: without `.` components,
/// and with each `..` taken where it leads (the directory before it is resolved, symlinks
/// included, so `link/..` is where the link's target's parent is, not the link's directory).
/// A path whose `..` cannot be followed (a directory missing) is kept as written; the check
/// of the paths names the problem. `/srv/exp/./../data/x` → `/srv/data/x`.
pub fn tidy_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let plain: PathBuf = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    let parts: Vec<Component> = plain.components().collect();
    let Some(last_up) = parts
        .iter()
        .rposition(|c| matches!(c, Component::ParentDir))
    else {
        return plain;
    };
    let up_to: PathBuf = parts[..=last_up].iter().collect();
    match std::fs::canonicalize(&up_to) {
        Ok(dir) => dir.join(parts[last_up + 1..].iter().collect::<PathBuf>()),
        Err(_) => plain,
    }
}

/// Parses and validates job-file text. `origin` names the file in messages.
pub fn parse(origin: &str, text: &str) -> Result<JobSpec, SourceError> {
    if text.len() > MAX_JOB_FILE_BYTES {
        return Err(SourceError {
            origin: origin.to_string(),
            problems: vec![super::toml_source::Problem {
                key: None,
                line: None,
                column: None,
                message: format!(
                    "job file is {} bytes; the limit is {MAX_JOB_FILE_BYTES}",
                    text.len()
                ),
            }],
        });
    }
    let source = Source::parse(origin, text)?;
    let spec: JobSpec = source.deserialize()?;
    let issues = spec.validate();
    if issues.is_empty() {
        Ok(spec)
    } else {
        Err(source.locate(issues))
    }
}

/// Parses, validates, resolves relative paths against `base_dir` and checks that named files
/// exist: everything `jobctl validate` and a submit do before a job is accepted.
pub fn parse_and_resolve(
    origin: &str,
    text: &str,
    base_dir: &Path,
) -> Result<JobSpec, SourceError> {
    parse_and_resolve_with(origin, text, base_dir, &|_| Vec::new())
}

/// [`parse_and_resolve`], with `more` checks of the files the job names that layers above
/// this one own (such as whether a base model can be published), located like the others.
pub fn parse_and_resolve_with(
    origin: &str,
    text: &str,
    base_dir: &Path,
    more: &dyn Fn(&JobSpec) -> Vec<Issue>,
) -> Result<JobSpec, SourceError> {
    let mut spec = parse(origin, text)?;
    spec.resolve_paths(base_dir);
    let mut issues = spec.check_paths();
    if issues.is_empty() {
        issues = more(&spec);
    }
    if issues.is_empty() {
        Ok(spec)
    } else {
        // Parse again only to locate the problems; this path is rare.
        Err(Source::parse(origin, text)?.locate(issues))
    }
}

impl JobSpec {
    /// The display name: `name`, else the given fallback (the job file's stem).
    pub fn display_name(&self, fallback: &str) -> String {
        self.name.clone().unwrap_or_else(|| fallback.to_string())
    }

    /// Problems that make the job meaningless, whatever the machine.
    pub fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Some(name) = &self.name {
            if name.trim().is_empty() || name.chars().count() > 128 {
                issues.push(Issue::new("name", "must be 1 to 128 characters"));
            } else if name.chars().any(char::is_control) {
                issues.push(Issue::new("name", "must not contain control characters"));
            }
        }
        if self.base_dir.is_some() {
            issues.push(Issue::new(
                "base_dir",
                "is not for job files: relative paths resolve against the job file's directory \
                 (jobctl sends it); remove the key",
            ));
        }
        if !priority_in_range(self.priority) {
            issues.push(Issue::new(
                "priority",
                format!("must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, dep) in self.depends_on.iter().enumerate() {
            if *dep == 0 || !seen.insert(*dep) {
                issues.push(Issue::new(
                    format!("depends_on[{i}]"),
                    "must be a distinct job id (a positive number)",
                ));
            }
        }
        self.validate_resources(&mut issues);
        match self.kind {
            JobKind::Command => {
                match &self.command {
                    None => issues.push(Issue::new(
                        "command",
                        "kind = \"command\" needs a [command] table with argv",
                    )),
                    Some(cmd) => validate_command(cmd, &mut issues),
                }
                for (present, section) in [
                    (self.model.is_some(), "model"),
                    (self.data.is_some(), "data"),
                    (self.training.is_some(), "training"),
                    (self.lora.is_some(), "lora"),
                    (self.publish.is_some(), "publish"),
                ] {
                    if present {
                        issues.push(Issue::new(
                            section,
                            format!("[{section}] only applies to kind = \"train\""),
                        ));
                    }
                }
            }
            JobKind::Train => {
                if self.command.is_some() {
                    issues.push(Issue::new(
                        "command",
                        "[command] only applies to kind = \"command\"",
                    ));
                }
                issues.extend(super::train::validate(self));
                if let Some(publish) = &self.publish {
                    issues.extend(super::publish::validate(publish));
                    self.validate_quantization_fits(publish, &mut issues);
                }
            }
        }
        if let Some(notify) = &self.notify {
            issues.extend(notify.validate());
        }
        match &self.schedule {
            Some(expr) => {
                if let Err(e) = expr.parse::<super::schedule::Cron>() {
                    issues.push(Issue::new("schedule", e));
                }
            }
            None => {
                if self.overlap.is_some() {
                    issues.push(Issue::new(
                        "overlap",
                        "only applies with schedule = \"...\"",
                    ));
                }
                if self.catch_up.is_some() {
                    issues.push(Issue::new(
                        "catch_up",
                        "only applies with schedule = \"...\"",
                    ));
                }
            }
        }
        let r = &self.retry;
        if r.max > 100 {
            issues.push(Issue::new("retry.max", "must be at most 100"));
        }
        for (i, code) in r.on_exit_codes.iter().enumerate() {
            if !(1..=255).contains(code) {
                issues.push(Issue::new(
                    format!("retry.on_exit_codes[{i}]"),
                    "exit codes are 1 to 255",
                ));
            }
        }
        if r.backoff.0 > std::time::Duration::from_secs(24 * 3600) {
            issues.push(Issue::new("retry.backoff", "must be at most 24h"));
        }
        issues
    }

    /// A model made from scratch has its shape in the file: a quantization whose blocks do not
    /// divide its rows would fail only at publishing, after all the training.
    fn validate_quantization_fits(
        &self,
        publish: &super::publish::PublishSpec,
        issues: &mut Vec<Issue>,
    ) {
        let Some(m) = &self.model else { return };
        if m.init != Some(super::train::ModelInit::Scratch) {
            return;
        }
        let q = publish.quantization;
        let block = q.block_elements();
        let dims = [
            ("model.hidden_size", m.hidden_size),
            ("model.intermediate_size", m.intermediate_size),
        ];
        if let Some((key, d)) = dims
            .into_iter()
            .find_map(|(k, d)| d.filter(|d| d % block != 0).map(|d| (k, d)))
        {
            issues.push(Issue::new(
                "publish.quantization",
                format!(
                    "{q} needs every weight's input dimension to be a multiple of {block}, but \
                     {key} is {d}: choose f16 or f32{}",
                    if d % 32 == 0 { " (or q8_0, q4_0)" } else { "" }
                ),
            ));
        }
    }

    fn validate_resources(&self, issues: &mut Vec<Issue>) {
        let r = &self.resources;
        if r.gpus > 64 {
            issues.push(Issue::new("resources.gpus", "must be at most 64"));
        }
        if r.gpus == 0 {
            if let VramRequest::PerGpu(_) = r.vram {
                issues.push(Issue::new(
                    "resources.vram",
                    "a VRAM amount needs resources.gpus of at least 1",
                ));
            }
            if !r.only_gpus.is_empty() {
                issues.push(Issue::new(
                    "resources.only_gpus",
                    "needs resources.gpus of at least 1",
                ));
            }
            if !r.prefer_gpus.is_empty() {
                issues.push(Issue::new(
                    "resources.prefer_gpus",
                    "needs resources.gpus of at least 1",
                ));
            }
        }
        for (key, t) in [
            ("resources.time_limit", r.time_limit),
            ("resources.stall_timeout", r.stall_timeout),
        ] {
            if t.is_some_and(|t| t.0 < std::time::Duration::from_secs(1)) {
                issues.push(Issue::new(
                    key,
                    "must be at least 1s (leave it out for none)",
                ));
            }
        }
        match r.vram {
            VramRequest::PerGpu(ByteSize(0)) => issues.push(Issue::new(
                "resources.vram",
                "must be more than 0 (or \"auto\")",
            )),
            // `vram = 20` is 20 bytes: almost certainly meant as 20 GiB.
            VramRequest::PerGpu(b) if b.0 < MIN_VRAM_REQUEST => issues.push(Issue::new(
                "resources.vram",
                format!(
                    "{b} is too little for a GPU job (at least {}); a bare number is bytes, \
                     so write a unit, e.g. \"20GiB\"",
                    ByteSize(MIN_VRAM_REQUEST)
                ),
            )),
            _ => {}
        }
        if !r.only_gpus.is_empty() && (r.only_gpus.len() as u32) < r.gpus {
            issues.push(Issue::new(
                "resources.only_gpus",
                format!(
                    "lists {} GPUs but resources.gpus = {}",
                    r.only_gpus.len(),
                    r.gpus
                ),
            ));
        }
        for (i, p) in r.prefer_gpus.iter().enumerate() {
            if !r.only_gpus.is_empty() && !r.only_gpus.contains(p) {
                issues.push(Issue::new(
                    format!("resources.prefer_gpus[{i}]"),
                    format!("GPU {p} is not in resources.only_gpus"),
                ));
            }
        }
        for (key, list) in [("only_gpus", &r.only_gpus), ("prefer_gpus", &r.prefer_gpus)] {
            for (i, sel) in list.iter().enumerate() {
                if let GpuSelector::Uuid(u) = sel
                    && u.trim().is_empty()
                {
                    issues.push(Issue::new(
                        format!("resources.{key}[{i}]"),
                        "a GPU is an index or a UUID such as \"GPU-8f1c...\"",
                    ));
                }
            }
        }
        if let Some(cpus) = r.cpus
            && (cpus == 0 || cpus > 4096)
        {
            issues.push(Issue::new("resources.cpus", "must be between 1 and 4096"));
        }
    }

    /// Makes every relative path absolute against `base_dir` (the job file's directory) and
    /// records `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let abs = |p: &Path| {
            if p.is_absolute() {
                tidy_path(p)
            } else {
                tidy_path(&base_dir.join(p))
            }
        };
        if let Some(cmd) = &mut self.command {
            resolve_program(&mut cmd.argv, base_dir);
            cmd.workdir = Some(match &cmd.workdir {
                Some(w) => abs(w),
                None => tidy_path(base_dir),
            });
        }
        if let Some(notify) = &mut self.notify {
            notify.resolve_paths(base_dir);
        }
        super::train::resolve_paths(self, base_dir);
        self.base_dir = Some(base_dir.to_path_buf());
    }

    /// Checks that the files and directories the job names exist (after `resolve_paths`).
    pub fn check_paths(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Some(cmd) = &self.command {
            if let Some(w) = &cmd.workdir {
                if !w.is_dir() {
                    issues.push(Issue::new(
                        "command.workdir",
                        format!("{} is not a directory", w.display()),
                    ));
                } else if let Err(e) = std::fs::metadata(w.join(".")) {
                    // Looking up "DIR/." needs the right to enter DIR, checked with the file
                    // rights in force (a root daemon checks with the submitter's): a directory
                    // the job could not start in is refused now, not at its start.
                    issues.push(Issue::new(
                        "command.workdir",
                        format!("{}: cannot enter it: {e}", w.display()),
                    ));
                }
            }
            if let Some(program) = cmd.argv.first() {
                let path_var = cmd
                    .env
                    .get("PATH")
                    .map(String::as_str)
                    .unwrap_or(super::contract::DEFAULT_PATH);
                if let Err(why) = find_program(program, path_var) {
                    issues.push(Issue::new("command.argv[0]", why));
                }
            }
        }
        if let Some(notify) = &self.notify {
            issues.extend(notify.check_paths());
        }
        issues.extend(super::train::check_paths(self));
        issues
    }
}

/// Makes `argv`'s program absolute against `base_dir` when it is a relative path (has a `/`);
/// a bare name stays one, for a lookup in `PATH`.
pub(super) fn resolve_program(argv: &mut [String], base_dir: &Path) {
    if let Some(program) = argv.first_mut()
        && program.contains('/')
        && !Path::new(program.as_str()).is_absolute()
    {
        *program = tidy_path(&base_dir.join(program.as_str()))
            .to_string_lossy()
            .into_owned();
    }
}

/// Linux takes at most MAX_ARG_STRLEN bytes per argument or `NAME=value` (with its NUL):
/// longer fails only when the job starts.
const MAX_ARG_STRLEN: usize = 32 * 4096;

fn too_long(len: usize) -> String {
    format!(
        "is {len} bytes; Linux takes at most {MAX_ARG_STRLEN} per argument or variable (put it in a file)"
    )
}

/// Checks a program and its arguments (`key` is `command.argv`, `notify.argv`): a program
/// named, no NUL, no argument longer than Linux takes.
pub(super) fn validate_argv(key: &str, argv: &[String], issues: &mut Vec<Issue>) {
    match argv.first() {
        None => issues.push(Issue::new(key, "must name a program to run")),
        Some(p) if p.trim().is_empty() => {
            issues.push(Issue::new(format!("{key}[0]"), "program must not be empty"))
        }
        _ => {}
    }
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            issues.push(Issue::new(format!("{key}[{i}]"), "must not contain NUL"));
        } else if arg.len() + 1 > MAX_ARG_STRLEN {
            issues.push(Issue::new(format!("{key}[{i}]"), too_long(arg.len())));
        }
    }
}

fn validate_command(cmd: &CommandSpec, issues: &mut Vec<Issue>) {
    validate_argv("command.argv", &cmd.argv, issues);
    for (k, v) in &cmd.env {
        let key = format!("command.env.{k}");
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            issues.push(Issue::new(
                key,
                "variable names must be non-empty without '=' or NUL",
            ));
        } else if v.contains('\0') {
            issues.push(Issue::new(key, "the value must not contain NUL"));
        } else if k.len() + v.len() + 2 > MAX_ARG_STRLEN {
            issues.push(Issue::new(key, too_long(k.len() + v.len() + 1)));
        } else if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("JOBD_") {
            issues.push(Issue::new(
                key,
                format!("{k} is set by the scheduler and cannot be overridden"),
            ));
        }
    }
}

/// A `--set` change that cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OverrideError(pub String);

/// A job file's text with `set` changes applied (`KEY=VALUE`: a dotted key path and a TOML
/// value; `jobctl --set`, sweeps): the text as written when there are none, otherwise
/// re-written from the parsed document (so its comments are not kept). `origin` names the file
/// in messages.
pub fn apply_overrides(text: &str, origin: &str, set: &[String]) -> Result<String, OverrideError> {
    if set.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| OverrideError(format!("invalid job file:\n{origin}: {e}")))?;
    // Two changes to the same part of the file (`command.env.X` and `command.env`): the later
    // would silently undo the earlier.
    for (i, a) in set.iter().enumerate() {
        let key = |s: &str| s.split_once('=').map_or(s, |(k, _)| k).trim().to_string();
        if let Some(b) = set[..i]
            .iter()
            .find(|b| super::sweep::keys_overlap(&key(b), &key(a)))
        {
            return Err(OverrideError(if key(b) == key(a) {
                format!("--set {:?} is given twice: give it once", key(a))
            } else {
                format!(
                    "--set {:?} and --set {:?} change the same part of the file (one is inside \
                     the other): give one of them",
                    key(b),
                    key(a)
                )
            }));
        }
    }
    for item in set {
        let Some((path, raw)) = item.split_once('=') else {
            return Err(OverrideError(format!(
                "--set {item:?}: write KEY=VALUE, e.g. training.learning_rate=3e-4"
            )));
        };
        let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(OverrideError(format!(
                "--set {item:?}: {path:?} is not a dotted key path"
            )));
        }
        let (last, parents) = keys.split_last().expect("at least one key");
        // A string where the file has one and for environment variables (`command.env.LR=3e-4`
        // is the text "3e-4"); otherwise a TOML value (3e-4, true, [1, 2], "x"), else the text
        // itself as a string.
        let was_string = parents
            .iter()
            .try_fold(&doc, |t, k| t.get(*k)?.as_table())
            .and_then(|t| t.get(*last))
            .is_some_and(toml::Value::is_str);
        let in_env = keys.len() == 3 && keys[0] == "command" && keys[1] == "env";
        // A quote starts a TOML string, and (where a value is not kept as text) brackets and
        // braces a list or table: one that does not parse is a mistake (`name="x" name="y"`),
        // not a bare word. Text kept as text may hold them (`command.env.CFG={"lr": 0.1}`).
        let opens = if was_string || in_env {
            &['"', '\''][..]
        } else {
            &['"', '\'', '[', '{'][..]
        };
        if raw.trim_start().starts_with(opens) && toml_value(raw).is_none() {
            return Err(OverrideError(format!(
                "--set {item:?}: {} is not one TOML value (a string in quotes, a number, a list \
                 [..] or a table {{..}}); to give it as text, quote it: '...'",
                raw.trim()
            )));
        }
        let value = if was_string || in_env {
            let unquoted = toml_value(raw).and_then(|v| v.as_str().map(str::to_string));
            toml::Value::String(unquoted.unwrap_or_else(|| raw.to_string()))
        } else {
            toml_value(raw).unwrap_or_else(|| toml::Value::String(raw.to_string()))
        };
        let mut table = &mut doc;
        for (i, k) in parents.iter().enumerate() {
            let entry = table
                .entry(k.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                OverrideError(format!(
                    "--set {item:?}: {} is not a table in {origin}",
                    keys[..=i].join(".")
                ))
            })?;
        }
        table.insert(last.to_string(), value);
    }
    toml::to_string(&doc).map_err(|e| OverrideError(e.to_string()))
}

/// `raw` read as one TOML value (`3e-4`, `"x"`, `[1, 2]`, `{ a = 1 }`); `None` for anything
/// else, including text that would also set other keys (`0\nname = "x"`).
pub fn toml_value(raw: &str) -> Option<toml::Value> {
    let mut t: toml::Table = format!("v = {raw}").parse().ok()?;
    let v = t.remove("v")?;
    t.is_empty().then_some(v)
}

/// Finds `program` as the worker would: a path (containing `/`) must be an executable file;
/// a bare name is searched in `path_var`.
pub fn find_program(program: &str, path_var: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = Path::new(program);
        if !p.exists() {
            return Err(format!("{program} does not exist"));
        }
        if !executable(p) {
            return Err(format!("{program} is not an executable file"));
        }
        return Ok(p.to_path_buf());
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("program {program:?} not found in PATH ({path_var})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> JobSpec {
        parse("job.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> String {
        parse("job.toml", text).unwrap_err().to_string()
    }

    /// The TOML blocks of the two READMEs (fenced as toml) that are job files, or parts of
    /// one, parse as shown (a new user copies them: one of them lacked `[data]`), and the
    /// error the README shows for a misspelt key is the one jobd gives.
    #[test]
    fn readme_job_snippets_parse() {
        let mut checked = 0;
        for (doc, text) in [
            ("README.md", include_str!("../../README.md")),
            ("jobs/README.md", include_str!("../../jobs/README.md")),
        ] {
            for block in text.split("```toml\n").skip(1) {
                let block = block.split("```").next().unwrap();
                let job = if block.contains("kind = ") {
                    block.to_string()
                } else if block.starts_with("[notify]") {
                    format!("kind = \"command\"\n[command]\nargv = [\"true\"]\n{block}")
                } else if block.starts_with("[publish]") {
                    format!(
                        "kind = \"train\"\n[model]\ninit = \"scratch\"\nhidden_size = 64\n\
                         num_hidden_layers = 1\nnum_attention_heads = 4\nvocab_size = 300\n\
                         [data]\ntrain_file = \"t.jsonl\"\nblock_size = 16\n{block}"
                    )
                } else {
                    continue; // the daemon's config: config's tests
                };
                if let Err(e) = parse(doc, &job) {
                    panic!("a job snippet of {doc} does not parse: {e}\n{block}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} snippets");
        let readme = include_str!("../../README.md");
        let err = parse(
            "bad.toml",
            "name = \"x\"\nkind = \"command\"\n[resources]\ngpu = 1\n[command]\nargv = [\"true\"]\n",
        )
        .unwrap_err()
        .to_string();
        let line = err.lines().find(|l| l.contains("resources.gpu")).unwrap();
        assert!(readme.contains(line.trim()), "README should show: {line}");
    }

    /// Paths are written as the kernel walks them: no `.`, each `..` where it leads (after a
    /// symlink, to the target's parent), kept as written when the way is missing.
    #[test]
    fn tidy_paths() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::create_dir_all(d.join("c")).unwrap();
        std::os::unix::fs::symlink(d.join("a/b"), d.join("c/link")).unwrap();
        assert_eq!(tidy_path(&d.join("./c/./x")), d.join("c/x"));
        assert_eq!(tidy_path(&d.join("c/../a/x.jsonl")), d.join("a/x.jsonl"));
        assert_eq!(tidy_path(&d.join("c/link/../y")), d.join("a/y"));
        assert_eq!(tidy_path(&d.join("gone/../y")), d.join("gone/../y"));
        let mut spec =
            parse_ok("kind = \"command\"\n[command]\nargv = [\"./run.sh\"]\nworkdir = \".\"\n");
        spec.resolve_paths(&d.join("c/."));
        let cmd = spec.command.unwrap();
        assert_eq!(cmd.workdir, Some(d.join("c")));
        assert_eq!(cmd.argv[0], d.join("c/run.sh").to_string_lossy());
    }

    #[test]
    fn minimal_command_job() {
        let spec = parse_ok("kind = \"command\"\n[command]\nargv = [\"echo\", \"hi\"]\n");
        assert_eq!(spec.kind, JobKind::Command);
        assert_eq!(spec.resources.gpus, 0);
        assert_eq!(spec.resources.vram, VramRequest::Auto);
        assert_eq!(spec.retry.max, 0);
    }

    #[test]
    fn full_command_job() {
        let spec = parse_ok(
            r#"
name = "sweep"
priority = 5
kind = "command"
depends_on = [3, 4]
[resources]
gpus = 2
vram = "20GiB"
only_gpus = [0, 1, "GPU-abc"]
prefer_gpus = [1]
[command]
argv = ["python", "train.py"]
env = { WANDB_MODE = "offline" }
workdir = "src"
[retry]
max = 3
on_exit_codes = [137]
backoff = "30s"
"#,
        );
        assert_eq!(spec.resources.vram, VramRequest::PerGpu(ByteSize::gib(20)));
        assert_eq!(
            spec.resources.only_gpus[2],
            GpuSelector::Uuid("GPU-abc".into())
        );
        assert_eq!(spec.retry.backoff, HumanDuration::secs(30));
        assert_eq!(spec.depends_on, vec![3, 4]);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = parse_err("kind = \"command\"\n[resources]\ngpu = 1\n[command]\nargv=[\"x\"]\n");
        assert!(e.contains("job.toml:3:1"), "{e}");
        assert!(e.contains("unknown field `gpu`"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = parse_err("kind = \"command\"\npriority = \"high\"\n[command]\nargv=[\"x\"]\n");
        assert!(e.starts_with("job.toml:2:12: priority:"), "{e}");
    }

    #[test]
    fn base_dir_is_not_a_job_file_key() {
        let e = parse_err("kind = \"command\"\nbase_dir = \"/etc\"\n[command]\nargv=[\"x\"]\n");
        assert!(
            e.contains("job.toml:2:") && e.contains("base_dir: is not for job files"),
            "{e}"
        );
    }

    #[test]
    fn a_negative_gpu_index_is_named() {
        let e = parse_err(
            "kind = \"command\"\n[resources]\ngpus = 1\nonly_gpus = [-1]\n[command]\nargv=[\"x\"]\n",
        );
        assert!(e.contains("-1 is not a GPU index"), "{e}");
    }

    #[test]
    fn a_missing_kind_is_blamed_on_kind() {
        let e = parse_err("name = \"x\"\n[command]\nargv = [\"x\"]\n");
        assert!(e.contains("kind: missing field `kind`"), "{e}");
        let e = parse_err("kind = \"command\"\n[command]\nenv = {}\n");
        assert!(e.contains("command: missing field `argv`"), "{e}");
    }

    #[test]
    fn a_bare_number_of_bytes_for_vram_is_refused() {
        let job = |v: &str| {
            format!(
                "kind = \"command\"\n[resources]\ngpus = 1\nvram = {v}\n[command]\nargv=[\"x\"]\n"
            )
        };
        let e = parse_err(&job("20"));
        assert!(
            e.contains("resources.vram") && e.contains("write a unit"),
            "{e}"
        );
        parse_ok(&job("\"20GiB\""));
        parse_ok(&job("21474836480"));
    }

    #[test]
    fn priority_out_of_range_is_refused_even_at_i32_min() {
        for p in ["1001", "-1001", "2147483647", "-2147483648"] {
            let e = parse_err(&format!(
                "kind = \"command\"\npriority = {p}\n[command]\nargv=[\"x\"]\n"
            ));
            assert!(
                e.contains("priority: must be between -1000 and 1000"),
                "{p}: {e}"
            );
        }
        assert!(priority_in_range(-1000) && priority_in_range(1000) && priority_in_range(0));
    }

    #[test]
    fn bad_vram_and_kind() {
        let e = parse_err(
            "kind = \"command\"\n[resources]\ngpus = 1\nvram = \"lots\"\n[command]\nargv=[\"x\"]\n",
        );
        assert!(e.contains("resources.vram"), "{e}");
        assert!(e.contains("invalid size"), "{e}");
        let e = parse_err("kind = \"shell\"\n");
        assert!(e.contains("kind") && e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn semantic_errors_are_located() {
        let e =
            parse_err("kind = \"command\"\n[resources]\nvram = \"10GiB\"\n[command]\nargv = []\n");
        assert!(
            e.contains("job.toml:3:8: resources.vram: a VRAM amount needs"),
            "{e}"
        );
        assert!(
            e.contains("job.toml:5:8: command.argv: must name a program"),
            "{e}"
        );
        let e = parse_err("kind = \"command\"\n");
        assert!(e.contains("needs a [command] table"), "{e}");
        let e = parse_err(
            "kind = \"command\"\n[command]\nargv=[\"x\"]\nenv = { CUDA_VISIBLE_DEVICES = \"3\" }\n",
        );
        assert!(e.contains("cannot be overridden"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_base_dir() {
        let mut spec =
            parse_ok("kind = \"command\"\n[command]\nargv = [\"./run.sh\", \"data/x\"]\n");
        spec.resolve_paths(Path::new("/jobs/exp"));
        let cmd = spec.command.unwrap();
        assert_eq!(cmd.argv, vec!["/jobs/exp/run.sh", "data/x"]);
        assert_eq!(cmd.workdir.unwrap(), PathBuf::from("/jobs/exp"));
        assert_eq!(spec.base_dir.unwrap(), PathBuf::from("/jobs/exp"));
    }

    #[test]
    fn missing_program_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = parse_and_resolve(
            "job.toml",
            "kind = \"command\"\n[command]\nargv = [\"no-such-program-xyz\"]\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("command.argv[0]: program \"no-such-program-xyz\" not found"),
            "{e}"
        );
        let e = parse_and_resolve(
            "job.toml",
            "kind = \"command\"\n[command]\nargv = [\"true\"]\nworkdir = \"nope\"\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("command.workdir") && e.contains("is not a directory"),
            "{e}"
        );
    }

    /// `--set`: values kept as text stay text (JSON in an environment variable), a quoted
    /// value or a list or table elsewhere must be one TOML value, and two changes of the same
    /// part of the file are refused.
    #[test]
    fn overrides_keep_text_refuse_broken_values_and_overlaps() {
        let file = "name = \"n\"\npriority = 1\n[command]\nargv = [\"true\"]\n";
        let set = |items: &[&str]| {
            let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
            apply_overrides(file, "f.toml", &items).map(|t| t.parse::<toml::Table>().unwrap())
        };
        let doc = set(&[
            r#"command.env.CFG={"lr": 0.1}"#,
            "command.env.TAG=[v1] nightly",
        ])
        .unwrap();
        assert_eq!(
            doc["command"]["env"]["CFG"].as_str(),
            Some(r#"{"lr": 0.1}"#)
        );
        assert_eq!(doc["command"]["env"]["TAG"].as_str(), Some("[v1] nightly"));
        let doc = set(&["priority=[1, 2]", "command.env.Q='a b'"]).unwrap();
        assert!(doc["priority"].is_array());
        assert_eq!(doc["command"]["env"]["Q"].as_str(), Some("a b"));
        let e = set(&[r#"name="x" name="y""#]).unwrap_err().0;
        assert!(e.contains("not one TOML value"), "{e}");
        let e = set(&["priority=[1, 2"]).unwrap_err().0;
        assert!(e.contains("not one TOML value"), "{e}");
        let e = set(&["priority=0\nname=\"inj\""]);
        assert!(
            e.is_ok_and(|d| d["name"].as_str() == Some("n")),
            "no second key"
        );
        let e = set(&["command.env.X=1", r#"command.env={Y="1"}"#])
            .unwrap_err()
            .0;
        assert!(e.contains("change the same part"), "{e}");
        let e = set(&["priority=1", "priority=2"]).unwrap_err().0;
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn retry_backoff_doubles_and_caps() {
        let r = RetrySpec {
            max: 5,
            on_exit_codes: vec![],
            backoff: HumanDuration::secs(10),
        };
        assert_eq!(r.delay_for(1).as_secs(), 10);
        assert_eq!(r.delay_for(3).as_secs(), 40);
        assert_eq!(r.delay_for(40).as_secs(), 3600);
        assert!(r.retries_on(Some(1), None) && !r.retries_on(Some(0), None));
        assert!(r.retries_on(None, Some(15)));
        let r = RetrySpec {
            on_exit_codes: vec![137],
            ..r
        };
        assert!(!r.retries_on(Some(1), None) && r.retries_on(Some(137), None));
        assert!(r.retries_on(None, Some(9)), "SIGKILL counts as 137");
        assert!(!r.retries_on(None, Some(15)));
    }
}
