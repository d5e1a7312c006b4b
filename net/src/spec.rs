//! Allowlist specs: `HOST[:PORT]`, `*.domain[:PORT]`, `CIDR[:PORT]`, `*[:PORT]`.
//!
//! PORT is a number or a range `LO-HI` (1-65535); without one every port is
//! meant. IPv6 addresses and networks take brackets when a port follows
//! (`[2001:db8::/32]:443`). Parsing is pure: whether a spec is *permitted* is
//! the operator's bound's business ([`crate::bound`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest spec accepted (a DNS name is at most 253 bytes).
pub const MAX_SPEC_LEN: usize = 300;

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange { lo: 1, hi: 65535 };

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    pub fn covers(&self, other: &PortRange) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }

    pub fn count(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    pub fn is_any(&self) -> bool {
        *self == Self::ANY
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("*")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// An IP network; IPv4-mapped IPv6 addresses are kept as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, everything else unchanged: a rule on the
/// IPv4 address must hold whichever way a program spells it.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

impl Cidr {
    /// `addr/len`; `None` when `len` is too long or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        let c = Cidr { addr, len };
        (c.network() == addr).then_some(c)
    }

    /// The network containing `addr` with prefix `len` (host bits cleared).
    fn truncate(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        }
    }

    pub fn host(addr: IpAddr) -> Cidr {
        let addr = canonical(addr);
        Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn network(&self) -> IpAddr {
        Self::truncate(self.addr, self.len)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && Self::truncate(ip, self.len) == self.addr
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    pub fn is_everything(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Cidr, SpecError> {
        parse_cidr(s, s)
    }
}

/// What a rule lets through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `*`: every destination.
    Any,
    /// An exact DNS name (lower case, no trailing dot).
    Host(String),
    /// `*.domain`: every name below `domain` (not `domain` itself).
    Suffix(String),
    /// An address or network.
    Net(Cidr),
}

/// One parsed allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub target: Target,
    pub ports: PortRange,
}

impl Rule {
    /// `*`, `0.0.0.0/0` or `::/0`: opens every destination.
    pub fn is_wildcard(&self) -> bool {
        match &self.target {
            Target::Any => true,
            Target::Net(c) => c.is_everything(),
            _ => false,
        }
    }

    /// Whether DNS name `name` (lower case) is meant by this rule.
    pub fn matches_name(&self, name: &str) -> bool {
        match &self.target {
            Target::Any => true,
            Target::Host(h) => h == name,
            Target::Suffix(d) => {
                name.len() > d.len() + 1 && name.ends_with(d.as_str()) && {
                    name.as_bytes()[name.len() - d.len() - 1] == b'.'
                }
            }
            Target::Net(_) => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Any => f.write_str("*")?,
            Target::Host(h) => f.write_str(h)?,
            Target::Suffix(d) => write!(f, "*.{d}")?,
            Target::Net(c) if self.ports.is_any() => return write!(f, "{c}"),
            Target::Net(c) if c.addr.is_ipv6() => write!(f, "[{c}]")?,
            Target::Net(c) => write!(f, "{c}")?,
        }
        if !self.ports.is_any() {
            write!(f, ":{}", self.ports)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("an empty network spec: write HOST[:PORT], *.DOMAIN[:PORT] or CIDR[:PORT]")]
    Empty,
    #[error("network spec is {len} bytes long (at most {MAX_SPEC_LEN}): write HOST[:PORT], *.DOMAIN[:PORT] or CIDR[:PORT]")]
    TooLong { len: usize },
    #[error("port `{port}` in `{spec}` is not a port: use a number in 1-65535 or a range LO-HI")]
    BadPort { spec: String, port: String },
    #[error("port range `{port}` in `{spec}` is empty: write the lower port first (LO-HI)")]
    EmptyRange { spec: String, port: String },
    #[error("`{spec}` is not a valid host name ({reason}); write HOST[:PORT], *.DOMAIN[:PORT] or CIDR[:PORT]")]
    BadHost { spec: String, reason: &'static str },
    #[error("`{spec}` is not a valid network ({reason})")]
    BadCidr { spec: String, reason: String },
}

fn parse_port_range(spec: &str, s: &str) -> Result<PortRange, SpecError> {
    let bad = || SpecError::BadPort {
        spec: spec.into(),
        port: s.into(),
    };
    let num = |p: &str| -> Result<u16, SpecError> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match p.parse::<u16>() {
            Ok(n @ 1..=65535) => Ok(n),
            _ => Err(bad()),
        }
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let p = num(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(SpecError::EmptyRange {
            spec: spec.into(),
            port: s.into(),
        });
    }
    Ok(PortRange { lo, hi })
}

fn parse_cidr(spec: &str, s: &str) -> Result<Cidr, SpecError> {
    let bad = |reason: String| SpecError::BadCidr {
        spec: spec.into(),
        reason,
    };
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| bad(format!("`{a}` is not an IP address")))?;
    let addr = canonical(addr);
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max && l.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad(format!("prefix length `/{l}` is not in 0-{max}"))),
        },
    };
    Cidr::new(addr, len).ok_or_else(|| {
        bad(format!(
            "host bits are set; did you mean {}?",
            Cidr {
                addr: Cidr::truncate(addr, len),
                len
            }
        ))
    })
}

/// A DNS name, lower-cased, without a trailing dot.
fn parse_host(spec: &str, s: &str) -> Result<String, SpecError> {
    let bad = |reason| SpecError::BadHost {
        spec: spec.into(),
        reason,
    };
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > 253 {
        return Err(bad("a DNS name is at most 253 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("it has an empty label"));
        }
        if label.len() > 63 {
            return Err(bad("a label is at most 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("only letters, digits, `-`, `_` and `.` may appear"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label cannot start or end with `-`"));
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad("it looks like an incomplete IPv4 address"));
    }
    Ok(name)
}

/// Parses one spec.
pub fn parse(spec: &str) -> Result<Rule, SpecError> {
    let s = spec.trim();
    if s.is_empty() {
        return Err(SpecError::Empty);
    }
    if s.len() > MAX_SPEC_LEN {
        return Err(SpecError::TooLong { len: s.len() });
    }
    // `[v6]` or `[v6/len]`, optionally `:PORT`.
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(|| SpecError::BadCidr {
            spec: spec.into(),
            reason: "`[` without `]`".into(),
        })?;
        let ports = match after {
            "" => PortRange::ANY,
            p => match p.strip_prefix(':') {
                Some(p) => parse_port_range(spec, p)?,
                None => {
                    return Err(SpecError::BadCidr {
                        spec: spec.into(),
                        reason: format!("`{after}` after `]`; write [ADDRESS]:PORT"),
                    })
                }
            },
        };
        return Ok(Rule {
            target: Target::Net(parse_cidr(spec, inner)?),
            ports,
        });
    }
    // A bare IPv6 address or network has more than one colon: no port.
    if s.matches(':').count() > 1 {
        return Ok(Rule {
            target: Target::Net(parse_cidr(spec, s)?),
            ports: PortRange::ANY,
        });
    }
    let (host, ports) = match s.split_once(':') {
        Some((h, p)) => (h, parse_port_range(spec, p)?),
        None => (s, PortRange::ANY),
    };
    let target = if host == "*" {
        Target::Any
    } else if let Some(domain) = host.strip_prefix("*.") {
        Target::Suffix(parse_host(spec, domain)?)
    } else if host.contains('*') {
        return Err(SpecError::BadHost {
            spec: spec.into(),
            reason: "`*` may only stand alone or begin a name as `*.`",
        });
    } else if host.contains('/') || host.parse::<IpAddr>().is_ok() {
        Target::Net(parse_cidr(spec, host)?)
    } else {
        Target::Host(parse_host(spec, host)?)
    };
    Ok(Rule { target, ports })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn hosts_domains_and_ports() {
        let r = parse("Example.COM.:443").unwrap();
        assert_eq!(r.target, Target::Host("example.com".into()));
        assert_eq!(r.ports, PortRange { lo: 443, hi: 443 });
        let r = parse("*.example.com:8000-8100").unwrap();
        assert_eq!(r.target, Target::Suffix("example.com".into()));
        assert_eq!(r.ports, PortRange { lo: 8000, hi: 8100 });
        assert_eq!(parse("files.example.com").unwrap().ports, PortRange::ANY);
        assert_eq!(parse("*").unwrap().target, Target::Any);
        assert_eq!(parse("*:53").unwrap().ports.lo, 53);
    }

    #[test]
    fn addresses_and_networks() {
        let r = parse("198.18.0.1:80").unwrap();
        assert_eq!(r.target, Target::Net(net("198.18.0.1/32")));
        let r = parse("198.18.0.0/15:1-1024").unwrap();
        assert_eq!(r.target, Target::Net(net("198.18.0.0/15")));
        assert_eq!(r.ports, PortRange { lo: 1, hi: 1024 });
        let r = parse("[2001:db8::/32]:443").unwrap();
        assert_eq!(r.target, Target::Net(net("2001:db8::/32")));
        assert_eq!(r.ports.lo, 443);
        let r = parse("2001:db8::1").unwrap();
        assert_eq!(r.target, Target::Net(net("2001:db8::1/128")));
        assert_eq!(r.ports, PortRange::ANY);
        // IPv4-mapped is the IPv4 address.
        assert_eq!(
            parse("[::ffff:198.18.0.1]:80").unwrap().target,
            Target::Net(net("198.18.0.1/32"))
        );
        assert!(parse("0.0.0.0/0").unwrap().is_wildcard());
        assert!(parse("::/0").unwrap().is_wildcard());
        assert!(parse("*:443").unwrap().is_wildcard());
        assert!(!parse("*.example.com").unwrap().is_wildcard());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "example.com:443",
            "*.example.com:1-2",
            "198.18.0.0/15",
            "198.18.0.1/32:80",
            "[2001:db8::/32]:443",
            "*",
        ] {
            let r = parse(s).unwrap();
            assert_eq!(parse(&r.to_string()).unwrap(), r, "{s}");
        }
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        let e = |s: &str| parse(s).unwrap_err();
        assert_eq!(e(""), SpecError::Empty);
        assert!(matches!(e("a.com:0"), SpecError::BadPort { .. }));
        assert!(matches!(e("a.com:65536"), SpecError::BadPort { .. }));
        assert!(matches!(e("a.com:http"), SpecError::BadPort { .. }));
        assert!(matches!(e("a.com:"), SpecError::BadPort { .. }));
        assert!(matches!(e("a.com:+80"), SpecError::BadPort { .. }));
        assert!(matches!(e("a.com:90-80"), SpecError::EmptyRange { .. }));
        assert!(matches!(e("a..com"), SpecError::BadHost { .. }));
        assert!(matches!(e("-a.com"), SpecError::BadHost { .. }));
        assert!(matches!(e("a b.com"), SpecError::BadHost { .. }));
        assert!(matches!(e("a.*.com"), SpecError::BadHost { .. }));
        assert!(matches!(e("**.com"), SpecError::BadHost { .. }));
        assert!(matches!(e("1.2.3"), SpecError::BadHost { .. }));
        assert!(matches!(e("10.0.0.1/8"), SpecError::BadCidr { .. }));
        assert!(matches!(e("10.0.0.0/33"), SpecError::BadCidr { .. }));
        assert!(matches!(e("[2001:db8::1"), SpecError::BadCidr { .. }));
        assert!(matches!(e("[2001:db8::1]443"), SpecError::BadCidr { .. }));
        assert!(matches!(
            e(&format!("{}.com", "a".repeat(64))),
            SpecError::BadHost { .. }
        ));
        assert!(matches!(e(&"a".repeat(400)), SpecError::TooLong { .. }));
        // The message names the fix.
        assert!(e("10.0.0.1/8").to_string().contains("10.0.0.0/8"));
        assert!(e("a.com:99999").to_string().contains("1-65535"));
    }

    #[test]
    fn names_and_networks_match() {
        let r = parse("*.example.com").unwrap();
        assert!(r.matches_name("a.example.com"));
        assert!(r.matches_name("a.b.example.com"));
        assert!(!r.matches_name("example.com"));
        assert!(!r.matches_name("badexample.com"));
        let c = net("198.18.0.0/15");
        assert!(c.contains("198.19.255.255".parse().unwrap()));
        assert!(c.contains("::ffff:198.18.0.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.0".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert!(c.covers(&net("198.18.4.0/24")));
        assert!(!net("198.18.4.0/24").covers(&c));
        assert!(net("198.18.4.0/24").overlaps(&c));
    }
}
