//! The operator's bound on what requests may open, and a request's admitted
//! allowlist.
//!
//! `[network] allow` lists the specs requests may ask for (a request rule must
//! lie inside one of them, ports included); `deny` lists networks that stay
//! closed whatever a request says (link-local, cloud metadata and the host's
//! loopback by default). A wildcard (`*`, `0.0.0.0/0`, `::/0`) in a request
//! needs `allow_wildcards`; even then `deny` holds for every connection.

use std::net::IpAddr;
use std::sync::Arc;

use crate::spec::{self, canonical, Cidr, PortRange, Rule, SpecError, Target};

/// Networks no request reaches unless the operator removes them from `deny`:
/// the host's loopback and "this host" (the proxy connects from the host's
/// namespace), link-local (cloud metadata at 169.254.169.254, AWS's IPv6
/// metadata at fd00:ec2::254, Alibaba's at 100.100.100.200) and multicast.
pub const DEFAULT_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "127.0.0.0/8",
    "::1/128",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
];

/// Private ranges: an address here reached through a *name* is a rebinding
/// attempt unless a request rule names the range explicitly.
pub const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/8",
];

/// Most rules one request may carry.
pub const DEFAULT_MAX_RULES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("allow_net: {0}")]
    Spec(#[from] SpecError),
    #[error("allow_net has {count} entries; at most {max} are accepted (the operator's [network] max_rules): use *.DOMAIN or a CIDR to cover several")]
    TooMany { count: usize, max: usize },
    #[error("allow_net `{spec}` opens every destination; the operator's [network] allow_wildcards is off: name the hosts or networks instead")]
    Wildcard { spec: String },
    #[error("allow_net `{spec}` is refused by the operator's {bound} deny rule `{rule}`")]
    Denied {
        spec: String,
        rule: String,
        bound: String,
    },
    #[error("allow_net `{spec}` is outside the operator's {bound} allow bound ({allowed})")]
    OutsideBound {
        spec: String,
        allowed: String,
        bound: String,
    },
}

/// The operator's bound, compiled once from `[network]`.
#[derive(Debug, Clone)]
pub struct Bound {
    allow: Vec<Rule>,
    deny: Arc<[Cidr]>,
    allow_wildcards: bool,
    max_rules: usize,
    /// Where the operator wrote it, for refusals (`[network]`, or a
    /// zygote's `network_allow`/`network_deny`).
    name: String,
}

impl Default for Bound {
    fn default() -> Bound {
        Bound {
            allow: vec![Rule {
                target: Target::Any,
                ports: PortRange::ANY,
            }],
            deny: DEFAULT_DENY
                .iter()
                .map(|s| s.parse().expect("DEFAULT_DENY entries parse (unit-tested)"))
                .collect(),
            allow_wildcards: false,
            max_rules: DEFAULT_MAX_RULES,
            name: "[network]".into(),
        }
    }
}

impl Bound {
    /// From the config's specs; errors name the offending entry.
    pub fn new(
        allow: &[String],
        deny: &[String],
        allow_wildcards: bool,
        max_rules: usize,
    ) -> Result<Bound, SpecError> {
        Ok(Bound {
            allow: allow
                .iter()
                .map(|s| spec::parse(s))
                .collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .map(|s| s.trim().parse::<Cidr>())
                .collect::<Result<Vec<_>, _>>()?
                .into(),
            allow_wildcards,
            max_rules,
            name: "[network]".into(),
        })
    }

    /// The same bound, named `name` in refusals.
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Bound {
        self.name = name.into();
        self
    }

    /// The deny rule that closes `ip`, if any.
    pub fn denies(&self, ip: IpAddr) -> Option<&Cidr> {
        self.deny.iter().find(|c| c.contains(ip))
    }

    fn within_allow(&self, rule: &Rule) -> bool {
        self.allow.iter().any(|a| {
            a.ports.covers(&rule.ports)
                && match (&a.target, &rule.target) {
                    (Target::Any, _) => true,
                    (Target::Host(a), Target::Host(r)) => a == r,
                    (Target::Suffix(_), Target::Host(r)) => {
                        // A rule for exactly `r` against `*.domain`.
                        Rule {
                            target: a.target.clone(),
                            ports: PortRange::ANY,
                        }
                        .matches_name(r)
                    }
                    (Target::Suffix(a), Target::Suffix(r)) => {
                        r == a || r.ends_with(&format!(".{a}"))
                    }
                    (Target::Net(a), Target::Net(r)) => a.covers(r),
                    _ => false,
                }
        })
    }

    /// Checks a request's specs against the bound; the admitted allowlist or
    /// an error naming the rule that refused it. Nothing is sent anywhere.
    pub fn admit(&self, specs: &[String]) -> Result<Allowlist, AdmitError> {
        if specs.len() > self.max_rules {
            return Err(AdmitError::TooMany {
                count: specs.len(),
                max: self.max_rules,
            });
        }
        let mut rules = Vec::with_capacity(specs.len());
        for s in specs {
            let rule = spec::parse(s)?;
            if rule.is_wildcard() && !self.allow_wildcards {
                return Err(AdmitError::Wildcard { spec: s.clone() });
            }
            if let Target::Net(c) = &rule.target {
                if let Some(d) = self.deny.iter().find(|d| d.covers(c)) {
                    return Err(AdmitError::Denied {
                        spec: s.clone(),
                        rule: d.to_string(),
                        bound: self.name.clone(),
                    });
                }
            }
            if !self.within_allow(&rule) {
                return Err(AdmitError::OutsideBound {
                    bound: self.name.clone(),
                    spec: s.clone(),
                    allowed: self
                        .allow
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            if rule.is_wildcard() {
                tracing::warn!(spec = %s, "a request opens every destination (allow_wildcards)");
            }
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        Ok(Allowlist {
            rules,
            deny: self.deny.clone(),
        })
    }
}

/// Why an address is not reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Inside an operator deny rule.
    Denied(Cidr),
    /// A private address reached through a name without a rule naming it.
    Rebinding,
    /// No rule allows it.
    NotAllowed,
    /// An address of the daemon's own host (its services are not egress).
    HostAddress,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Denied(c) => write!(f, "denied by the operator's rule {c}"),
            Refusal::Rebinding => f.write_str("a private address behind a name (rebinding)"),
            Refusal::NotAllowed => f.write_str("not on the allowlist"),
            Refusal::HostAddress => f.write_str("an address of forkd's own host"),
        }
    }
}

/// One sandbox's admitted rules.
#[derive(Debug, Clone)]
pub struct Allowlist {
    rules: Vec<Rule>,
    deny: Arc<[Cidr]>,
}

impl Allowlist {
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The ports rules for name `name` open (empty: the name is not allowed).
    pub fn name_ports(&self, name: &str) -> Vec<PortRange> {
        self.rules
            .iter()
            .filter(|r| r.matches_name(name))
            .map(|r| r.ports)
            .collect()
    }

    /// Networks the rules name (for routes).
    pub fn networks(&self) -> Vec<Cidr> {
        self.rules
            .iter()
            .filter_map(|r| match &r.target {
                Target::Net(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    fn denied(&self, ip: IpAddr) -> Option<Cidr> {
        self.deny.iter().find(|c| c.contains(ip)).copied()
    }

    /// Whether a connection to `ip:port` is allowed by an address rule.
    pub fn check_address(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if let Some(d) = self.denied(ip) {
            return Err(Refusal::Denied(d));
        }
        let ok = self.rules.iter().any(|r| match &r.target {
            Target::Net(c) => c.contains(ip) && r.ports.contains(port),
            _ => false,
        });
        if ok {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }

    /// Whether the resolver may hand out `ip` for an allowed name: never a
    /// denied address; a private one only when an address rule names it
    /// (anything else is DNS rebinding).
    pub fn check_resolved(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if let Some(d) = self.denied(ip) {
            return Err(Refusal::Denied(d));
        }
        let private = PRIVATE
            .iter()
            .any(|p| p.parse::<Cidr>().is_ok_and(|c| c.contains(ip)));
        let named = self.rules.iter().any(|r| match &r.target {
            Target::Net(c) => !c.is_everything() && c.contains(ip),
            _ => false,
        });
        if private && !named {
            return Err(Refusal::Rebinding);
        }
        Ok(())
    }

    /// Distinct ports that need a listener, ascending; `None` when more than
    /// `max` (e.g. a rule without a port).
    pub fn ports(&self, max: usize) -> Option<Vec<u16>> {
        let total: u32 = self.rules.iter().map(|r| r.ports.count()).sum();
        let mut ports: Vec<u16> = Vec::new();
        if total as usize > max * 4 {
            return None;
        }
        for r in &self.rules {
            ports.extend(r.ports.lo..=r.ports.hi);
        }
        ports.sort_unstable();
        ports.dedup();
        (ports.len() <= max).then_some(ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_bound_admits_public_and_test_destinations() {
        let b = Bound::default();
        let a = b
            .admit(&specs(&[
                "198.18.0.1:80",
                "*.example.com:443",
                "files.example.org:443",
            ]))
            .unwrap();
        assert_eq!(a.rules().len(), 3);
        assert_eq!(
            a.name_ports("a.example.com"),
            vec![PortRange { lo: 443, hi: 443 }]
        );
        assert!(a.name_ports("example.com").is_empty());
        assert!(a.check_address("198.18.0.1".parse().unwrap(), 80).is_ok());
        assert_eq!(
            a.check_address("198.18.0.1".parse().unwrap(), 81),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            a.check_address("198.18.0.2".parse().unwrap(), 80),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn metadata_is_refused_at_admission_naming_the_rule() {
        let b = Bound::default();
        for (spec, rule) in [
            ("169.254.169.254:80", "169.254.0.0/16"),
            ("[fd00:ec2::254]:80", "fd00:ec2::254/128"),
            ("fe80::1", "fe80::/10"),
            ("127.0.0.1:22", "127.0.0.0/8"),
        ] {
            let e = b.admit(&specs(&[spec])).unwrap_err();
            assert_eq!(
                e,
                AdmitError::Denied {
                    spec: spec.into(),
                    rule: rule.into(),
                    bound: "[network]".into(),
                }
            );
            assert!(e.to_string().contains(rule), "{e}");
        }
    }

    #[test]
    fn wildcards_need_the_operator() {
        let b = Bound::default();
        for s in ["*", "0.0.0.0/0", "[::/0]:443"] {
            assert!(matches!(
                b.admit(&specs(&[s])),
                Err(AdmitError::Wildcard { .. })
            ));
        }
        let open = Bound::new(&specs(&["*"]), &specs(DEFAULT_DENY_STRS), true, 64).unwrap();
        let a = open.admit(&specs(&["0.0.0.0/0"])).unwrap();
        // Deny still holds per connection.
        assert!(matches!(
            a.check_address("169.254.169.254".parse().unwrap(), 80),
            Err(Refusal::Denied(_))
        ));
        assert!(a.check_address("198.18.0.9".parse().unwrap(), 80).is_ok());
    }

    const DEFAULT_DENY_STRS: &[&str] = DEFAULT_DENY;

    #[test]
    fn bound_limits_hosts_networks_and_ports() {
        let b = Bound::new(
            &specs(&["*.corp.example:443", "198.18.0.0/15:1-1024"]),
            &[],
            false,
            3,
        )
        .unwrap();
        assert!(b.admit(&specs(&["pkg.corp.example:443"])).is_ok());
        assert!(b.admit(&specs(&["*.a.corp.example:443"])).is_ok());
        assert!(b.admit(&specs(&["198.18.3.0/24:80"])).is_ok());
        let e = b.admit(&specs(&["pkg.corp.example:80"])).unwrap_err();
        assert!(matches!(e, AdmitError::OutsideBound { .. }));
        assert!(e.to_string().contains("*.corp.example:443"), "{e}");
        assert!(matches!(
            b.admit(&specs(&["other.example:443"])),
            Err(AdmitError::OutsideBound { .. })
        ));
        assert!(matches!(
            b.admit(&specs(&["198.16.0.0/12:80"])),
            Err(AdmitError::OutsideBound { .. })
        ));
        assert!(matches!(
            b.admit(&specs(&["a.corp.example:443"; 4])),
            Err(AdmitError::TooMany { count: 4, max: 3 })
        ));
        assert!(matches!(
            b.admit(&specs(&["a.corp.example:0"])),
            Err(AdmitError::Spec(SpecError::BadPort { .. }))
        ));
    }

    #[test]
    fn resolved_addresses_are_checked_for_rebinding() {
        let b = Bound::default();
        let a = b
            .admit(&specs(&["pkg.example:443", "10.1.0.0/16:443"]))
            .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(a.check_resolved(ip("198.18.0.5")).is_ok());
        assert!(a.check_resolved(ip("2001:db8::5")).is_ok());
        assert_eq!(a.check_resolved(ip("10.2.0.1")), Err(Refusal::Rebinding));
        assert_eq!(a.check_resolved(ip("192.168.1.1")), Err(Refusal::Rebinding));
        assert_eq!(a.check_resolved(ip("fd12::1")), Err(Refusal::Rebinding));
        // Named explicitly: fine.
        assert!(a.check_resolved(ip("10.1.2.3")).is_ok());
        // Metadata and loopback never.
        assert!(matches!(
            a.check_resolved(ip("169.254.169.254")),
            Err(Refusal::Denied(_))
        ));
        assert!(matches!(
            a.check_resolved(ip("::ffff:127.0.0.1")),
            Err(Refusal::Denied(_))
        ));
    }

    #[test]
    fn listener_ports() {
        let b = Bound::default();
        let a = b
            .admit(&specs(&[
                "a.example:443",
                "b.example:80-82",
                "198.18.0.1:443",
            ]))
            .unwrap();
        assert_eq!(a.ports(16).unwrap(), vec![80, 81, 82, 443]);
        assert_eq!(a.ports(3), None);
        let any = b.admit(&specs(&["a.example"])).unwrap();
        assert_eq!(any.ports(256), None);
    }
}
