//! Daemon configuration (TOML): its shape, defaults and cross-field checks.
//! Admission ([`crate::admission`]) applies it to requests.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use forkd_net::Bound;
use forkd_workspace::{Mode, Rules};

use forkd_ipc::AppliedLimits;
use serde::Deserialize;

pub(crate) const MIB: u64 = 1024 * 1024;
/// Name of the zygote an empty configuration gets.
const DEFAULT_ZYGOTE_NAME: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("policy `{name}` ({path}): {reason}")]
    Policy {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The daemon's configuration file. Every field has a default, so an empty
/// file (or none) gives a working root daemon with one numpy zygote.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Socket path; default `/run/forkd/forkd.sock` as root, else
    /// `$XDG_RUNTIME_DIR/forkd/forkd.sock`.
    pub socket: Option<PathBuf>,
    /// Peers whose uid is listed may connect; default: the daemon's uid and root.
    pub allowed_uids: Option<Vec<u32>>,
    /// Peers whose primary gid is listed may connect too.
    pub allowed_gids: Vec<u32>,
    /// Sandboxes running at once; further requests wait for a slot.
    pub max_concurrent: usize,
    pub default_zygote: String,
    #[serde(rename = "zygote")]
    pub zygotes: Vec<ZygoteSection>,
    /// Path of `libforkd_zygote.so`; default: next to the executable.
    pub zygote_library: Option<PathBuf>,
    pub limits: LimitsSection,
    pub cgroup: forkd_cgroup::Config,
    /// Extra policies: name → TOML file. `default` is built in unless overridden.
    pub policies: BTreeMap<String, PathBuf>,
    pub default_policy: String,
    pub hostname: String,
    /// How long shutdown waits for killed sandboxes to be reported.
    pub shutdown_grace_ms: u64,
    /// Limit on one client frame's size, bytes (at most the protocol's 16 MiB).
    #[serde(deserialize_with = "crate::size::deserialize_usize")]
    pub max_frame_bytes: usize,
    /// Network namespaces kept made ahead of requests (0: each child makes
    /// its own). Only a root daemon can make them.
    pub netns_stock: usize,
    /// A root daemon runs each sandbox as its own uid (= gid) from
    /// `sandbox_uid_base .. +sandbox_uid_count`; no host account may use them.
    pub sandbox_uid_base: u32,
    pub sandbox_uid_count: u32,
    /// Once a client frame has begun, the rest must arrive within this many
    /// milliseconds or the connection is closed (slow or stalled clients).
    pub frame_timeout_ms: u64,
    /// Log line format on stderr: `text` (default) or `json` (one object per line).
    pub log_format: LogFormat,
    /// Serve Prometheus metrics (`GET /metrics`) here: `host:port` (loopback
    /// only unless `metrics_allow_remote`) or an absolute Unix socket path.
    /// Unset: no listener.
    pub metrics_listen: Option<String>,
    /// Allow `metrics_listen` on a non-loopback address. The endpoint has no
    /// authentication or TLS and tells anyone who can reach it the zygote
    /// names, load and error rates.
    pub metrics_allow_remote: bool,
    /// Append one JSON line per request here (created 0640 if missing).
    pub audit_log: Option<PathBuf>,
    /// Also record each request's code, argv, env, stdin and output, and error
    /// messages, in the audit log. Off by default: those are the users' data.
    pub audit_payloads: bool,
    /// Workspaces requests may mount by name (docs/workspaces.md).
    pub workspaces: BTreeMap<String, NamedWorkspace>,
    /// Ad-hoc workspace paths are allowed only beneath these (default: none).
    pub workspace_roots: Vec<PathBuf>,
    /// Where a rootless daemon's overlay workspaces keep their upper layers;
    /// default `workspaces/` beside the configured (or default) socket.
    pub workspace_dir: Option<PathBuf>,
    /// Warm children per workspace (docs/workspaces.md, "Warm children").
    pub workspace_warm: WorkspaceWarmSection,
    /// Egress bound and resolver settings (requests with `allow_net`).
    pub network: NetworkSection,
    /// Session lifetimes and bounds.
    pub sessions: SessionsSection,
    /// The E2B-compatible HTTP gateway served from this process.
    pub http: HttpSection,
}

/// `[http]`: the E2B gateway (`docs/e2b.md`) served by the daemon process
/// when `listen` is set (`--http ADDR` overrides it; `forkd-gateway` runs
/// the same gateway alone).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Address to serve on; unset: no gateway.
    pub listen: Option<std::net::SocketAddr>,
    /// `KEY [TENANT]` per line, reloaded on SIGHUP; unset: any key is one tenant.
    pub api_keys: Option<PathBuf>,
    /// May `listen` be a non-loopback address.
    pub allow_remote: bool,
    /// Most sandboxes (with their code contexts) one tenant may hold.
    pub max_sessions_per_tenant: Option<usize>,
    /// Most cells one tenant may run at once.
    pub max_cells_per_tenant: Option<usize>,
    /// Most checkpoints one tenant may hold at once.
    pub max_checkpoints_per_tenant: Option<usize>,
    /// Seconds a client may take to send a request head (default 30).
    pub header_timeout_secs: Option<u64>,
    /// This node's name in the sandbox ids handed out (default: host name).
    pub node: Option<String>,
    /// Other nodes' gateways, `NAME = "http://HOST:PORT"` (docs/e2b.md).
    pub peers: std::collections::BTreeMap<String, String>,
    /// Address of a node not in `peers`, with `{node}` in it.
    pub peer_url: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl MetricsListen {
    /// Parses `host:port` or an absolute socket path; refuses a non-loopback
    /// address unless `allow_remote`.
    pub fn parse(text: &str, allow_remote: bool) -> Result<MetricsListen, ConfigError> {
        if text.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(text)));
        }
        let addr: std::net::SocketAddr = text.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "metrics_listen `{text}` is neither an IP:port (e.g. 127.0.0.1:9464) nor an absolute Unix socket path"
            ))
        })?;
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(ConfigError::Invalid(format!(
                "metrics_listen `{text}` is not a loopback address: the metrics endpoint has no authentication or TLS; listen on 127.0.0.1 or a Unix socket and scrape through a proxy, or set metrics_allow_remote = true"
            )));
        }
        Ok(MetricsListen::Tcp(addr))
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            allowed_uids: None,
            allowed_gids: Vec::new(),
            max_concurrent: 256,
            default_zygote: "default".into(),
            zygotes: Vec::new(),
            zygote_library: None,
            limits: LimitsSection::default(),
            cgroup: forkd_cgroup::Config::default(),
            policies: BTreeMap::new(),
            default_policy: "default".into(),
            hostname: "sandbox".into(),
            shutdown_grace_ms: 5000,
            max_frame_bytes: forkd_ipc::MAX_FRAME_BYTES,
            netns_stock: 32,
            sandbox_uid_base: forkd_pool::uids::DEFAULT_BASE,
            sandbox_uid_count: forkd_pool::uids::DEFAULT_COUNT,
            frame_timeout_ms: 30_000,
            log_format: LogFormat::Text,
            metrics_listen: None,
            metrics_allow_remote: false,
            audit_log: None,
            audit_payloads: false,
            workspaces: BTreeMap::new(),
            workspace_roots: Vec::new(),
            workspace_dir: None,
            workspace_warm: WorkspaceWarmSection::default(),
            network: NetworkSection::default(),
            sessions: SessionsSection::default(),
            http: HttpSection::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZygoteSection {
    pub name: String,
    /// Interpreter (absolute, or looked up on PATH). A venv's `bin/python`
    /// runs the zygote in that venv.
    pub python: PathBuf,
    pub preload: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Replace the zygote after this many forks (bounds how many sandboxes
    /// share one ASLR layout and str hash secret).
    pub max_forks: Option<u64>,
    /// Replace the zygote after this many seconds.
    pub max_age_secs: Option<u64>,
    pub start_timeout_secs: u64,
    /// Children kept forked and isolated ahead of requests (0: none). They
    /// use the default limits and policy; a request needing another scratch
    /// size, rlimit or policy is forked on demand, other cgroup limits are
    /// applied to the warm child before the hand-off.
    pub warm_pool: usize,
    /// Bounds of an adaptive pool: a request finding the pool empty doubles
    /// its size up to `warm_pool_max`; a `warm_shrink_after_secs` window
    /// with unused parked children halves that headroom, down to
    /// `warm_pool_min`. Both default to `warm_pool` (a fixed size).
    pub warm_pool_min: Option<usize>,
    pub warm_pool_max: Option<usize>,
    pub warm_shrink_after_secs: u64,
    /// Warm children prepared at once while refilling.
    pub warm_refill_concurrency: usize,
    /// Warm children parked longer than this many seconds are replaced
    /// (unset: kept until used).
    pub warm_max_idle_secs: Option<u64>,
    /// This zygote's own bound on `allow_net`, replacing `[network] allow`
    /// for its requests (e.g. only the package index for an untrusted
    /// tenant's zygote); unset: `[network] allow`.
    pub network_allow: Option<Vec<String>>,
    /// Networks closed to this zygote's requests on top of `[network] deny`.
    pub network_deny: Vec<String>,
}

impl ZygoteSection {
    /// `(warm_pool_min, warm_pool_max)`, each defaulting to `warm_pool`.
    pub fn warm_pool_bounds(&self) -> (usize, usize) {
        (
            self.warm_pool_min.unwrap_or(self.warm_pool),
            self.warm_pool_max.unwrap_or(self.warm_pool),
        )
    }
}

impl Default for ZygoteSection {
    fn default() -> Self {
        ZygoteSection {
            name: DEFAULT_ZYGOTE_NAME.into(),
            python: PathBuf::from("python3"),
            preload: vec!["numpy".into()],
            env: BTreeMap::new(),
            max_forks: Some(10_000),
            max_age_secs: Some(3600),
            start_timeout_secs: 60,
            warm_pool: 16,
            warm_pool_min: None,
            warm_pool_max: None,
            warm_shrink_after_secs: 60,
            warm_refill_concurrency: 2,
            warm_max_idle_secs: Some(600),
            network_allow: None,
            network_deny: Vec::new(),
        }
    }
}

/// `[limits.default]` and `[limits.max]`: a section that sets some keys
/// keeps the built-in values for the others; byte sizes may be written
/// `"512M"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawLimits")]
pub struct LimitsSection {
    /// Applied when a request leaves a limit unset.
    pub default: LimitValues,
    /// The most a request may ask for.
    pub max: LimitValues,
    /// `[limits.io]`: block I/O limits every sandbox gets.
    pub io: IoLimits,
}

/// `[limits.io]`: per-sandbox block I/O limits on the devices backing the
/// bound trees (v1 `blkio` throttle, v2 `io.max`). Unset (the default): not
/// throttled, and no extra cgroup work per sandbox. Reads from the page
/// cache are never throttled; only I/O that reaches the disk is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoLimits {
    /// Bytes read per second (`"10M"`).
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    pub read_bps: Option<u64>,
    /// Bytes written per second.
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    pub write_bps: Option<u64>,
    /// Read operations per second.
    pub read_iops: Option<u64>,
    /// Write operations per second.
    pub write_iops: Option<u64>,
    /// More paths (or block device nodes) whose devices are throttled,
    /// beside those backing the policies' read-only trees, `/etc`, each
    /// zygote's interpreter and its `PYTHONPATH`.
    pub paths: Vec<PathBuf>,
}

impl IoLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        [
            self.read_bps,
            self.write_bps,
            self.read_iops,
            self.write_iops,
        ]
        .iter()
        .any(Option::is_some)
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            default: LimitValues {
                timeout_ms: 30_000,
                timeout_grace_ms: 200,
                memory_bytes: 512 * MIB,
                cpus: 1.0,
                pids: 64,
                output_bytes: MIB,
                scratch_bytes: 64 * MIB,
                open_files: 256,
                file_size_bytes: 64 * MIB,
            },
            max: LimitValues {
                timeout_ms: 600_000,
                timeout_grace_ms: 10_000,
                memory_bytes: 8192 * MIB,
                cpus: 64.0,
                pids: 4096,
                output_bytes: 64 * MIB,
                scratch_bytes: 1024 * MIB,
                open_files: 4096,
                file_size_bytes: 1024 * MIB,
            },
            io: IoLimits::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table: [limits.default] or [limits.max]"
)]
struct RawLimits {
    default: PartialLimits,
    max: PartialLimits,
    io: IoLimits,
}

/// One limits table as written: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PartialLimits {
    timeout_ms: Option<u64>,
    timeout_grace_ms: Option<u64>,
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    memory_bytes: Option<u64>,
    cpus: Option<f64>,
    pids: Option<u64>,
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    output_bytes: Option<u64>,
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    scratch_bytes: Option<u64>,
    open_files: Option<u64>,
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    file_size_bytes: Option<u64>,
}

impl PartialLimits {
    fn over(self, base: LimitValues) -> LimitValues {
        LimitValues {
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
            timeout_grace_ms: self.timeout_grace_ms.unwrap_or(base.timeout_grace_ms),
            memory_bytes: self.memory_bytes.unwrap_or(base.memory_bytes),
            cpus: self.cpus.unwrap_or(base.cpus),
            pids: self.pids.unwrap_or(base.pids),
            output_bytes: self.output_bytes.unwrap_or(base.output_bytes),
            scratch_bytes: self.scratch_bytes.unwrap_or(base.scratch_bytes),
            open_files: self.open_files.unwrap_or(base.open_files),
            file_size_bytes: self.file_size_bytes.unwrap_or(base.file_size_bytes),
        }
    }
}

impl From<RawLimits> for LimitsSection {
    fn from(raw: RawLimits) -> Self {
        let base = LimitsSection::default();
        LimitsSection {
            default: raw.default.over(base.default),
            max: raw.max.over(base.max),
            io: raw.io,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitValues {
    pub timeout_ms: u64,
    /// On a timeout: SIGTERM, this long for the program to end (flushing
    /// its output), then SIGKILL; 0 kills at once. Only `[limits.default]`'s
    /// is used (a request cannot set it).
    pub timeout_grace_ms: u64,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub pids: u64,
    pub output_bytes: u64,
    pub scratch_bytes: u64,
    pub open_files: u64,
    pub file_size_bytes: u64,
}

impl LimitValues {
    /// These values as the limits a result reports.
    pub fn applied(&self, cgroup_enforced: bool) -> AppliedLimits {
        AppliedLimits {
            timeout_ms: self.timeout_ms,
            memory_bytes: self.memory_bytes,
            cpus: self.cpus,
            pids: self.pids,
            output_bytes: self.output_bytes,
            scratch_bytes: self.scratch_bytes,
            open_files: self.open_files,
            file_size_bytes: self.file_size_bytes,
            cgroup_enforced,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The zygotes, with the built-in default when none is configured.
    pub fn zygote_sections(&self) -> Vec<ZygoteSection> {
        if self.zygotes.is_empty() {
            vec![ZygoteSection::default()]
        } else {
            self.zygotes.clone()
        }
    }

    /// Whether `name` is a configured zygote (without cloning the sections).
    pub fn has_zygote(&self, name: &str) -> bool {
        if self.zygotes.is_empty() {
            name == DEFAULT_ZYGOTE_NAME
        } else {
            self.zygotes.iter().any(|z| z.name == name)
        }
    }

    /// Sandbox ids this configuration needs: every running and every warm
    /// child holds one; twice that leaves room for children of a recycled
    /// zygote that are still ending.
    pub fn sandbox_ids_needed(&self) -> u64 {
        let holders = self.max_concurrent as u64
            + self
                .zygote_sections()
                .iter()
                .map(|z| z.warm_pool_bounds().1 as u64)
                .sum::<u64>()
            + (self.workspace_warm.per_key as u64)
                .saturating_mul(self.workspace_warm.max_keys as u64);
        2 * holders
    }

    /// Checks cross-field rules that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_workspaces(self)?;
        let zygotes = self.zygote_sections();
        let mut names = std::collections::BTreeSet::new();
        for z in &zygotes {
            if z.name.is_empty() || !names.insert(z.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "zygote names must be non-empty and unique (`{}`)",
                    z.name
                )));
            }
            let (min, max) = z.warm_pool_bounds();
            if !(min <= z.warm_pool && z.warm_pool <= max) {
                return Err(ConfigError::Invalid(format!(
                    "zygote `{}`: warm_pool_min ({min}) <= warm_pool ({}) <= warm_pool_max ({max}) must hold",
                    z.name, z.warm_pool
                )));
            }
            if z.warm_shrink_after_secs == 0 {
                return Err(ConfigError::Invalid(format!(
                    "zygote `{}`: warm_shrink_after_secs must be at least 1",
                    z.name
                )));
            }
        }
        if !names.contains(&self.default_zygote) {
            return Err(ConfigError::Invalid(format!(
                "default_zygote `{}` is not one of the configured zygotes {names:?}",
                self.default_zygote
            )));
        }
        let (d, m) = (&self.limits.default, &self.limits.max);
        let pairs = [
            ("timeout_ms", d.timeout_ms as f64, m.timeout_ms as f64),
            ("memory_bytes", d.memory_bytes as f64, m.memory_bytes as f64),
            ("cpus", d.cpus, m.cpus),
            ("pids", d.pids as f64, m.pids as f64),
            ("output_bytes", d.output_bytes as f64, m.output_bytes as f64),
            (
                "scratch_bytes",
                d.scratch_bytes as f64,
                m.scratch_bytes as f64,
            ),
            ("open_files", d.open_files as f64, m.open_files as f64),
            (
                "file_size_bytes",
                d.file_size_bytes as f64,
                m.file_size_bytes as f64,
            ),
        ];
        if d.timeout_grace_ms > m.timeout_grace_ms {
            return Err(ConfigError::Invalid(format!(
                "limits.default.timeout_grace_ms ({}) must be at most limits.max.timeout_grace_ms ({}); 0 kills at once on a timeout",
                d.timeout_grace_ms, m.timeout_grace_ms
            )));
        }
        for (name, default, max) in pairs {
            if !(default.is_finite() && default > 0.0 && default <= max) {
                return Err(ConfigError::Invalid(format!(
                    "limits.default.{name} ({default}) must be positive and at most limits.max.{name} ({max})"
                )));
            }
        }
        let io = &self.limits.io;
        for (name, v) in [
            ("read_bps", io.read_bps),
            ("write_bps", io.write_bps),
            ("read_iops", io.read_iops),
            ("write_iops", io.write_iops),
        ] {
            if v == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "limits.io.{name} = 0 would stop all disk I/O; set a positive rate or remove the key (unset: not throttled)"
                )));
            }
        }
        if self.max_frame_bytes == 0 || self.max_frame_bytes > forkd_ipc::MAX_FRAME_BYTES {
            return Err(ConfigError::Invalid(format!(
                "max_frame_bytes must be between 1 and {}",
                forkd_ipc::MAX_FRAME_BYTES
            )));
        }
        if self.frame_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "frame_timeout_ms must be at least 1".into(),
            ));
        }
        if self.max_concurrent == 0 {
            return Err(ConfigError::Invalid(
                "max_concurrent must be at least 1".into(),
            ));
        }
        if self.sessions.max_requests_per_connection == 0 {
            return Err(ConfigError::Invalid(
                "[sessions] max_requests_per_connection must be at least 1".into(),
            ));
        }
        forkd_pool::uids::UidRange::new(self.sandbox_uid_base, self.sandbox_uid_count)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let needed = self.sandbox_ids_needed();
        if u64::from(self.sandbox_uid_count) < needed {
            return Err(ConfigError::Invalid(format!(
                "sandbox_uid_count {} is too small: max_concurrent plus the warm pools (workspace_warm included) hold {} ids at once; give at least {needed}",
                self.sandbox_uid_count,
                needed / 2
            )));
        }
        self.metrics()?;
        self.network.validate()?;
        for z in &self.zygotes {
            self.network.bound_for(z)?;
        }
        if let Some(path) = &self.audit_log {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "audit_log `{}` must be an absolute path",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// The metrics listener, if one is configured.
    pub fn metrics(&self) -> Result<Option<MetricsListen>, ConfigError> {
        self.metrics_listen
            .as_deref()
            .map(|t| MetricsListen::parse(t, self.metrics_allow_remote))
            .transpose()
    }

    /// Loads the policy set: the built-in `default` plus configured files.
    pub fn load_policies(&self) -> Result<BTreeMap<String, forkd_zygote::Policy>, ConfigError> {
        let mut set = BTreeMap::new();
        set.insert(
            "default".to_string(),
            forkd_zygote::Policy::default_policy(),
        );
        for (name, path) in &self.policies {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Policy {
                name: name.clone(),
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let policy =
                forkd_zygote::Policy::from_toml(&text).map_err(|e| ConfigError::Policy {
                    name: name.clone(),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            set.insert(name.clone(), policy);
        }
        if !set.contains_key(&self.default_policy) {
            return Err(ConfigError::Invalid(format!(
                "default_policy `{}` is not defined",
                self.default_policy
            )));
        }
        Ok(set)
    }
}

/// Command-line overrides for the default zygote (`--python`, `--preload`).
pub fn apply_overrides(config: &mut Config, python: Option<PathBuf>, preload: Option<Vec<String>>) {
    if python.is_none() && preload.is_none() {
        return;
    }
    if config.zygotes.is_empty() {
        config.zygotes.push(ZygoteSection::default());
    }
    let default = config.default_zygote.clone();
    if let Some(z) = config.zygotes.iter_mut().find(|z| z.name == default) {
        if let Some(p) = python {
            z.python = p;
        }
        if let Some(p) = preload {
            z.preload = p.into_iter().filter(|m| !m.is_empty()).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_grace_is_a_partial_limit_bounded_by_its_max() {
        let c = Config::from_toml("[limits.default]\ntimeout_grace_ms = 0\n").unwrap();
        assert_eq!(c.limits.default.timeout_grace_ms, 0);
        assert_eq!(c.limits.default.timeout_ms, 30_000);
        assert_eq!(Config::default().limits.default.timeout_grace_ms, 200);
        let e = Config::from_toml("[limits.default]\ntimeout_grace_ms = 20000\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: limits.default.timeout_grace_ms (20000) must be at most limits.max.timeout_grace_ms (10000); 0 kills at once on a timeout"
        );
    }
    use crate::admission::{Admission, Resolved};
    use forkd_ipc::{ErrorCode, ErrorReply, InlineFile, Limits, Program, SpawnRequest};

    fn resolve(
        c: &Config,
        r: &SpawnRequest,
        p: &BTreeMap<String, forkd_zygote::Policy>,
        enforced: bool,
    ) -> Result<Resolved, ErrorReply> {
        Admission::new(c, p, enforced).resolve(r)
    }

    fn policies() -> BTreeMap<String, forkd_zygote::Policy> {
        Config::default().load_policies().unwrap()
    }

    fn req() -> SpawnRequest {
        SpawnRequest {
            program: Program::Code("print(1)".into()),
            ..SpawnRequest::default()
        }
    }

    #[test]
    fn the_http_section_configures_the_gateway() {
        let c = Config::from_toml(
            "[http]\nlisten = \"127.0.0.1:3000\"\napi_keys = \"/etc/forkd/keys\"\nmax_cells_per_tenant = 4\n",
        )
        .unwrap();
        assert_eq!(c.http.listen, Some("127.0.0.1:3000".parse().unwrap()));
        assert_eq!(c.http.api_keys, Some(PathBuf::from("/etc/forkd/keys")));
        assert_eq!(c.http.max_cells_per_tenant, Some(4));
        assert!(!c.http.allow_remote);
        assert!(Config::from_toml("[http]\nlisten = \"nowhere\"\n").is_err());
        assert!(Config::from_toml("[http]\nlisen = \"127.0.0.1:1\"\n").is_err());
        assert_eq!(Config::default().http.listen, None);
        let c = Config::from_toml(
            "[http]\nnode = \"node-a\"\npeer_url = \"http://{node}.p:3000\"\n[http.peers]\nnode-b = \"http://10.0.0.2:3000\"\n",
        )
        .unwrap();
        assert_eq!(c.http.node.as_deref(), Some("node-a"));
        assert_eq!(c.http.peers["node-b"], "http://10.0.0.2:3000");
        assert_eq!(c.http.peer_url.as_deref(), Some("http://{node}.p:3000"));
    }

    #[test]
    fn a_zygote_network_bound_is_checked_with_the_config() {
        let bad = Config::from_toml(
            "default_zygote = \"narrow\"\n[[zygote]]\nname = \"narrow\"\nnetwork_allow = [\"pkg..test:443\"]\n",
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("zygote `narrow` network_allow"), "{e}");
        let good = Config::from_toml(
            "[[zygote]]\nname = \"narrow\"\nnetwork_deny = [\"198.18.0.0/15\"]\n",
        )
        .unwrap();
        let bound = good.network.bound_for(&good.zygotes[0]).unwrap().unwrap();
        let e = bound
            .admit(&["198.18.0.1:80".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zygote `narrow`") && e.contains("198.18.0.0/15"),
            "{e}"
        );
        assert!(good
            .network
            .bound_for(&ZygoteSection::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn io_limits_take_sizes_and_refuse_zero() {
        let c = Config::from_toml("[limits.io]\nread_bps = \"10M\"\nwrite_iops = 200\n").unwrap();
        assert_eq!(c.limits.io.read_bps, Some(10 * MIB));
        assert_eq!(c.limits.io.write_iops, Some(200));
        assert_eq!((c.limits.io.write_bps, c.limits.io.read_iops), (None, None));
        assert!(c.limits.io.any());
        assert!(!Config::from_toml("").unwrap().limits.io.any());
        let e = Config::from_toml("[limits.io]\nread_iops = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("limits.io.read_iops"), "{e}");
        assert!(Config::from_toml("[limits.io]\nread_bsp = 1\n").is_err());
    }

    #[test]
    fn a_partial_limits_section_keeps_the_other_defaults_and_takes_sizes() {
        let c = Config::from_toml(
            "[limits.default]\nmemory_bytes = \"256M\"\n[limits.max]\nscratch_bytes = \"2G\"\ntimeout_ms = 900000\n",
        )
        .expect("a partial section parses");
        c.validate().expect("and validates");
        let (d, m, base) = (c.limits.default, c.limits.max, LimitsSection::default());
        assert_eq!(d.memory_bytes, 256 * MIB);
        assert_eq!(d.pids, base.default.pids, "unset keys keep the defaults");
        assert_eq!(m.scratch_bytes, 2048 * MIB);
        assert_eq!(m.timeout_ms, 900_000);
        assert_eq!(
            m.memory_bytes, base.max.memory_bytes,
            "max keeps max's own defaults"
        );
        let e = Config::from_toml("[limits.default]\nmemory_bytes = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("512M"), "{e}");
        assert!(Config::from_toml("[limits.default]\nmemroy_bytes = 1\n").is_err());
    }

    #[test]
    fn empty_config_is_valid_and_defaults_apply() {
        let c = Config::from_toml("").unwrap();
        c.validate().unwrap();
        let r = resolve(&c, &req(), &policies(), true).unwrap();
        assert_eq!(r.zygote, "default");
        assert_eq!(r.policy, "default");
        assert_eq!(r.limits.memory_bytes, 512 * MIB);
        assert_eq!(r.limits.timeout_ms, 30_000);
        assert!(r.limits.cgroup_enforced);
    }

    #[test]
    fn limits_above_max_are_refused_not_clamped() {
        let c = Config::default();
        let mut r = req();
        r.limits = Limits {
            memory_bytes: Some(c.limits.max.memory_bytes + 1),
            ..Limits::default()
        };
        let e = resolve(&c, &r, &policies(), true).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitExceedsPolicy);
        assert!(e.message.contains("memory_bytes"), "{}", e.message);
        r.limits = Limits {
            pids: Some(5000),
            ..Limits::default()
        };
        assert_eq!(
            resolve(&c, &r, &policies(), true).unwrap_err().code,
            ErrorCode::LimitExceedsPolicy
        );
        r.limits = Limits::default();
        r.timeout_ms = Some(c.limits.max.timeout_ms + 1);
        assert_eq!(
            resolve(&c, &r, &policies(), true).unwrap_err().code,
            ErrorCode::LimitExceedsPolicy
        );
    }

    #[test]
    fn nonsense_limits_are_invalid() {
        let c = Config::default();
        for limits in [
            Limits {
                cpus: Some(f64::NAN),
                ..Limits::default()
            },
            Limits {
                cpus: Some(0.0),
                ..Limits::default()
            },
            Limits {
                pids: Some(0),
                ..Limits::default()
            },
            Limits {
                memory_bytes: Some(1024),
                ..Limits::default()
            },
        ] {
            let r = SpawnRequest { limits, ..req() };
            assert_eq!(
                resolve(&c, &r, &policies(), true).unwrap_err().code,
                ErrorCode::InvalidRequest
            );
        }
        let r = SpawnRequest {
            timeout_ms: Some(0),
            ..req()
        };
        assert_eq!(
            resolve(&c, &r, &policies(), true).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn requested_limits_within_max_are_kept() {
        let c = Config::default();
        let r = SpawnRequest {
            limits: Limits {
                memory_bytes: Some(64 * MIB),
                cpus: Some(0.5),
                pids: Some(8),
                ..Limits::default()
            },
            timeout_ms: Some(1500),
            ..req()
        };
        let got = resolve(&c, &r, &policies(), false).unwrap().limits;
        assert_eq!(
            (got.memory_bytes, got.cpus, got.pids, got.timeout_ms),
            (64 * MIB, 0.5, 8, 1500)
        );
        assert!(!got.cgroup_enforced);
    }

    #[test]
    fn file_paths_must_stay_in_scratch() {
        let c = Config::default();
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "./a", "a/./b"] {
            let r = SpawnRequest {
                files: vec![InlineFile {
                    path: bad.into(),
                    content: vec![],
                    mode: None,
                }],
                ..req()
            };
            let e = resolve(&c, &r, &policies(), true).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad:?} accepted");
        }
        let ok = SpawnRequest {
            files: vec![InlineFile {
                path: "pkg/mod.py".into(),
                content: b"x=1".to_vec(),
                mode: Some(0o600),
            }],
            ..req()
        };
        resolve(&c, &ok, &policies(), true).unwrap();
        let setuid = SpawnRequest {
            files: vec![InlineFile {
                path: "a".into(),
                content: vec![],
                mode: Some(0o4755),
            }],
            ..req()
        };
        assert_eq!(
            resolve(&c, &setuid, &policies(), true).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn unknown_zygote_and_policy_are_named() {
        let c = Config::default();
        let r = SpawnRequest {
            zygote: Some("nope".into()),
            ..req()
        };
        let e = resolve(&c, &r, &policies(), true).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownZygote);
        assert!(e.message.contains("nope") && e.message.contains("default"));
        let r = SpawnRequest {
            policy: Some("lax".into()),
            ..req()
        };
        assert_eq!(
            resolve(&c, &r, &policies(), true).unwrap_err().code,
            ErrorCode::UnknownPolicy
        );
    }

    #[test]
    fn config_rejects_unknown_keys_and_bad_defaults() {
        assert!(Config::from_toml("sockett = '/x'").is_err());
        let c = Config::from_toml("[limits.default]\ntimeout_ms = 1\nmemory_bytes = 99999999999999\ncpus = 1.0\npids = 1\noutput_bytes = 1\nscratch_bytes = 4096\nopen_files = 16\nfile_size_bytes = 1\n").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("default_zygote = 'x'").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn metrics_listener_is_loopback_unless_allowed() {
        assert_eq!(
            MetricsListen::parse("127.0.0.1:9464", false).unwrap(),
            MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert!(MetricsListen::parse("[::1]:9464", false).is_ok());
        assert_eq!(
            MetricsListen::parse("/run/forkd/metrics.sock", false).unwrap(),
            MetricsListen::Unix("/run/forkd/metrics.sock".into())
        );
        let e = MetricsListen::parse("0.0.0.0:9464", false).unwrap_err();
        assert!(e.to_string().contains("metrics_allow_remote"), "{e}");
        assert!(MetricsListen::parse("0.0.0.0:9464", true).is_ok());
        assert!(MetricsListen::parse("localhost:9464", false).is_err());
        assert!(MetricsListen::parse("metrics.sock", false).is_err());
        let c = Config::from_toml("metrics_listen = '10.0.0.1:1'").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("audit_log = 'audit.jsonl'").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("log_format = 'json'\naudit_log = '/var/log/forkd/audit.jsonl'")
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn env_with_nul_or_equals_is_refused() {
        let c = Config::default();
        let mut r = req();
        r.env.insert("A=B".into(), "1".into());
        assert_eq!(
            resolve(&c, &r, &policies(), true).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn sandbox_uid_range_is_checked() {
        Config::default().validate().unwrap();
        let c = Config::from_toml("sandbox_uid_base = 0").unwrap();
        assert!(c.validate().is_err());
        let c =
            Config::from_toml("sandbox_uid_base = 4294967290\nsandbox_uid_count = 100").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml("max_concurrent = 256\nsandbox_uid_count = 100").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("sandbox_uid_count"), "{e}");
    }

    #[test]
    fn workspace_warm_is_bounded() {
        let c = Config::from_toml("[workspace_warm]\nper_key = 0").unwrap();
        c.validate().unwrap();
        for bad in ["per_key = 17", "per_key = 8\nmax_keys = 9"] {
            let c = Config::from_toml(&format!("[workspace_warm]\n{bad}")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("workspace_warm"), "{e}");
        }
        assert!(Config::from_toml("[workspace_warm]\nper_keys = 1").is_err());
    }
}

// --- sections of the configuration that other modules interpret ---

/// `[sessions]`: how many sessions may live at once and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsSection {
    /// Most sessions alive at once (all peers together).
    pub max: usize,
    /// Most sessions one peer uid may hold at once.
    pub max_per_uid: usize,
    /// Lifetime of a session that asks for none, milliseconds.
    pub default_ttl_ms: u64,
    /// Longest lifetime a request may ask for, milliseconds.
    pub max_ttl_ms: u64,
    /// Idle timeout of a session that asks for none (`None`: none).
    pub default_idle_timeout_ms: Option<u64>,
    /// How long an interrupted cell may take to stop before its interpreter
    /// is replaced (losing its state), milliseconds.
    pub interrupt_grace_ms: u64,
    /// Ended sessions remembered for `session_info` (why they ended).
    pub remember_ended: usize,
    /// Session requests one connection may have in flight; more are
    /// answered `busy` (a bound on what one client can make the daemon hold).
    pub max_requests_per_connection: usize,
    /// Most checkpoints one session may keep at once.
    pub max_checkpoints_per_session: usize,
    /// Most checkpoints one peer uid may keep at once, over all its sessions.
    pub max_checkpoints_per_uid: usize,
    /// Branch shells kept ready for a session that branched (as many as its
    /// last request asked, at most this many; 0: none). Each holds an
    /// executor (~2 MB) and a uid until used or the session ends.
    pub spare_branches: usize,
    /// How long checkpoints taken with `keep` outlive their session's end
    /// (then they and what is left of the session go), seconds.
    pub kept_checkpoint_ttl_secs: u64,
}

impl Default for SessionsSection {
    fn default() -> SessionsSection {
        SessionsSection {
            max: 1024,
            max_per_uid: 1024,
            default_ttl_ms: 300_000,
            max_ttl_ms: 86_400_000,
            default_idle_timeout_ms: None,
            interrupt_grace_ms: 2_000,
            remember_ended: 1024,
            max_requests_per_connection: 1024,
            max_checkpoints_per_session: 16,
            max_checkpoints_per_uid: 64,
            spare_branches: 16,
            kept_checkpoint_ttl_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    /// Specs requests may ask for (a request's entry must lie inside one);
    /// default `["*"]`: any destination outside `deny`.
    pub allow: Vec<String>,
    /// Networks no request reaches; default link-local, cloud metadata,
    /// loopback, multicast ([`forkd_net::bound::DEFAULT_DENY`]).
    pub deny: Vec<String>,
    /// Whether a request may ask for `*`, `0.0.0.0/0` or `::/0` (still
    /// bounded by `deny`).
    pub allow_wildcards: bool,
    /// Most `allow_net` entries per request.
    pub max_rules: usize,
    /// Most distinct ports per request (one listener each in the sandbox).
    pub max_ports: usize,
    /// Resolvers the sandbox resolver asks (`IP` or `IP:PORT`); default the
    /// host's /etc/resolv.conf.
    pub resolvers: Option<Vec<String>>,
    /// Longest wait for a destination to accept a proxied connection.
    pub connect_timeout_ms: u64,
    /// Most proxied connections open at once per sandbox; more are reset.
    pub max_connections: usize,
    /// Bytes per second one sandbox's connections may move in each
    /// direction (`"10M"` accepted); unset: unlimited.
    #[serde(deserialize_with = "crate::size::deserialize_opt")]
    pub bandwidth: Option<u64>,
}

impl Default for NetworkSection {
    fn default() -> NetworkSection {
        let d = forkd_net::Config::default();
        NetworkSection {
            allow: vec!["*".into()],
            deny: forkd_net::bound::DEFAULT_DENY
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow_wildcards: false,
            max_rules: forkd_net::bound::DEFAULT_MAX_RULES,
            max_ports: d.max_ports,
            resolvers: None,
            connect_timeout_ms: u64::try_from(d.connect_timeout.as_millis()).unwrap_or(u64::MAX),
            max_connections: d.max_connections,
            bandwidth: None,
        }
    }
}

impl NetworkSection {
    pub fn bound(&self) -> Result<Bound, ConfigError> {
        Bound::new(
            &self.allow,
            &self.deny,
            self.allow_wildcards,
            self.max_rules,
        )
        .map_err(|e| ConfigError::Invalid(format!("[network]: {e}")))
    }

    /// The bound of zygote `z`'s requests when it narrows `[network]`
    /// (`None`: the `[network]` bound applies as it is).
    pub fn bound_for(&self, z: &ZygoteSection) -> Result<Option<Bound>, ConfigError> {
        if z.network_allow.is_none() && z.network_deny.is_empty() {
            return Ok(None);
        }
        let allow = z.network_allow.as_ref().unwrap_or(&self.allow);
        let deny: Vec<String> = self.deny.iter().chain(&z.network_deny).cloned().collect();
        Bound::new(allow, &deny, self.allow_wildcards, self.max_rules)
            .map(|b| b.named(format!("zygote `{}` network_allow/network_deny", z.name)))
            .map(Some)
            .map_err(|e| {
                ConfigError::Invalid(format!(
                    "zygote `{}` network_allow/network_deny: {e}",
                    z.name
                ))
            })
    }

    pub fn resolvers(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        let Some(list) = &self.resolvers else {
            return Ok(forkd_net::egress::system_resolvers());
        };
        list.iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        ConfigError::Invalid(format!(
                            "[network] resolvers: `{s}` is not IP or IP:PORT"
                        ))
                    })
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.bound()?;
        self.resolvers()?;
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "[network] max_connections must be at least 1".into(),
            ));
        }
        if self.bandwidth == Some(0) {
            return Err(ConfigError::Invalid(
                "[network] bandwidth must be at least 1 byte per second; leave it out for no limit"
                    .into(),
            ));
        }
        if self.max_ports == 0 || self.max_ports > 1024 {
            return Err(ConfigError::Invalid(
                "[network] max_ports must be in 1-1024".into(),
            ));
        }
        Ok(())
    }
}

/// A workspace the operator registers: `[workspaces.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedWorkspace {
    /// Absolute host path.
    pub path: PathBuf,
    /// `GLOB=MODE` rules; a request's own rules can only narrow them.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Mode of paths no rule matches (default `read`).
    #[serde(default = "default_mode")]
    pub default_mode: String,
    /// uids that may use it; default: every peer allowed to connect.
    #[serde(default)]
    pub allowed_uids: Option<Vec<u32>>,
}

fn default_mode() -> String {
    "read".into()
}

/// Checks the workspace part of a configuration.
fn validate_workspaces(config: &Config) -> Result<(), ConfigError> {
    for (name, ws) in &config.workspaces {
        if !ws.path.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "workspaces.{name}.path `{}` must be absolute",
                ws.path.display()
            )));
        }
        let mode: Mode = ws
            .default_mode
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("workspaces.{name}.default_mode: {e}")))?;
        Rules::parse(&ws.rules, mode)
            .map_err(|e| ConfigError::Invalid(format!("workspaces.{name}.rules: {e}")))?;
    }
    let w = config.workspace_warm;
    if w.per_key > MAX_WARM_PER_KEY
        || w.per_key.saturating_mul(w.max_keys) > MAX_WARM_WORKSPACE_CHILDREN
    {
        return Err(ConfigError::Invalid(format!(
            "workspace_warm: per_key ({}) may be at most {MAX_WARM_PER_KEY} and per_key x max_keys ({}) at most {MAX_WARM_WORKSPACE_CHILDREN}; lower them (each warm child holds a sandbox uid, a cgroup and its mounts)",
            w.per_key, w.max_keys
        )));
    }
    for root in &config.workspace_roots {
        if !root.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "workspace_roots entry `{}` must be absolute",
                root.display()
            )));
        }
    }
    Ok(())
}

/// Most warm children kept for one workspace key.
const MAX_WARM_PER_KEY: usize = 16;
/// Most warm workspace children in all.
const MAX_WARM_WORKSPACE_CHILDREN: usize = 64;

/// `[workspace_warm]`: children kept ready, with the workspace already
/// mounted, for workspace requests seen recently (docs/workspaces.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceWarmSection {
    /// Children kept ready per key (workspace, rules, mode, requester,
    /// zygote, policy and limits); 0 turns warm workspace children off.
    pub per_key: usize,
    /// Most keys kept at once; a new key drops the least recently used.
    pub max_keys: usize,
    /// A key no request used for this long is dropped with its children,
    /// milliseconds.
    pub idle_ms: u64,
}

impl Default for WorkspaceWarmSection {
    fn default() -> Self {
        WorkspaceWarmSection {
            per_key: 2,
            max_keys: 4,
            idle_ms: 60_000,
        }
    }
}
