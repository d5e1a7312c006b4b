//! `[network]`: the operator's bound on egress and the daemon's handle on
//! the egress machinery ([`forkd_net`]).
//!
//! A request without `allow_net` never reaches this module beyond one
//! `is_empty` check: its sandbox keeps an empty network namespace, as before.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use forkd_ipc::{ErrorCode, ErrorReply};
use forkd_net::{AdmitError, Allowlist, Bound, Egress, EgressError, Enforcer};

use crate::config::{ConfigError, NetworkSection};

/// The daemon's egress state.
pub struct Network {
    bound: Bound,
    /// Zygotes with a bound of their own (`network_allow`/`network_deny`).
    zygote_bounds: std::collections::HashMap<String, Bound>,
    enforcer: Result<Enforcer, String>,
}

fn refused(code: ErrorCode, e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply {
        code,
        message: e.to_string(),
    }
}

impl Network {
    /// Compiles the bound and, as root, starts the setup thread.
    pub fn start(
        section: &NetworkSection,
        zygotes: &[crate::config::ZygoteSection],
        root: bool,
    ) -> Result<Network, ConfigError> {
        let bound = section.bound()?;
        let mut zygote_bounds = std::collections::HashMap::new();
        for z in zygotes {
            if let Some(b) = section.bound_for(z)? {
                zygote_bounds.insert(z.name.clone(), b);
            }
        }
        let enforcer = if root {
            Enforcer::start(forkd_net::Config {
                resolvers: section.resolvers()?,
                connect_timeout: Duration::from_millis(section.connect_timeout_ms),
                max_ports: section.max_ports,
                max_connections: section.max_connections,
                bandwidth: section.bandwidth,
                ..forkd_net::Config::default()
            })
            .map_err(|e| format!("forkd could not start its egress thread: {e}"))
        } else {
            Err("network egress (allow_net) needs a root daemon: a rootless daemon cannot enter its sandboxes' network namespaces; run forkd as root or drop allow_net".into())
        };
        Ok(Network {
            bound,
            zygote_bounds,
            enforcer,
        })
    }

    /// The egress machinery, or why this daemon has none (rootless).
    fn enforcer(&self) -> Result<&Enforcer, ErrorReply> {
        self.enforcer
            .as_ref()
            .map_err(|e| refused(ErrorCode::InvalidRequest, e))
    }

    /// Checks a request's allowlist for `zygote` at admission: `None` when
    /// it has none. Nothing is sent anywhere; a refusal names the rule.
    pub fn admit(&self, specs: &[String], zygote: &str) -> Result<Option<Allowlist>, ErrorReply> {
        if specs.is_empty() {
            return Ok(None);
        }
        let bound = self.zygote_bounds.get(zygote).unwrap_or(&self.bound);
        let allow = bound.admit(specs).map_err(|e| match e {
            AdmitError::Spec(_) | AdmitError::TooMany { .. } => {
                refused(ErrorCode::InvalidRequest, e)
            }
            _ => refused(ErrorCode::LimitExceedsPolicy, e),
        })?;
        let enforcer = self.enforcer()?;
        enforcer
            .check(&allow)
            .map_err(|e| refused(ErrorCode::InvalidRequest, e))?;
        Ok(Some(allow))
    }

    /// Replaces the allowlist of a running sandbox whose egress is `egress`.
    pub async fn update(
        &self,
        egress: &Egress,
        pidfd: BorrowedFd<'_>,
        allow: Allowlist,
    ) -> Result<(), ErrorReply> {
        let enforcer = self.enforcer()?;
        enforcer
            .update(egress, pidfd, allow)
            .await
            .map_err(|e| match e {
                EgressError::TooManyPorts { .. } => refused(ErrorCode::InvalidRequest, e),
                _ => refused(ErrorCode::Internal, e),
            })
    }

    /// Opens the sandbox behind `pidfd` to its allowlist (before its program runs).
    pub async fn attach(
        &self,
        pidfd: BorrowedFd<'_>,
        allow: Allowlist,
    ) -> Result<Egress, ErrorReply> {
        let enforcer = self.enforcer()?;
        enforcer.attach(pidfd, allow).await.map_err(|e| match e {
            EgressError::TooManyPorts { .. } => refused(ErrorCode::InvalidRequest, e),
            _ => refused(ErrorCode::SpawnFailed, e),
        })
    }
}
