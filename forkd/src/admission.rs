//! Admission: what a request may ask for, and the defaults it gets.
//!
//! Built once from the validated configuration; every request (and every
//! connecting peer) passes through here before anything is forked. Limits
//! above the configured maximum are refused, never clamped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use forkd_ipc::{AppliedLimits, ErrorCode, ErrorReply, InlineFile, SpawnRequest};

use crate::config::{Config, LimitsSection, MIB};

/// The admission rules, copied out of the configuration.
#[derive(Debug, Clone)]
pub struct Admission {
    zygotes: Vec<String>,
    default_zygote: String,
    policies: BTreeSet<String>,
    default_policy: String,
    limits: LimitsSection,
    cgroup_enforced: bool,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    /// Which host directories requests may mount as workspaces.
    pub workspaces: crate::workspace::Policy,
}

/// A request after validation against the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub zygote: String,
    pub policy: String,
    pub limits: AppliedLimits,
    /// SIGTERM-to-SIGKILL grace on a timeout (`[limits.default] timeout_grace_ms`).
    pub timeout_grace: std::time::Duration,
}

fn invalid(message: String) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::InvalidRequest,
        message,
    }
}

impl Admission {
    /// The admission rules of `config` (already validated) with its loaded
    /// `policies`; `cgroup_enforced`: whether limits are enforced on this host.
    pub fn new(
        config: &Config,
        policies: &BTreeMap<String, forkd_zygote::Policy>,
        cgroup_enforced: bool,
    ) -> Admission {
        let own = crate::sys::euid();
        Admission {
            zygotes: config
                .zygote_sections()
                .into_iter()
                .map(|z| z.name)
                .collect(),
            default_zygote: config.default_zygote.clone(),
            policies: policies.keys().cloned().collect(),
            default_policy: config.default_policy.clone(),
            limits: config.limits.clone(),
            cgroup_enforced,
            allowed_uids: config.allowed_uids.clone().unwrap_or_else(|| vec![own, 0]),
            allowed_gids: config.allowed_gids.clone(),
            workspaces: crate::workspace::Policy::from_config(config),
        }
    }

    /// Whether a peer with these credentials may use the daemon.
    pub fn peer_allowed(&self, uid: u32, gid: u32) -> bool {
        self.allowed_uids.contains(&uid) || self.allowed_gids.contains(&gid)
    }

    /// The configured zygote and policy a request names (defaults filled
    /// in), each `None` when not configured: such text never reaches a
    /// metric label or an audit field as a configured name.
    pub fn configured_names(
        &self,
        zygote: Option<&str>,
        policy: Option<&str>,
    ) -> (Option<String>, Option<String>) {
        let zygote = zygote.unwrap_or(&self.default_zygote);
        let policy = policy.unwrap_or(&self.default_policy);
        (
            self.zygotes
                .iter()
                .any(|z| z == zygote)
                .then(|| zygote.to_owned()),
            self.policies.contains(policy).then(|| policy.to_owned()),
        )
    }

    /// The limits a request gets when it sets none.
    pub fn default_limits(&self) -> AppliedLimits {
        self.limits.default.applied(self.cgroup_enforced)
    }

    /// Validates a request and fills in defaults. Limits above the configured
    /// maximum are refused, never clamped.
    pub fn resolve(&self, req: &SpawnRequest) -> Result<Resolved, ErrorReply> {
        let zygote = req
            .zygote
            .clone()
            .unwrap_or_else(|| self.default_zygote.clone());
        if !self.zygotes.contains(&zygote) {
            return Err(ErrorReply {
                code: ErrorCode::UnknownZygote,
                message: format!(
                    "no zygote named `{zygote}`; configured: {}",
                    self.zygotes.join(", ")
                ),
            });
        }
        let policy = req
            .policy
            .clone()
            .unwrap_or_else(|| self.default_policy.clone());
        if !self.policies.contains(&policy) {
            return Err(ErrorReply {
                code: ErrorCode::UnknownPolicy,
                message: format!(
                    "no policy named `{policy}`; configured: {}",
                    self.policies.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        resolve_limits(req, &self.limits, self.cgroup_enforced).map(|limits| Resolved {
            zygote,
            policy,
            limits,
            timeout_grace: std::time::Duration::from_millis(self.limits.default.timeout_grace_ms),
        })
    }
}

/// The request's limits and payload checked against the configured bounds.
fn resolve_limits(
    req: &SpawnRequest,
    bounds: &LimitsSection,
    cgroup_enforced: bool,
) -> Result<AppliedLimits, ErrorReply> {
    let d = &bounds.default;
    let m = &bounds.max;
    let l = &req.limits;
    let pick_u = |name: &str, asked: Option<u64>, default: u64, max: u64, min: u64| {
        let v = asked.unwrap_or(default);
        if v < min {
            return Err(invalid(format!(
                "limits.{name} = {v} is below the minimum {min}"
            )));
        }
        if v > max {
            return Err(ErrorReply {
                code: ErrorCode::LimitExceedsPolicy,
                message: format!(
                    "limits.{name} = {v} exceeds this daemon's maximum {max}; ask for less or raise limits.max.{name} in the daemon's config"
                ),
            });
        }
        Ok(v)
    };
    let timeout_ms = {
        let v = req.timeout_ms.unwrap_or(d.timeout_ms);
        if v == 0 {
            return Err(invalid("timeout_ms must be at least 1".into()));
        }
        pick_u("timeout_ms", Some(v), d.timeout_ms, m.timeout_ms, 1)?
    };
    let cpus = l.cpus.unwrap_or(d.cpus);
    if !cpus.is_finite() || cpus < 0.01 {
        return Err(invalid(format!(
            "limits.cpus = {cpus} must be a number of at least 0.01"
        )));
    }
    if cpus > m.cpus {
        return Err(ErrorReply {
            code: ErrorCode::LimitExceedsPolicy,
            message: format!(
                "limits.cpus = {cpus} exceeds this daemon's maximum {}; ask for less or raise limits.max.cpus",
                m.cpus
            ),
        });
    }
    let limits = AppliedLimits {
        timeout_ms,
        memory_bytes: pick_u(
            "memory_bytes",
            l.memory_bytes,
            d.memory_bytes,
            m.memory_bytes,
            8 * MIB,
        )?,
        cpus,
        pids: pick_u("pids", l.pids, d.pids, m.pids, 1)?,
        output_bytes: pick_u(
            "output_bytes",
            l.output_bytes,
            d.output_bytes,
            m.output_bytes,
            1,
        )?,
        scratch_bytes: pick_u(
            "scratch_bytes",
            l.scratch_bytes,
            d.scratch_bytes,
            m.scratch_bytes,
            4096,
        )?,
        open_files: pick_u("open_files", l.open_files, d.open_files, m.open_files, 16)?,
        file_size_bytes: pick_u(
            "file_size_bytes",
            l.file_size_bytes,
            d.file_size_bytes,
            m.file_size_bytes,
            1,
        )?,
        cgroup_enforced,
    };

    validate_files(&req.files, limits.scratch_bytes)?;
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!(
                "environment variable {k:?} is invalid: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv entries must not contain NUL bytes".into()));
    }
    if let forkd_ipc::Program::Script(path) = &req.program {
        if path.is_empty() || path.contains('\0') {
            return Err(invalid(format!(
                "script path {path:?} must be non-empty without NUL bytes (relative paths are inside the scratch directory)"
            )));
        }
    }
    if let forkd_ipc::Program::Module(name) = &req.program {
        if name.is_empty() || name.contains('\0') {
            return Err(invalid(format!(
                "module name {name:?} must be non-empty without NUL bytes (as for `python -m json.tool`)"
            )));
        }
    }
    Ok(limits)
}

fn validate_files(files: &[InlineFile], scratch_bytes: u64) -> Result<(), ErrorReply> {
    let mut total: u64 = 0;
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        let p = Path::new(&f.path);
        let ok = !f.path.is_empty()
            && !f.path.contains('\0')
            && p.is_relative()
            // components() silently drops interior `.` (`a/./b`), so check
            // the raw segments too.
            && !f.path.split('/').any(|seg| seg == ".")
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !ok {
            return Err(invalid(format!(
                "file path {:?} must be relative to the scratch directory, without `..` or `.`",
                f.path
            )));
        }
        if !seen.insert(f.path.clone()) {
            return Err(invalid(format!("file path {:?} appears twice", f.path)));
        }
        if let Some(mode) = f.mode {
            if mode & !0o777 != 0 {
                return Err(invalid(format!(
                    "file {:?}: mode {mode:#o} may only hold permission bits (no setuid/setgid/sticky)",
                    f.path
                )));
            }
        }
        total += f.content.len() as u64;
    }
    if total > scratch_bytes {
        return Err(ErrorReply {
            code: ErrorCode::LimitExceedsPolicy,
            message: format!(
                "inline files total {total} bytes, more than the scratch directory's {scratch_bytes} bytes; raise limits.scratch_bytes"
            ),
        });
    }
    Ok(())
}
