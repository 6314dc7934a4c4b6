//! L1: the daemon's configuration — one file (TOML, unknown keys refused), overridden by
//! command-line flags, validated once at start-up. Nothing else in the daemon reads
//! environment variables or config files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::job::GpuSelector;
use crate::spec::toml_source::{Issue, Source, SourceError};
use crate::spec::units::{ByteSize, HumanDuration};

/// The config file as written (every key optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the store, job directories and (by default) the socket live.
    pub state_dir: Option<PathBuf>,
    /// Unix socket `jobctl` connects to.
    pub socket: Option<PathBuf>,
    /// Optional TCP listener for the dashboard and remote clients, e.g. "127.0.0.1:8470".
    pub listen: Option<String>,
    /// "auto" (NVML), "none", or a fake inventory for tests ("fake:24GiB,80GiB+6GiB").
    pub gpus: Option<String>,
    /// Time between SIGTERM and SIGKILL when stopping a job.
    pub grace_period: Option<HumanDuration>,
    /// How long a client may take to send a request's headers, and then its body, before its
    /// connection is closed (default 30s; slow clients would otherwise hold connections
    /// forever).
    pub header_read_timeout: Option<HumanDuration>,
    /// Most TCP connections served at once (default 1024); the unix socket has its own.
    pub max_connections: Option<u32>,
    /// Host names, besides localhost and its address, that a TCP listener on a loopback
    /// address answers to: a reverse proxy's public name, if it passes it on in `Host`.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Most CPU-only jobs running at once.
    pub max_cpu_jobs: Option<u32>,
    /// Users who may change any job.
    #[serde(default)]
    pub admins: Vec<String>,
    /// For a daemon not running as root: other users whose jobs it accepts (they run as the
    /// daemon's user).
    #[serde(default)]
    pub trusted_users: Vec<String>,
    /// Bearer tokens for the TCP listener, stored as SHA-256 hashes (`jobd token` makes one).
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    /// Allow reading the queue over TCP without a token (default true).
    pub anonymous_read: Option<bool>,
    /// Let everyone read every job's logs (default false: owner and admins only).
    pub public_logs: Option<bool>,
    /// Default Ollama models directory for `[publish]` (default: `$OLLAMA_MODELS`, else
    /// Ollama's own directory if it exists; see [`default_ollama_models`]).
    pub ollama_models: Option<PathBuf>,
    /// The zone recurring jobs' cron expressions are read in: "utc" (default) or "local".
    pub schedule_timezone: Option<crate::spec::schedule::ScheduleTz>,
    #[serde(default)]
    pub scheduler: SchedulerFile,
}

/// One bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The Unix user the token acts as.
    pub user: String,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

/// `[scheduler]`: placement and policy knobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerFile {
    /// VRAM kept free on every GPU on top of reservations and foreign use.
    pub vram_margin: Option<ByteSize>,
    /// After waiting this long, the first job in line gets GPUs reserved and smaller jobs stop
    /// backfilling onto them.
    pub starvation_after: Option<HumanDuration>,
    /// Only these GPUs are used (index or UUID); default all.
    #[serde(default)]
    pub allowed_gpus: Vec<GpuSelector>,
    /// Let higher-priority jobs preempt lower-priority running ones (default true).
    pub preemption: Option<bool>,
    /// The highest priority a user who is not an admin may give a job (default 0, as Slurm's
    /// nice: users may lower their jobs' priority to let their other jobs go first; above it
    /// a job would go ahead of, and preempt, other people's work).
    pub max_user_priority: Option<i32>,
    /// How fast past GPU use is forgotten for fair share (half-life).
    pub fair_share_half_life: Option<HumanDuration>,
    /// How often the GPU inventory is refreshed when nothing else happens.
    pub gpu_refresh: Option<HumanDuration>,
    /// Finished jobs older than this are removed (record, history, job directory), as
    /// `jobctl clean --older-than` does; default: kept until cleaned by hand.
    pub keep_finished: Option<HumanDuration>,
    /// Per-user limits: `[scheduler.limits.default]` and `[scheduler.limits.<user>]`.
    #[serde(default)]
    pub limits: BTreeMap<String, UserLimits>,
}

/// Limits for one user (or the default for all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLimits {
    /// Most jobs running at once.
    pub max_running: Option<u32>,
    /// Most VRAM reserved at once, summed over GPUs.
    pub max_vram: Option<ByteSize>,
    /// Most GPUs held at once.
    pub max_gpus: Option<u32>,
    /// Most unfinished jobs (queued, held, waiting, starting, running, publishing) at once: a
    /// submit past it is refused, so that a flood of submits cannot fill the store. Unlike the
    /// keys above, a user's entry without it falls back to the default entry's, then to
    /// [`DEFAULT_MAX_SUBMITTED`].
    pub max_submitted: Option<u32>,
}

/// The most unfinished jobs a user may have when neither their `[scheduler.limits.<user>]`
/// nor `[scheduler.limits.default]` sets `max_submitted`: far above any real queue, but it
/// bounds a runaway submit loop out of the box.
pub const DEFAULT_MAX_SUBMITTED: u32 = 10_000;

/// A user's `max_submitted` and where it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitLimit {
    pub max: u32,
    pub source: LimitSource,
}

/// Where a limit's value comes from, for error messages that tell users whom to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitSource {
    /// `[scheduler.limits.<user>]`.
    User(String),
    /// `[scheduler.limits.default]`.
    Default,
    /// Not configured: jobd's built-in value.
    BuiltIn,
}

/// The setting as an error message names it: `[scheduler.limits.alice] max_submitted`.
impl std::fmt::Display for LimitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitSource::User(u) => write!(f, "[scheduler.limits.{u}] max_submitted"),
            LimitSource::Default => f.write_str("[scheduler.limits.default] max_submitted"),
            LimitSource::BuiltIn => f.write_str(
                "max_submitted (jobd's built-in default; an admin may set it in \
                 [scheduler.limits.default])",
            ),
        }
    }
}

/// Where the GPU inventory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    /// NVML (and cudarc) loaded at run time; CPU-only mode when absent.
    Auto,
    /// No GPUs: CPU jobs only.
    None,
    /// Simulated GPUs, for tests and demos.
    Fake(Vec<FakeGpu>),
    /// Simulated GPUs described in a TOML file that is re-read at each refresh, so tests can
    /// change foreign memory use while the daemon runs.
    FakeFile(PathBuf),
}

/// One simulated GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpu {
    pub total: ByteSize,
    /// Memory used by processes jobd does not own.
    #[serde(default)]
    pub foreign: ByteSize,
}

impl FromStr for GpuSource {
    type Err = String;
    /// `auto`, `none`, `fake:24GiB,80GiB+6GiB` (`+` = foreign use), `fake-file:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "auto" => return Ok(GpuSource::Auto),
            "none" => return Ok(GpuSource::None),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("fake-file:") {
            // Read again at every inventory refresh (tests change it), but it must exist from
            // the start: a typo would otherwise run a daemon that silently has no GPUs.
            if !Path::new(path).is_file() {
                return Err(format!("fake GPU file {path:?} does not exist"));
            }
            return Ok(GpuSource::FakeFile(PathBuf::from(path)));
        }
        let Some(list) = s.strip_prefix("fake:") else {
            return Err(format!(
                "unknown GPU source {s:?}: use \"auto\", \"none\", \"fake:24GiB,80GiB\" or \"fake-file:PATH\""
            ));
        };
        let gpus = list
            .split(',')
            .map(|item| {
                let (total, foreign) = match item.split_once('+') {
                    Some((t, f)) => (t, Some(f)),
                    None => (item, None),
                };
                let total: ByteSize = total
                    .parse()
                    .map_err(|e| format!("fake GPU {item:?}: {e}"))?;
                let foreign: ByteSize = match foreign {
                    Some(f) => f.parse().map_err(|e| format!("fake GPU {item:?}: {e}"))?,
                    None => ByteSize(0),
                };
                if total.0 == 0 || foreign > total {
                    return Err(format!(
                        "fake GPU {item:?}: total must be > 0 and ≥ foreign use"
                    ));
                }
                Ok(FakeGpu { total, foreign })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if gpus.is_empty() {
            return Err("fake: needs at least one GPU size".into());
        }
        Ok(GpuSource::Fake(gpus))
    }
}

/// Flags that override the file (each `None` keeps the file's value).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub gpus: Option<String>,
    pub grace_period: Option<HumanDuration>,
    pub ollama_models: Option<PathBuf>,
    pub max_cpu_jobs: Option<u32>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub gpus: GpuSource,
    pub grace_period: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: u32,
    pub allowed_hosts: Vec<String>,
    pub max_cpu_jobs: u32,
    pub admins: BTreeSet<String>,
    pub trusted_users: BTreeSet<String>,
    /// SHA-256 (hex) → user.
    pub tokens: BTreeMap<String, String>,
    pub anonymous_read: bool,
    pub public_logs: bool,
    pub ollama_models: Option<PathBuf>,
    pub schedule_timezone: crate::spec::schedule::ScheduleTz,
    pub scheduler: SchedulerConfig,
    /// The config file used, if any.
    pub source: Option<PathBuf>,
}

/// Validated `[scheduler]`.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub vram_margin: u64,
    pub starvation_after: Duration,
    pub allowed_gpus: Vec<GpuSelector>,
    pub preemption: bool,
    /// See [`SchedulerFile::max_user_priority`].
    pub max_user_priority: i32,
    pub fair_share_half_life: Duration,
    pub gpu_refresh: Duration,
    /// See [`SchedulerFile::keep_finished`].
    pub keep_finished: Option<Duration>,
    pub default_limits: UserLimits,
    pub user_limits: BTreeMap<String, UserLimits>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            vram_margin: ByteSize::mib(256).0,
            starvation_after: Duration::from_secs(300),
            allowed_gpus: Vec::new(),
            preemption: true,
            max_user_priority: 0,
            fair_share_half_life: Duration::from_secs(24 * 3600),
            gpu_refresh: Duration::from_secs(10),
            keep_finished: None,
            default_limits: UserLimits::default(),
            user_limits: BTreeMap::new(),
        }
    }
}

impl SchedulerConfig {
    /// The limits that apply to `user`.
    pub fn limits_for(&self, user: &str) -> UserLimits {
        self.user_limits
            .get(user)
            .copied()
            .unwrap_or(self.default_limits)
    }

    /// The most unfinished jobs `user` may have, and where that number is set: their own
    /// entry, else the default entry, else [`DEFAULT_MAX_SUBMITTED`].
    pub fn submit_limit(&self, user: &str) -> SubmitLimit {
        if let Some(max) = self.user_limits.get(user).and_then(|l| l.max_submitted) {
            return SubmitLimit {
                max,
                source: LimitSource::User(user.to_string()),
            };
        }
        match self.default_limits.max_submitted {
            Some(max) => SubmitLimit {
                max,
                source: LimitSource::Default,
            },
            None => SubmitLimit {
                max: DEFAULT_MAX_SUBMITTED,
                source: LimitSource::BuiltIn,
            },
        }
    }
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] SourceError),
    #[error("{0}")]
    Flag(String),
}

/// Whether this process runs as root (and so runs jobs as their owners).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Default state directory: `/var/lib/jobd` for root, else `$XDG_STATE_HOME/jobd` or
/// `~/.local/state/jobd`.
pub fn default_state_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/jobd");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("jobd");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/jobd")
}

/// Where Ollama keeps its models on this machine, when neither the config nor a flag says:
/// `$OLLAMA_MODELS` (Ollama's own variable), else the directory of Ollama's Linux install
/// (`/usr/share/ollama/.ollama/models`, its service user's) for a root daemon, or
/// `~/.ollama/models` (`ollama serve` run by that user) for a daemon of one user — only one
/// that exists: a directory Ollama never made is not where it looks.
pub fn default_ollama_models() -> Option<PathBuf> {
    let candidate = match std::env::var_os("OLLAMA_MODELS").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None if running_as_root() => PathBuf::from("/usr/share/ollama/.ollama/models"),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?)
            .join(".ollama/models"),
    };
    candidate.is_dir().then_some(candidate)
}

/// Default socket: `/run/jobd/jobd.sock` for root, else `<state_dir>/jobd.sock`.
pub fn default_socket(state_dir: &Path) -> PathBuf {
    if running_as_root() && state_dir == Path::new("/var/lib/jobd") {
        PathBuf::from("/run/jobd/jobd.sock")
    } else {
        state_dir.join("jobd.sock")
    }
}

impl Config {
    /// Loads `path` (if given), applies `flags`, validates.
    pub fn load(path: Option<&Path>, flags: Overrides) -> Result<Config, ConfigError> {
        let (file, text) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let origin = p.display().to_string();
                let src = Source::parse(&origin, &text)?;
                let file: ConfigFile = src.deserialize()?;
                (file, Some((origin, text)))
            }
            None => (ConfigFile::default(), None),
        };
        let issues = file.validate();
        if !issues.is_empty() {
            let (origin, text) = text.unwrap_or_default();
            return Err(Source::parse(&origin, &text)?.locate(issues).into());
        }
        let mut cfg = Config::from_file(file)?;
        cfg.source = path.map(Path::to_path_buf);
        cfg.apply(flags)?;
        if cfg.ollama_models.is_none() {
            cfg.ollama_models = default_ollama_models();
        }
        Ok(cfg)
    }

    fn from_file(file: ConfigFile) -> Result<Config, ConfigError> {
        let state_dir = file.state_dir.clone().unwrap_or_else(default_state_dir);
        let socket = file
            .socket
            .clone()
            .unwrap_or_else(|| default_socket(&state_dir));
        let s = &file.scheduler;
        let defaults = SchedulerConfig::default();
        let mut user_limits = s.limits.clone();
        let default_limits = user_limits.remove("default").unwrap_or_default();
        Ok(Config {
            listen: file
                .listen
                .as_deref()
                .map(parse_listen)
                .transpose()
                .map_err(ConfigError::Flag)?,
            gpus: file
                .gpus
                .as_deref()
                .unwrap_or("auto")
                .parse()
                .map_err(ConfigError::Flag)?,
            grace_period: file.grace_period.map_or(Duration::from_secs(30), |d| d.0),
            header_read_timeout: file
                .header_read_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            max_connections: file.max_connections.unwrap_or(1024),
            allowed_hosts: file.allowed_hosts.clone(),
            max_cpu_jobs: file.max_cpu_jobs.unwrap_or_else(default_cpu_jobs),
            admins: file.admins.iter().cloned().collect(),
            trusted_users: file.trusted_users.iter().cloned().collect(),
            tokens: file
                .tokens
                .iter()
                .map(|t| (t.sha256.to_ascii_lowercase(), t.user.clone()))
                .collect(),
            anonymous_read: file.anonymous_read.unwrap_or(true),
            public_logs: file.public_logs.unwrap_or(false),
            ollama_models: file.ollama_models.clone(),
            schedule_timezone: file.schedule_timezone.unwrap_or_default(),
            scheduler: SchedulerConfig {
                vram_margin: s.vram_margin.map_or(defaults.vram_margin, |b| b.0),
                starvation_after: s
                    .starvation_after
                    .map_or(defaults.starvation_after, |d| d.0),
                allowed_gpus: s.allowed_gpus.clone(),
                preemption: s.preemption.unwrap_or(true),
                max_user_priority: s.max_user_priority.unwrap_or(defaults.max_user_priority),
                fair_share_half_life: s
                    .fair_share_half_life
                    .map_or(defaults.fair_share_half_life, |d| d.0),
                gpu_refresh: s.gpu_refresh.map_or(defaults.gpu_refresh, |d| d.0),
                keep_finished: s.keep_finished.map(|d| d.0),
                default_limits,
                user_limits,
            },
            state_dir,
            socket,
            source: None,
        })
    }

    fn apply(&mut self, flags: Overrides) -> Result<(), ConfigError> {
        if let Some(dir) = flags.state_dir {
            // A socket that was only defaulted follows the state directory.
            if self.socket == default_socket(&self.state_dir) {
                self.socket = default_socket(&dir);
            }
            self.state_dir = dir;
        }
        if let Some(s) = flags.socket {
            self.socket = s;
        }
        if let Some(l) = flags.listen {
            self.listen = Some(parse_listen(&l).map_err(ConfigError::Flag)?);
        }
        if let Some(g) = flags.gpus {
            self.gpus = g
                .parse()
                .map_err(|e| ConfigError::Flag(format!("--gpus: {e}")))?;
        }
        if let Some(g) = flags.grace_period {
            self.grace_period = g.0;
        }
        if let Some(m) = flags.ollama_models {
            self.ollama_models = Some(m);
        }
        if let Some(n) = flags.max_cpu_jobs {
            if n == 0 {
                return Err(ConfigError::Flag(
                    "--max-cpu-jobs must be at least 1".into(),
                ));
            }
            self.max_cpu_jobs = n;
        }
        self.state_dir = absolute(&self.state_dir);
        self.socket = absolute(&self.socket);
        Ok(())
    }

    /// Root of the job directories.
    pub fn jobs_dir(&self) -> PathBuf {
        self.state_dir.join("jobs")
    }

    /// The sled store's directory.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    /// The user a bearer token acts as, if the token is known.
    pub fn user_for_token(&self, token: &str) -> Option<&str> {
        self.tokens.get(&hash_token(token)).map(String::as_str)
    }
}

impl ConfigFile {
    fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Some(l) = &self.listen
            && let Err(e) = parse_listen(l)
        {
            issues.push(Issue::new("listen", e));
        }
        if let Some(g) = &self.gpus
            && let Err(e) = g.parse::<GpuSource>()
        {
            issues.push(Issue::new("gpus", e));
        }
        if self.max_cpu_jobs == Some(0) {
            issues.push(Issue::new("max_cpu_jobs", "must be at least 1"));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                issues.push(Issue::new(
                    format!("tokens[{i}].sha256"),
                    "must be 64 hex digits (the SHA-256 of the token; `jobd token` prints one)",
                ));
            }
            if t.user.trim().is_empty() {
                issues.push(Issue::new(format!("tokens[{i}].user"), "must name a user"));
            }
        }
        if let Some(d) = self.grace_period
            && d.0 > Duration::from_secs(3600)
        {
            issues.push(Issue::new("grace_period", "must be at most 1h"));
        }
        // Zero would make the scheduler refresh the inventory in a busy loop, or divide past
        // use by nothing.
        if let Some(d) = self.scheduler.gpu_refresh
            && d.0 < Duration::from_secs(1)
        {
            issues.push(Issue::new("scheduler.gpu_refresh", "must be at least 1s"));
        }
        if let Some(p) = self.scheduler.max_user_priority
            && !crate::spec::job::priority_in_range(p)
        {
            issues.push(Issue::new(
                "scheduler.max_user_priority",
                format!(
                    "must be between -{0} and {0}",
                    crate::spec::job::MAX_PRIORITY
                ),
            ));
        }
        if let Some(d) = self.scheduler.fair_share_half_life
            && d.0.is_zero()
        {
            issues.push(Issue::new(
                "scheduler.fair_share_half_life",
                "must be more than 0",
            ));
        }
        if let Some(d) = self.header_read_timeout
            && !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&d.0)
        {
            issues.push(Issue::new(
                "header_read_timeout",
                "must be between 1s and 10m",
            ));
        }
        if let Some(d) = self.scheduler.keep_finished
            && d.0 < Duration::from_secs(10)
        {
            issues.push(Issue::new(
                "scheduler.keep_finished",
                "must be at least 10s (a job's end must stay readable a while: jobctl wait, \
                 submit --follow); leave it out to keep finished jobs until jobctl clean",
            ));
        }
        if self.max_connections == Some(0) {
            issues.push(Issue::new("max_connections", "must be at least 1"));
        }
        // Zero would refuse every submit while looking like a limit; who may submit at all is
        // said by trusted_users (or accounts, for a root daemon).
        for (user, l) in &self.scheduler.limits {
            if l.max_submitted == Some(0) {
                issues.push(Issue::new(
                    format!("scheduler.limits.{user}.max_submitted"),
                    format!(
                        "must be at least 1 (it bounds unfinished jobs; leave it out for the \
                         built-in {DEFAULT_MAX_SUBMITTED})"
                    ),
                ));
            }
        }
        if let Some(i) = self.allowed_hosts.iter().position(|h| {
            h.is_empty() || h.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        }) {
            issues.push(Issue::new(
                format!("allowed_hosts[{i}]"),
                "must be a host name without a port or scheme (e.g. \"jobd.example.com\")",
            ));
        }
        issues
    }
}

/// Parses a listen address; a bare port means 127.0.0.1.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("invalid listen address {s:?} (write e.g. \"127.0.0.1:8470\")"))
}

/// SHA-256 of a token, lower-case hex: what the config stores.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("jobd_{}", hex::encode(bytes))
}

fn default_cpu_jobs() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_gpu_syntax() {
        let g: GpuSource = "fake:24GiB,80GiB+6GiB".parse().unwrap();
        assert_eq!(
            g,
            GpuSource::Fake(vec![
                FakeGpu {
                    total: ByteSize::gib(24),
                    foreign: ByteSize(0)
                },
                FakeGpu {
                    total: ByteSize::gib(80),
                    foreign: ByteSize::gib(6)
                },
            ])
        );
        assert!("fake:".parse::<GpuSource>().is_err());
        assert!("fake:10GiB+20GiB".parse::<GpuSource>().is_err());
        assert!(
            "cuda"
                .parse::<GpuSource>()
                .unwrap_err()
                .contains("unknown GPU source")
        );
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobd.toml");
        std::fs::write(
            &path,
            "state_dir = \"/srv/jobd\"\nlisten = \"127.0.0.1:9000\"\ngrace_period = \"5s\"\n\
             [[tokens]]\nuser = \"alice\"\nsha256 = \""
                .to_string()
                + &hash_token("secret")
                + "\"\n\
             [scheduler.limits.default]\nmax_running = 2\n[scheduler.limits.bob]\nmax_gpus = 1\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&path),
            Overrides {
                gpus: Some("fake:24GiB".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/jobd"));
        assert_eq!(cfg.socket, PathBuf::from("/srv/jobd/jobd.sock"));
        assert_eq!(cfg.grace_period, Duration::from_secs(5));
        assert_eq!(cfg.user_for_token("secret"), Some("alice"));
        assert_eq!(cfg.user_for_token("guess"), None);
        assert!(matches!(cfg.gpus, GpuSource::Fake(_)));
        assert_eq!(cfg.scheduler.limits_for("carol").max_running, Some(2));
        assert_eq!(cfg.scheduler.limits_for("bob").max_gpus, Some(1));
    }

    /// `max_submitted` falls back key by key: the user's entry, the default entry, then the
    /// built-in value, each named as where the limit is set.
    #[test]
    fn max_submitted_falls_back_to_the_default_then_the_built_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobd.toml");
        std::fs::write(
            &path,
            "[scheduler.limits.default]\nmax_submitted = 50\n\
             [scheduler.limits.alice]\nmax_submitted = 2\n\
             [scheduler.limits.bob]\nmax_gpus = 1\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&path), Overrides::default()).unwrap();
        let s = &cfg.scheduler;
        assert_eq!(
            s.submit_limit("alice"),
            SubmitLimit {
                max: 2,
                source: LimitSource::User("alice".into())
            }
        );
        for user in ["bob", "carol"] {
            assert_eq!(
                s.submit_limit(user),
                SubmitLimit {
                    max: 50,
                    source: LimitSource::Default
                },
                "{user}"
            );
        }
        assert_eq!(
            s.submit_limit("alice").source.to_string(),
            "[scheduler.limits.alice] max_submitted"
        );
        std::fs::write(&path, "[scheduler.limits.bob]\nmax_running = 1\n").unwrap();
        let cfg = Config::load(Some(&path), Overrides::default()).unwrap();
        for user in ["bob", "carol"] {
            assert_eq!(
                cfg.scheduler.submit_limit(user),
                SubmitLimit {
                    max: DEFAULT_MAX_SUBMITTED,
                    source: LimitSource::BuiltIn
                },
                "{user}"
            );
        }
        assert_eq!(
            DEFAULT_MAX_SUBMITTED, 10_000,
            "the documented built-in value"
        );
    }

    /// The README's config example and `dist/jobd.toml` load as shown (with a real token
    /// hash where they show a placeholder), and set what they say they set.
    #[test]
    fn documented_configs_load() {
        let readme = include_str!("../../README.md");
        let example = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .find(|b| b.starts_with("state_dir"))
            .expect("README's config example");
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("README.md", example.to_string()),
            (
                "jobd.toml",
                include_str!("../../dist/jobd.toml").to_string(),
            ),
        ] {
            let text = text
                .replace("\"…\"", &format!("\"{}\"", hash_token("t")))
                .replace("\"...\"", &format!("\"{}\"", hash_token("t")));
            let path = dir.path().join(name);
            std::fs::write(&path, &text).unwrap();
            let cfg = Config::load(Some(&path), Overrides::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/jobd"), "{name}");
            assert_eq!(
                cfg.ollama_models.as_deref(),
                Some(Path::new("/usr/share/ollama/.ollama/models")),
                "{name}"
            );
        }
        let path = dir.path().join("README.md");
        let cfg = Config::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.scheduler.gpu_refresh, Duration::from_secs(10));
        assert_eq!(
            cfg.scheduler.fair_share_half_life,
            Duration::from_secs(86400)
        );
        assert_eq!(cfg.user_for_token("t"), Some("alice"));
    }

    #[test]
    fn bad_config_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobd.toml");
        std::fs::write(&path, "listen = \"everywhere\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("jobd.toml:1:10: listen: invalid listen address"),
            "{err}"
        );
        std::fs::write(&path, "grace = \"5s\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `grace`"), "{err}");
        for (text, want) in [
            (
                "[scheduler]\ngpu_refresh = \"0s\"\n",
                "scheduler.gpu_refresh: must be at least 1s",
            ),
            (
                "[scheduler]\nfair_share_half_life = \"0s\"\n",
                "scheduler.fair_share_half_life: must be more than 0",
            ),
            (
                "[scheduler]\nmax_user_priority = 5000\n",
                "scheduler.max_user_priority: must be between -1000 and 1000",
            ),
            (
                "header_read_timeout = \"0s\"\n",
                "header_read_timeout: must be between",
            ),
            (
                "[scheduler.limits.alice]\nmax_submitted = 0\n",
                "jobd.toml:2:17: scheduler.limits.alice.max_submitted: must be at least 1",
            ),
            (
                "[scheduler.limits.default]\nmax_submitted = 0\n",
                "scheduler.limits.default.max_submitted: must be at least 1 (it bounds \
                 unfinished jobs; leave it out for the built-in 10000)",
            ),
            (
                "[scheduler.limits.default]\nmax_submitted = -5\n",
                "jobd.toml:2:17: scheduler.limits.default.max_submitted: invalid value: \
                 integer `-5`, expected u32",
            ),
            (
                "[scheduler.limits.default]\nmax_submitted = \"lots\"\n",
                "jobd.toml:2:17: scheduler.limits.default.max_submitted: invalid type: string \
                 \"lots\", expected u32",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(Some(&path), Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
