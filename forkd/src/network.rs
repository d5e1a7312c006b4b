//! `[network]`: the operator's bound on egress and the daemon's handle on
//! the egress machinery ([`forkd_net`]).
//!
//! A request without `allow_net` never reaches this module beyond one
//! `is_empty` check: its sandbox keeps an empty network namespace, as before.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use forkd_ipc::{ErrorCode, ErrorReply};
use forkd_net::{AdmitError, Allowlist, Bound, Egress, EgressError, Enforcer};
use serde::Deserialize;

use crate::config::ConfigError;

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
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            max_connections: d.max_connections,
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

    fn resolvers(&self) -> Result<Vec<SocketAddr>, ConfigError> {
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
        if self.max_ports == 0 || self.max_ports > 1024 {
            return Err(ConfigError::Invalid(
                "[network] max_ports must be in 1-1024".into(),
            ));
        }
        Ok(())
    }
}

/// The daemon's egress state.
pub struct Network {
    bound: Bound,
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
    pub fn start(section: &NetworkSection, root: bool) -> Result<Network, ConfigError> {
        let bound = section.bound()?;
        let enforcer = if root {
            Enforcer::start(forkd_net::Config {
                resolvers: section.resolvers()?,
                connect_timeout: Duration::from_millis(section.connect_timeout_ms),
                max_ports: section.max_ports,
                max_connections: section.max_connections,
                ..forkd_net::Config::default()
            })
            .map_err(|e| format!("forkd could not start its egress thread: {e}"))
        } else {
            Err("network egress (allow_net) needs a root daemon: a rootless daemon cannot enter its sandboxes' network namespaces; run forkd as root or drop allow_net".into())
        };
        Ok(Network { bound, enforcer })
    }

    /// Checks a request's allowlist at admission: `None` when it has none.
    /// Nothing is sent anywhere; a refusal names the rule.
    pub fn admit(&self, specs: &[String]) -> Result<Option<Allowlist>, ErrorReply> {
        if specs.is_empty() {
            return Ok(None);
        }
        let allow = self.bound.admit(specs).map_err(|e| match e {
            AdmitError::Spec(_) | AdmitError::TooMany { .. } => {
                refused(ErrorCode::InvalidRequest, e)
            }
            _ => refused(ErrorCode::LimitExceedsPolicy, e),
        })?;
        let enforcer = self
            .enforcer
            .as_ref()
            .map_err(|e| refused(ErrorCode::InvalidRequest, e))?;
        enforcer
            .check(&allow)
            .map_err(|e| refused(ErrorCode::InvalidRequest, e))?;
        Ok(Some(allow))
    }

    /// Opens the sandbox behind `pidfd` to its allowlist (before its program runs).
    pub async fn attach(
        &self,
        pidfd: BorrowedFd<'_>,
        allow: Allowlist,
    ) -> Result<Egress, ErrorReply> {
        let enforcer = self
            .enforcer
            .as_ref()
            .map_err(|e| refused(ErrorCode::InvalidRequest, e))?;
        enforcer.attach(pidfd, allow).await.map_err(|e| match e {
            EgressError::TooManyPorts { .. } => refused(ErrorCode::InvalidRequest, e),
            _ => refused(ErrorCode::SpawnFailed, e),
        })
    }
}
