//! Kernel calls of the egress path: entering a sandbox's network namespace
//! from a dedicated thread, and local routes over rtnetlink.
//!
//! Every `unsafe` block is here, behind safe wrappers.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::spec::Cidr;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Moves the calling thread into the network namespace of `fd` (a namespace
/// file or a pidfd). Per thread: the rest of the process is unaffected.
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor and flag.
    check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// A descriptor of the calling thread's network namespace.
pub fn current_netns() -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the returned descriptor is owned below.
    let fd = check(unsafe {
        libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The namespace's identity (device and inode of its file).
pub fn ns_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: fstat writes into a zeroed stat we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out-pointer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok((st.st_dev, st.st_ino))
}

/// Brings `lo` up in the calling thread's network namespace (idempotent;
/// only a check when it is up already).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a datagram socket used only for the interface ioctls below.
    let s =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: just opened, owned here.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of the named interface into `req`.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the flags member is the one SIOCGIFFLAGS set.
    #[allow(clippy::cast_possible_truncation, reason = "IFF_UP (1) fits a c_short")]
    if unsafe { req.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0 {
        // Already up (a stocked namespace): changing nothing is free.
        return Ok(());
    }
    // SAFETY: as above.
    #[allow(clippy::cast_possible_truncation, reason = "IFF_UP (1) fits a c_short")]
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short
    };
    // SAFETY: SIOCSIFFLAGS reads `req`.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

/// The addresses of the calling thread's network namespace's interfaces.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    check(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its type.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                    let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                    let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(a.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// An rtnetlink socket bound to the network namespace it was opened in
/// (a netlink socket keeps its namespace for life, so routes can be changed
/// later from any thread without entering the namespace again).
pub struct RouteSocket {
    fd: OwnedFd,
    seq: AtomicU32,
}

const LO_IFINDEX: u32 = 1;
const RTA_ALIGN: usize = 4;

fn align(n: usize) -> usize {
    (n + RTA_ALIGN - 1) & !(RTA_ALIGN - 1)
}

impl RouteSocket {
    /// Opens one in the calling thread's network namespace.
    pub fn open() -> io::Result<RouteSocket> {
        // SAFETY: plain socket creation; the descriptor is owned below.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: just opened, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RouteSocket {
            fd,
            seq: AtomicU32::new(1),
        })
    }

    /// Makes every address of `net` local to the namespace, on `lo` (like
    /// `ip route add local NET dev lo`): a connection to one of them then
    /// reaches a listener bound to the wildcard address instead of leaving.
    pub fn add_local(&self, net: &Cidr) -> io::Result<()> {
        self.request(
            libc::RTM_NEWROUTE,
            libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
            net,
        )
    }

    /// Removes a route [`RouteSocket::add_local`] made.
    pub fn del_local(&self, net: &Cidr) -> io::Result<()> {
        self.request(libc::RTM_DELROUTE, 0, net)
    }

    #[allow(
        clippy::cast_possible_truncation,
        reason = "netlink constants and a route message of a few dozen bytes fit their fields"
    )]
    fn request(&self, kind: u16, flags: libc::c_int, net: &Cidr) -> io::Result<()> {
        let (family, addr): (u8, Vec<u8>) = match net.addr() {
            IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut msg = Vec::with_capacity(64);
        // struct nlmsghdr: len (patched below), type, flags, seq, pid.
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(
            &((libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16).to_ne_bytes(),
        );
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol,
        // scope, type, flags.
        msg.extend_from_slice(&[
            family,
            net.prefix_len(),
            0,
            0,
            libc::RT_TABLE_LOCAL,
            libc::RTPROT_STATIC,
            libc::RT_SCOPE_HOST,
            libc::RTN_LOCAL,
        ]);
        msg.extend_from_slice(&0u32.to_ne_bytes());
        let mut attr = |ty: u16, data: &[u8]| {
            msg.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            msg.extend_from_slice(&ty.to_ne_bytes());
            msg.extend_from_slice(data);
            msg.resize(align(msg.len()), 0);
        };
        if net.prefix_len() > 0 {
            attr(libc::RTA_DST, &addr);
        }
        attr(libc::RTA_OIF, &LO_IFINDEX.to_ne_bytes());
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());

        // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and kernel are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // The ack: nlmsghdr of type NLMSG_ERROR, then the error code (0 = ok).
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n < 20 {
                return Err(io::Error::other("short netlink reply"));
            }
            let ty = u16::from_ne_bytes([buf[4], buf[5]]);
            let rseq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
            if rseq != seq {
                continue; // a stale ack of an earlier request
            }
            if ty != libc::NLMSG_ERROR as u16 {
                return Err(io::Error::other(format!(
                    "unexpected netlink reply type {ty}"
                )));
            }
            let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            };
        }
    }
}

impl AsFd for RouteSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
