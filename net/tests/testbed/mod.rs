//! A test host in a network namespace of its own, reached from the host's
//! namespace over a veth pair with addresses from 198.18.0.0/15 (the
//! benchmarking range): the only place egress tests send traffic, besides
//! loopback. Needs root and the `ip` binary. Shared with forkd's tests
//! (`#[path]`-included).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process may build test hosts (root with `ip`).
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The test host: `addr` (and `addr6`, from the documentation range
/// 2001:db8::/32) inside namespace `ns`, `gateway` on the host side.
pub struct TestHost {
    pub ns: String,
    pub veth: String,
    pub addr: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub addr6: Ipv6Addr,
}

fn setns(fd: &OwnedFd) {
    // SAFETY: a valid namespace descriptor; affects only this thread.
    let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

fn open_ns(path: &str) -> OwnedFd {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open {path}: {}", std::io::Error::last_os_error());
    // SAFETY: just opened.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl TestHost {
    /// A fresh namespace and veth pair with a /30 of 198.18.0.0/15.
    pub fn create() -> TestHost {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n);
        let ns = format!("fkdt{tag}");
        let veth = format!("fk{tag}h");
        let peer = format!("fk{tag}s");
        // A /30 per host, spread by pid and counter.
        let slot = (pid.wrapping_mul(7919).wrapping_add(n * 4)) % (1 << 15);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (slot << 2);
        let gateway = Ipv4Addr::from(base + 1);
        let addr = Ipv4Addr::from(base + 2);
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("{gateway}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let net6 = format!("2001:db8:{:x}:{:x}", slot >> 8, slot & 0xff);
        ip(&[
            "addr",
            "add",
            &format!("{net6}::1/64"),
            "dev",
            &veth,
            "nodad",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{net6}::2/64"),
            "dev",
            &peer,
            "nodad",
        ]);
        TestHost {
            ns,
            veth,
            addr,
            gateway,
            addr6: format!("{net6}::2").parse().unwrap(),
        }
    }

    /// Runs `f` on a new thread inside the test host's namespace.
    pub fn spawn<F: FnOnce() + Send + 'static>(&self, f: F) {
        let fd = open_ns(&format!("/run/netns/{}", self.ns));
        std::thread::spawn(move || {
            setns(&fd);
            f();
        });
    }

    /// An echo server on `port`: answers every line with `tag: line`.
    pub fn echo(&self, port: u16, tag: &'static str) {
        let addr = SocketAddr::new(IpAddr::V4(self.addr), port);
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(move || {
            let l = TcpListener::bind(addr).expect("bind echo");
            tx.send(()).unwrap();
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                let mut out = format!("{tag}: ").into_bytes();
                                out.extend_from_slice(&buf[..n]);
                                if s.write_all(&out).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        rx.recv().unwrap();
    }

    /// An echo server on the IPv6 address.
    pub fn echo6(&self, port: u16, tag: &'static str) {
        let addr = SocketAddr::new(IpAddr::V6(self.addr6), port);
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(move || {
            let l = TcpListener::bind(addr).expect("bind echo6");
            tx.send(()).unwrap();
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                if let Ok(n) = s.read(&mut buf) {
                    let mut out = format!("{tag}: ").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    let _ = s.write_all(&out);
                }
            }
        });
        rx.recv().unwrap();
    }

    /// A sink on `port`: reads everything, then answers the byte count.
    pub fn sink(&self, port: u16) {
        let addr = SocketAddr::new(IpAddr::V4(self.addr), port);
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(move || {
            let l = TcpListener::bind(addr).expect("bind sink");
            tx.send(()).unwrap();
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = vec![0u8; 1 << 20];
                    let mut total: u64 = 0;
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => total += n as u64,
                        }
                    }
                    let _ = s.write_all(total.to_string().as_bytes());
                });
            }
        });
        rx.recv().unwrap();
    }

    /// An authoritative DNS server on port 53 answering A queries from
    /// `names` (name without trailing dot → address; TTL `ttl`), NXDOMAIN
    /// otherwise.
    pub fn dns(&self, names: HashMap<String, Ipv4Addr>, ttl: u32) -> SocketAddr {
        let addr = SocketAddr::new(IpAddr::V4(self.addr), 53);
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(move || {
            let s = UdpSocket::bind(addr).expect("bind dns");
            tx.send(()).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_bytes(&buf[..n]) else {
                    continue;
                };
                let mut m = Message::new();
                m.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_available(true);
                m.add_queries(q.queries().iter().cloned());
                let query = &q.queries()[0];
                let name = query.name().to_ascii();
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                match names.get(&name) {
                    Some(a) => {
                        if query.query_type() == RecordType::A {
                            m.add_answer(Record::from_rdata(
                                query.name().clone(),
                                ttl,
                                RData::A(A(*a)),
                            ));
                        }
                    }
                    None => {
                        m.set_response_code(ResponseCode::NXDomain);
                    }
                }
                let _ = s.send_to(&m.to_vec().unwrap(), peer);
            }
        });
        rx.recv().unwrap();
        addr
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A process in a network namespace of its own (what a sandbox child is to
/// the egress path), killed on drop.
pub struct NetnsChild {
    pub child: std::process::Child,
    pub pidfd: OwnedFd,
}

impl NetnsChild {
    pub fn start() -> NetnsChild {
        let child = Command::new("unshare")
            // `lo` up, as in a sandbox's namespace.
            .args(["--net", "sh", "-c", "ip link set lo up && exec sleep 600"])
            .spawn()
            .expect("spawn unshare");
        // SAFETY: pidfd_open with a pid we own and no flags.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::c_int, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        NetnsChild { child, pidfd }
    }

    /// Runs `f` on a thread inside the child's namespace (waiting for the
    /// child to have left ours).
    pub fn run<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(&self, f: F) -> T {
        let home = open_ns("/proc/thread-self/ns/net");
        let pidfd = self.pidfd.try_clone().unwrap();
        std::thread::spawn(move || {
            let id = |fd: &OwnedFd| {
                // SAFETY: zeroed stat is valid; fstat on a valid fd.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fstat writes into the stat we own; fd is open.
                unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
                (st.st_dev, st.st_ino)
            };
            let home_id = id(&home);
            loop {
                setns(&pidfd);
                if id(&open_ns("/proc/thread-self/ns/net")) != home_id {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetnsChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw A query for `name` to `server`; the answer's code and addresses.
pub fn lookup(server: SocketAddr, name: &str) -> (ResponseCode, Vec<Ipv4Addr>) {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;
    let mut m = Message::new();
    m.set_id(4242).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let s = UdpSocket::bind(if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    })
    .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.send_to(&m.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).expect("dns answer");
    let r = Message::from_bytes(&buf[..n]).unwrap();
    let addrs = r
        .answers()
        .iter()
        .filter_map(|a| match a.data() {
            Some(RData::A(a)) => Some(a.0),
            _ => None,
        })
        .collect();
    (r.response_code(), addrs)
}
