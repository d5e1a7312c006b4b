//! The sandbox resolver's answer logic (pure: no sockets here).
//!
//! A query is answered only for names on the allowlist and only with A/AAAA
//! records (plus the CNAME chain leading to them): other names get NXDOMAIN,
//! other record types an empty answer. Upstream answers are filtered: an
//! address inside an operator deny rule, or a private address no address rule
//! names (DNS rebinding), is dropped; if nothing is left the sandbox gets
//! REFUSED. Every address kept becomes reachable for its (clamped) TTL.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

use crate::bound::{Allowlist, Refusal};
use crate::spec::PortRange;

/// Shortest time an answered address stays reachable: a TTL of 0 would
/// make the address unusable before the program connects.
pub const MIN_TTL: u32 = 5;
/// Longest: bounds how long a stale answer keeps an address open.
pub const MAX_TTL: u32 = 3600;

/// What to do with one query.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Answer at once, with no records.
    Reply(ResponseCode),
    /// Ask upstream; the answer's addresses open `ports`.
    Resolve {
        name: Name,
        rtype: RecordType,
        ports: Vec<PortRange>,
    },
}

/// A DNS name as the allowlist spells it: lower case, no trailing dot.
pub fn plain(name: &Name) -> String {
    let s = name.to_ascii().to_ascii_lowercase();
    s.strip_suffix('.').map(str::to_string).unwrap_or(s)
}

/// Parses a sandbox's query; `None` for something that is not one (dropped
/// without an answer, like any resolver does with garbage).
pub fn parse_query(packet: &[u8]) -> Option<Message> {
    let m = Message::from_bytes(packet).ok()?;
    (m.message_type() == MessageType::Query).then_some(m)
}

pub fn decide(query: &Message, allow: &Allowlist) -> Decision {
    if query.op_code() != OpCode::Query || query.queries().len() != 1 {
        return Decision::Reply(ResponseCode::NotImp);
    }
    let q = &query.queries()[0];
    if q.query_class() != DNSClass::IN {
        return Decision::Reply(ResponseCode::Refused);
    }
    let ports = allow.name_ports(&plain(q.name()));
    if ports.is_empty() {
        return Decision::Reply(ResponseCode::NXDomain);
    }
    match q.query_type() {
        t @ (RecordType::A | RecordType::AAAA) => Decision::Resolve {
            name: q.name().clone(),
            rtype: t,
            ports,
        },
        // The name exists for the sandbox, but only its addresses do.
        _ => Decision::Reply(ResponseCode::NoError),
    }
}

/// The upstream answer, filtered for the sandbox.
#[derive(Debug, Default, PartialEq)]
pub struct Filtered {
    pub records: Vec<Record>,
    /// Addresses to open, each for its clamped TTL.
    pub reachable: Vec<(IpAddr, Duration)>,
    /// Addresses dropped and why.
    pub refused: Vec<(IpAddr, Refusal)>,
}

/// Keeps the CNAME chain from `name` and the A/AAAA records of its names that
/// pass [`Allowlist::check_resolved`], with TTLs clamped to
/// [`MIN_TTL`]..=[`MAX_TTL`].
pub fn filter(upstream: &Message, name: &Name, rtype: RecordType, allow: &Allowlist) -> Filtered {
    let mut chain = vec![plain(name)];
    let mut out = Filtered::default();
    for r in upstream.answers() {
        let owner = plain(r.name());
        if !chain.contains(&owner) {
            continue;
        }
        let ttl = r.ttl().clamp(MIN_TTL, MAX_TTL);
        let ip = match r.data() {
            Some(RData::CNAME(target)) => {
                chain.push(plain(&target.0));
                let mut r = r.clone();
                r.set_ttl(ttl);
                out.records.push(r);
                continue;
            }
            Some(RData::A(a)) if rtype == RecordType::A => IpAddr::V4(a.0),
            Some(RData::AAAA(a)) if rtype == RecordType::AAAA => IpAddr::V6(a.0),
            _ => continue,
        };
        match allow.check_resolved(ip) {
            Ok(()) => {
                let mut r = r.clone();
                r.set_ttl(ttl);
                out.records.push(r);
                out.reachable
                    .push((ip, Duration::from_secs(u64::from(ttl))));
            }
            Err(why) => out.refused.push((ip, why)),
        }
    }
    out
}

/// The answer to `query` with `rcode` and `answers`.
pub fn reply(query: &Message, rcode: ResponseCode, answers: Vec<Record>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    m.add_queries(query.queries().iter().cloned());
    m.insert_answers(answers);
    m.to_vec().unwrap_or_default()
}

/// A recursive query for `name`/`rtype` with id `id`, to send upstream.
pub fn upstream_query(id: u16, name: &Name, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(name.clone(), rtype));
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bound::Bound;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use std::str::FromStr;

    fn allow(specs: &[&str]) -> Allowlist {
        Bound::default()
            .admit(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    fn query(name: &str, t: RecordType) -> Message {
        let bytes = upstream_query(7, &Name::from_str(name).unwrap(), t);
        parse_query(&bytes).unwrap()
    }

    #[test]
    fn only_allowlisted_names_and_address_types_are_resolved() {
        let a = allow(&["pkg.example:443", "*.cdn.example:443"]);
        assert!(matches!(
            decide(&query("PKG.example.", RecordType::A), &a),
            Decision::Resolve {
                rtype: RecordType::A,
                ..
            }
        ));
        assert!(matches!(
            decide(&query("x.cdn.example.", RecordType::AAAA), &a),
            Decision::Resolve { .. }
        ));
        assert_eq!(
            decide(&query("other.example.", RecordType::A), &a),
            Decision::Reply(ResponseCode::NXDomain)
        );
        assert_eq!(
            decide(&query("pkg.example.", RecordType::TXT), &a),
            Decision::Reply(ResponseCode::NoError)
        );
        assert_eq!(
            decide(&query("pkg.example.", RecordType::MX), &a),
            Decision::Reply(ResponseCode::NoError)
        );
    }

    fn answer(records: Vec<Record>) -> Message {
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        m.insert_answers(records);
        m
    }

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    #[test]
    fn answers_are_filtered_and_clamped() {
        let a = allow(&["pkg.example:443"]);
        let up = answer(vec![
            Record::from_rdata(
                n("pkg.example."),
                60,
                RData::CNAME(CNAME(n("edge.cdn.test."))),
            ),
            Record::from_rdata(n("edge.cdn.test."), 0, RData::A(A::new(198, 18, 0, 7))),
            Record::from_rdata(n("edge.cdn.test."), 99999, RData::A(A::new(198, 18, 0, 8))),
            // Rebinding and metadata: dropped.
            Record::from_rdata(n("edge.cdn.test."), 60, RData::A(A::new(10, 0, 0, 1))),
            Record::from_rdata(
                n("edge.cdn.test."),
                60,
                RData::A(A::new(169, 254, 169, 254)),
            ),
            // Not on the chain: ignored.
            Record::from_rdata(n("evil.test."), 60, RData::A(A::new(198, 18, 0, 9))),
            // Wrong type for the question: ignored.
            Record::from_rdata(
                n("edge.cdn.test."),
                60,
                RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            ),
            Record::from_rdata(
                n("edge.cdn.test."),
                60,
                RData::TXT(TXT::new(vec!["x".into()])),
            ),
        ]);
        let f = filter(&up, &n("pkg.example."), RecordType::A, &a);
        assert_eq!(
            f.reachable,
            vec![
                (
                    "198.18.0.7".parse().unwrap(),
                    Duration::from_secs(u64::from(MIN_TTL))
                ),
                (
                    "198.18.0.8".parse().unwrap(),
                    Duration::from_secs(u64::from(MAX_TTL))
                ),
            ]
        );
        assert_eq!(f.records.len(), 3);
        assert_eq!(f.refused.len(), 2);
        assert_eq!(f.refused[0].1, Refusal::Rebinding);
        assert!(matches!(f.refused[1].1, Refusal::Denied(_)));
    }

    #[test]
    fn explicitly_allowlisted_private_ranges_may_be_answered() {
        let a = allow(&["pkg.example:443", "10.9.0.0/16:443"]);
        let up = answer(vec![Record::from_rdata(
            n("pkg.example."),
            60,
            RData::A(A::new(10, 9, 1, 1)),
        )]);
        let f = filter(&up, &n("pkg.example."), RecordType::A, &a);
        assert_eq!(f.reachable.len(), 1);
    }

    #[test]
    fn replies_round_trip() {
        let q = query("pkg.example.", RecordType::A);
        let bytes = reply(&q, ResponseCode::NXDomain, vec![]);
        let m = Message::from_bytes(&bytes).unwrap();
        assert_eq!(m.id(), 7);
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        assert_eq!(m.message_type(), MessageType::Response);
        assert_eq!(m.queries(), q.queries());
        assert!(parse_query(&bytes).is_none(), "a response is not a query");
        assert!(parse_query(b"\x00\x01garbage").is_none());
    }
}
