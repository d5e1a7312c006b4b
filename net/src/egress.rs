//! Enforcing one sandbox's allowlist: routes, listeners, resolver and proxy.
//!
//! Everything happens in user space with a handful of kernel objects inside
//! the sandbox's own network namespace, made by the daemon before the
//! sandbox's program runs (so it works with any netfilter setup, or none):
//!
//! - A dedicated thread ([`Enforcer`]; not a tokio worker, and nothing forks)
//!   enters the child's namespace through its pidfd, brings `lo` up, opens an
//!   rtnetlink socket, a TCP listener on `[::]` for every allowed port, and
//!   the resolver's UDP and TCP sockets on port 53, then returns home. Sockets
//!   keep the namespace they were made in.
//! - Allowed networks, and later each address the resolver hands out, get a
//!   *local* route on `lo` (`ip route add local ADDR dev lo`): the sandbox's
//!   connection to such an address lands on the daemon's listener, whose
//!   accepted socket's local address is the original destination. Any other
//!   destination has no route at all: `connect` fails at once with
//!   ENETUNREACH, and an allowed address on a port without a listener gets
//!   ECONNREFUSED (the kernel's RST). Nothing leaves the namespace by itself:
//!   it has no other interface.
//! - The proxy (tokio tasks in the daemon, i.e. in the host's namespace)
//!   checks each accepted connection against the rules and the resolver's
//!   answers (with their TTL), then connects to the destination and copies
//!   bytes both ways, counting them. A refused one is reset (RST).
//! - The resolver (answering on `[::]:53`, which glibc uses when the sandbox
//!   has no resolv.conf, and any address made local) answers only allowed
//!   names, only with A/AAAA ([`crate::dns`]), asking the daemon's upstream
//!   resolvers.
//!
//! The namespace, its routes and sockets die with the sandbox; dropping
//! [`Egress`] stops its tasks and closes the daemon's sockets.
//!
//! A session may change its allowlist ([`Enforcer::update`]): new ports get
//! listeners and new networks routes, dropped networks lose theirs, and the
//! rules every later connection and query is checked against are swapped.
//! Connections already open stay open.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use forkd_ipc::{NetEvent, NetworkReport};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::bound::{Allowlist, Refusal};
use crate::dns::{self, Decision};
use crate::spec::{canonical, Cidr, PortRange};
use crate::sys::{self, RouteSocket};

/// Daemon-wide settings of the egress path.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the sandbox resolver sends allowed queries (from the daemon's
    /// namespace).
    pub resolvers: Vec<SocketAddr>,
    /// Longest wait for a destination to accept a proxied connection.
    pub connect_timeout: Duration,
    /// Most distinct ports one sandbox may open (one listener each).
    pub max_ports: usize,
    /// Most events kept in a sandbox's log.
    pub max_log: usize,
    /// Most addresses the resolver may open for one sandbox.
    pub max_addresses: usize,
    /// Most proxied connections open at once per sandbox (each holds two
    /// 64 KiB buffers in the daemon); more are reset.
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            resolvers: system_resolvers(),
            connect_timeout: Duration::from_secs(10),
            max_ports: 64,
            max_log: 256,
            max_addresses: 1024,
            max_connections: 128,
        }
    }
}

/// The host's resolvers from /etc/resolv.conf (port 53).
pub fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.split('%').next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The resolver's port inside the sandbox.
pub const DNS_PORT: u16 = 53;
/// How long the child may take to enter its network namespace.
const ENTER_TIMEOUT: Duration = Duration::from_secs(5);
/// In-flight DNS queries per sandbox; more are dropped (the stub retries).
const DNS_INFLIGHT: usize = 64;
/// How long the list of the host's own addresses is trusted.
const HOST_ADDRESSES_TTL: Duration = Duration::from_secs(5);

/// The daemon's own addresses (its namespace's interfaces), refreshed every
/// few seconds: a proxied connection to one would reach the host's services.
struct HostAddresses {
    cached: Mutex<(Instant, Vec<IpAddr>)>,
}

impl HostAddresses {
    fn new() -> HostAddresses {
        HostAddresses {
            cached: Mutex::new((Instant::now(), sys::local_addresses().unwrap_or_default())),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let Ok(mut c) = self.cached.lock() else {
            return true; // poisoned: refuse rather than guess
        };
        if c.0.elapsed() > HOST_ADDRESSES_TTL {
            // Runs on a tokio worker, i.e. in the daemon's namespace.
            if let Ok(list) = sys::local_addresses() {
                *c = (Instant::now(), list);
            }
        }
        c.1.iter().any(|a| canonical(*a) == ip)
    }
}
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("allow_net opens more than {max} distinct ports (a rule without a port opens all 65535); forkd listens on each allowed port inside the sandbox: name the ports, e.g. HOST:443 or CIDR:8000-8010")]
    TooManyPorts { max: usize },
    #[error("setting up the sandbox's network failed: {0}")]
    Setup(io::Error),
    #[error("forkd's egress thread has stopped; restart forkd")]
    ThreadGone,
}

/// What the setup thread makes inside a sandbox's namespace.
struct Opened {
    routes: RouteSocket,
    listeners: Vec<std::net::TcpListener>,
    /// The resolver's sockets (made once, by the first set-up).
    dns: Option<(std::net::UdpSocket, std::net::TcpListener)>,
}

struct SetupJob {
    pidfd: OwnedFd,
    networks: Vec<Cidr>,
    ports: Vec<u16>,
    /// Open the resolver's sockets too (false for an update).
    resolver: bool,
    reply: oneshot::Sender<io::Result<Opened>>,
}

/// The daemon's egress machinery: the setup thread and the settings.
pub struct Enforcer {
    jobs: Mutex<mpsc::Sender<SetupJob>>,
    config: Arc<Config>,
    host: Arc<HostAddresses>,
}

impl Enforcer {
    /// Starts the setup thread.
    pub fn start(config: Config) -> io::Result<Enforcer> {
        let home = sys::current_netns()?;
        let home_id = sys::ns_id(home.as_fd())?;
        let (tx, rx) = mpsc::channel::<SetupJob>();
        std::thread::Builder::new()
            .name("forkd-egress".into())
            .spawn(move || {
                for job in rx {
                    let r = setup(home.as_fd(), home_id, &job);
                    let poisoned = matches!(&r, Err((_, true)));
                    let _ = job.reply.send(r.map_err(|(e, _)| e));
                    if poisoned {
                        // Could not return home: this thread must not make
                        // anything for another sandbox.
                        tracing::error!("the egress thread could not return to the daemon's network namespace; egress is off until restart");
                        return;
                    }
                }
            })?;
        Ok(Enforcer {
            jobs: Mutex::new(tx),
            config: Arc::new(config),
            host: Arc::new(HostAddresses::new()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The ports `allow` needs listeners for, or why it cannot be enforced
    /// (checked at admission, before a child is taken).
    pub fn check(&self, allow: &Allowlist) -> Result<Vec<u16>, EgressError> {
        allow
            .ports(self.config.max_ports)
            .ok_or(EgressError::TooManyPorts {
                max: self.config.max_ports,
            })
    }

    /// Sets up egress for the child behind `pidfd` (isolated or about to
    /// be; it must not run its program before this returns).
    pub async fn attach(
        &self,
        pidfd: BorrowedFd<'_>,
        allow: Allowlist,
    ) -> Result<Egress, EgressError> {
        let ports = self.listened_ports(&allow)?;
        let opened = self
            .open(pidfd, allow.networks(), ports.clone(), true)
            .await?;
        Egress::run(allow, ports, self.config.clone(), self.host.clone(), opened)
            .map_err(EgressError::Setup)
    }

    /// Replaces the allowlist of the running sandbox behind `pidfd`, whose
    /// egress is `egress` (a session changing its list). New ports get
    /// listeners and new networks routes before the rules are swapped;
    /// names resolved before stay reachable while the new list allows them.
    pub async fn update(
        &self,
        egress: &Egress,
        pidfd: BorrowedFd<'_>,
        allow: Allowlist,
    ) -> Result<(), EgressError> {
        let state = &egress.state;
        let wanted = self.listened_ports(&allow)?;
        let have = lock(&egress.ports).clone();
        let new_ports: Vec<u16> = wanted.into_iter().filter(|p| !have.contains(p)).collect();
        let networks = allow.networks();
        let routed = state
            .networks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let new_networks: Vec<Cidr> = networks
            .iter()
            .filter(|n| !routed.contains(n))
            .copied()
            .collect();
        if !new_ports.is_empty() || !new_networks.is_empty() {
            let opened = self
                .open(pidfd, new_networks, new_ports.clone(), false)
                .await?;
            let mut tasks = lock(&egress.tasks);
            for l in opened.listeners {
                let l = TcpListener::from_std(l).map_err(EgressError::Setup)?;
                tasks.push(tokio::spawn(accept_loop(state.clone(), l)));
            }
            lock(&egress.ports).extend(new_ports);
        }
        // Dropped networks lose their routes: connecting there fails at once
        // again (addresses still answered for an allowed name get a host
        // route back below).
        {
            let routes = lock(&state.routes);
            for gone in routed.iter().filter(|n| !networks.contains(n)) {
                routes.del_local(gone).map_err(EgressError::Setup)?;
            }
        }
        *state
            .networks
            .write()
            .unwrap_or_else(PoisonError::into_inner) = networks.clone();
        let mut answered = lock(&state.answered);
        answered.retain(|_, a| {
            a.ports = allow.name_ports(&a.name);
            !a.ports.is_empty()
        });
        let routes = lock(&state.routes);
        for ip in answered.keys() {
            if !networks.iter().any(|n| n.contains(*ip)) {
                routes
                    .add_local(&Cidr::host(*ip))
                    .map_err(EgressError::Setup)?;
            }
        }
        *state.allow.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(allow);
        Ok(())
    }

    /// The ports `allow` needs a listener on (the resolver has its own).
    fn listened_ports(&self, allow: &Allowlist) -> Result<Vec<u16>, EgressError> {
        Ok(self
            .check(allow)?
            .into_iter()
            .filter(|p| *p != DNS_PORT)
            .collect())
    }

    /// Has the setup thread make routes and sockets inside the namespace.
    async fn open(
        &self,
        pidfd: BorrowedFd<'_>,
        networks: Vec<Cidr>,
        ports: Vec<u16>,
        resolver: bool,
    ) -> Result<Opened, EgressError> {
        let (reply, rx) = oneshot::channel();
        let job = SetupJob {
            pidfd: pidfd.try_clone_to_owned().map_err(EgressError::Setup)?,
            networks,
            ports,
            resolver,
            reply,
        };
        self.jobs
            .lock()
            .map_err(|_| EgressError::ThreadGone)?
            .send(job)
            .map_err(|_| EgressError::ThreadGone)?;
        rx.await
            .map_err(|_| EgressError::ThreadGone)?
            .map_err(EgressError::Setup)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs on the setup thread. The error's flag is true when the thread could
/// not return to its own namespace.
fn setup(
    home: BorrowedFd<'_>,
    home_id: (u64, u64),
    job: &SetupJob,
) -> Result<Opened, (io::Error, bool)> {
    let deadline = Instant::now() + ENTER_TIMEOUT;
    let back = |e: io::Error| match sys::setns_net(home) {
        Ok(()) => (e, false),
        Err(h) => (io::Error::other(format!("{e}; returning home: {h}")), true),
    };
    loop {
        sys::setns_net(job.pidfd.as_fd()).map_err(|e| (e, false))?;
        let here = sys::current_netns().and_then(|f| sys::ns_id(f.as_fd()));
        match here {
            Ok(id) if id != home_id => break,
            Ok(_) => {}
            Err(e) => return Err(back(e)),
        }
        // The child has not left the daemon's namespace yet.
        sys::setns_net(home).map_err(|e| (e, true))?;
        if Instant::now() > deadline {
            return Err((
                io::Error::other("the sandbox did not enter its network namespace in time"),
                false,
            ));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    let made = open_inside(&job.networks, &job.ports, job.resolver);
    match sys::setns_net(home) {
        Ok(()) => made.map_err(|e| (e, false)),
        Err(e) => Err((e, true)),
    }
}

/// A wildcard listener (dual-stack when the namespace has IPv6).
fn listener(port: u16) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let make = |v6: bool| -> io::Result<Socket> {
        let (domain, addr): (Domain, SocketAddr) = if v6 {
            (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into())
        } else {
            (Domain::IPV4, ([0, 0, 0, 0], port).into())
        };
        let s = Socket::new(domain, Type::STREAM.cloexec(), None)?;
        if v6 {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(256)?;
        Ok(s)
    };
    make(true).or_else(|_| make(false)).map(Into::into)
}

fn dns_udp() -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let make = |v6: bool| -> io::Result<Socket> {
        let (domain, addr): (Domain, SocketAddr) = if v6 {
            (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, DNS_PORT).into())
        } else {
            (Domain::IPV4, ([0, 0, 0, 0], DNS_PORT).into())
        };
        let s = Socket::new(domain, Type::DGRAM.cloexec(), None)?;
        if v6 {
            s.set_only_v6(false)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    make(true).or_else(|_| make(false)).map(Into::into)
}

fn open_inside(networks: &[Cidr], ports: &[u16], resolver: bool) -> io::Result<Opened> {
    let ctx =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    sys::loopback_up().map_err(ctx("bring lo up"))?;
    let routes = RouteSocket::open().map_err(ctx("open rtnetlink"))?;
    for n in networks {
        routes.add_local(n).map_err(ctx("add a local route"))?;
    }
    let listeners = ports
        .iter()
        .map(|p| listener(*p))
        .collect::<io::Result<Vec<_>>>()
        .map_err(ctx("listen on an allowed port"))?;
    let dns = if resolver {
        Some((
            dns_udp().map_err(ctx("open the resolver's UDP socket"))?,
            listener(DNS_PORT).map_err(ctx("open the resolver's TCP socket"))?,
        ))
    } else {
        None
    };
    Ok(Opened {
        routes,
        listeners,
        dns,
    })
}

/// An address the resolver handed out.
struct Answered {
    ports: Vec<PortRange>,
    until: Instant,
    name: String,
}

struct Counters {
    bytes: [AtomicU64; 2],
}

struct State {
    /// The rules in force (swapped whole by [`Enforcer::update`]).
    allow: RwLock<Arc<Allowlist>>,
    config: Arc<Config>,
    host: Arc<HostAddresses>,
    conn_slots: Arc<Semaphore>,
    /// Networks with a local route.
    networks: RwLock<Vec<Cidr>>,
    routes: Mutex<RouteSocket>,
    answered: Mutex<HashMap<IpAddr, Answered>>,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    dns_queries: AtomicU64,
    dns_refused: AtomicU64,
    log: Mutex<Log>,
    dns_slots: Semaphore,
}

#[derive(Default)]
struct Log {
    events: Vec<(NetEvent, Option<Arc<Counters>>)>,
    truncated: bool,
}

impl State {
    fn allow(&self) -> Arc<Allowlist> {
        self.allow
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, event: NetEvent, counters: Option<Arc<Counters>>) {
        if let Ok(mut log) = self.log.lock() {
            if log.events.len() < self.config.max_log {
                log.events.push((event, counters));
            } else {
                log.truncated = true;
            }
        }
    }

    /// The verdict on a connection to `ip:port`: the name it was resolved
    /// for (if any), or why not.
    fn verdict(&self, ip: IpAddr, port: u16) -> Result<Option<String>, Refusal> {
        if self.host.contains(ip) {
            return Err(Refusal::HostAddress);
        }
        let by_rule = match self.allow().check_address(ip, port) {
            Ok(()) => true,
            Err(r @ Refusal::Denied(_)) => return Err(r),
            Err(_) => false,
        };
        let answered = self.answered.lock().map_err(|_| Refusal::NotAllowed)?;
        match answered.get(&ip) {
            Some(a) if a.until > Instant::now() && a.ports.iter().any(|p| p.contains(port)) => {
                Ok(Some(a.name.clone()))
            }
            // The name is only for the log when an address rule allows it.
            Some(a) if by_rule => Ok(Some(a.name.clone())),
            _ if by_rule => Ok(None),
            _ => Err(Refusal::NotAllowed),
        }
    }

    /// Makes `ip` reachable on `ports` until `ttl` from now.
    fn open(&self, ip: IpAddr, ttl: Duration, ports: &[PortRange], name: &str) -> io::Result<()> {
        let until = Instant::now() + ttl;
        let mut answered = self
            .answered
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        if let Some(a) = answered.get_mut(&ip) {
            a.until = a.until.max(until);
            for p in ports {
                if !a.ports.contains(p) {
                    a.ports.push(*p);
                }
            }
            return Ok(());
        }
        if answered.len() >= self.config.max_addresses {
            return Err(io::Error::other(
                "too many resolved addresses for one sandbox",
            ));
        }
        // Inside an allowed network the route exists already. Routes of
        // answered addresses stay until the sandbox ends: removing one
        // would break connections still open to it; a new connection after
        // the TTL is refused by the proxy instead.
        let routed = self
            .networks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|n| n.contains(ip));
        if !routed {
            self.routes
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .add_local(&Cidr::host(ip))?;
        }
        answered.insert(
            ip,
            Answered {
                ports: ports.to_vec(),
                until,
                name: name.to_string(),
            },
        );
        Ok(())
    }
}

/// One sandbox's egress, running until dropped.
pub struct Egress {
    state: Arc<State>,
    /// Ports with a listener inside the sandbox.
    ports: Mutex<BTreeSet<u16>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Egress {
    fn drop(&mut self) {
        for t in lock(&self.tasks).iter() {
            t.abort();
        }
    }
}

impl Egress {
    fn run(
        allow: Allowlist,
        ports: Vec<u16>,
        config: Arc<Config>,
        host: Arc<HostAddresses>,
        opened: Opened,
    ) -> io::Result<Egress> {
        let state = Arc::new(State {
            networks: RwLock::new(allow.networks()),
            allow: RwLock::new(Arc::new(allow)),
            conn_slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            host,
            routes: Mutex::new(opened.routes),
            answered: Mutex::new(HashMap::new()),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            dns_queries: AtomicU64::new(0),
            dns_refused: AtomicU64::new(0),
            log: Mutex::new(Log::default()),
            dns_slots: Semaphore::new(DNS_INFLIGHT),
        });
        let mut tasks = Vec::new();
        for l in opened.listeners {
            let l = TcpListener::from_std(l)?;
            tasks.push(tokio::spawn(accept_loop(state.clone(), l)));
        }
        if let Some((udp, tcp)) = opened.dns {
            let udp = UdpSocket::from_std(udp)?;
            tasks.push(tokio::spawn(dns_udp_loop(state.clone(), Arc::new(udp))));
            let tcp = TcpListener::from_std(tcp)?;
            tasks.push(tokio::spawn(dns_tcp_loop(state.clone(), tcp)));
        }
        Ok(Egress {
            state,
            ports: Mutex::new(ports.into_iter().collect()),
            tasks: Mutex::new(tasks),
        })
    }

    /// Stops the proxy (open connections are cut) and reports.
    pub fn finish(self) -> NetworkReport {
        for t in lock(&self.tasks).iter() {
            t.abort();
        }
        let s = &self.state;
        let (log, log_truncated) = match s.log.lock() {
            Ok(l) => (
                l.events
                    .iter()
                    .map(|(e, c)| {
                        let mut e = e.clone();
                        if let Some(c) = c {
                            e.bytes_out = c.bytes[0].load(Ordering::Relaxed);
                            e.bytes_in = c.bytes[1].load(Ordering::Relaxed);
                        }
                        e
                    })
                    .collect(),
                l.truncated,
            ),
            Err(_) => (Vec::new(), true),
        };
        NetworkReport {
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            connections_allowed: s.allowed.load(Ordering::Relaxed),
            connections_denied: s.denied.load(Ordering::Relaxed),
            dns_queries: s.dns_queries.load(Ordering::Relaxed),
            dns_refused: s.dns_refused.load(Ordering::Relaxed),
            log,
            log_truncated,
        }
    }
}

fn reset(stream: &TcpStream) {
    // Linger 0: close sends RST, so the program sees a reset at once.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn accept_loop(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(proxy(state.clone(), stream));
    }
}

async fn proxy(state: Arc<State>, inside: TcpStream) {
    let Ok(dst) = inside.local_addr() else { return };
    let ip = canonical(dst.ip());
    let port = dst.port();
    let mut event = NetEvent {
        kind: "connect".into(),
        destination: ip.to_string(),
        port: Some(port),
        ..NetEvent::default()
    };
    let host = match state.verdict(ip, port) {
        Ok(host) => host,
        Err(why) => {
            state.denied.fetch_add(1, Ordering::Relaxed);
            event.reason = Some(why.to_string());
            state.record(event, None);
            reset(&inside);
            return;
        }
    };
    event.host = host;
    let Ok(_slot) = state.conn_slots.clone().try_acquire_owned() else {
        state.denied.fetch_add(1, Ordering::Relaxed);
        event.reason = Some(format!(
            "more than {} connections open at once",
            state.config.max_connections
        ));
        state.record(event, None);
        reset(&inside);
        return;
    };
    let target = SocketAddr::new(ip, port);
    let outside = match tokio::time::timeout(
        state.config.connect_timeout,
        TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            state.denied.fetch_add(1, Ordering::Relaxed);
            event.reason = Some(format!("allowed, but the destination: {e}"));
            state.record(event, None);
            reset(&inside);
            return;
        }
        Err(_) => {
            state.denied.fetch_add(1, Ordering::Relaxed);
            event.reason = Some("allowed, but the destination did not answer in time".into());
            state.record(event, None);
            reset(&inside);
            return;
        }
    };
    state.allowed.fetch_add(1, Ordering::Relaxed);
    event.allowed = true;
    let counters = Arc::new(Counters {
        bytes: [AtomicU64::new(0), AtomicU64::new(0)],
    });
    state.record(event, Some(counters.clone()));
    let _ = inside.set_nodelay(true);
    let _ = outside.set_nodelay(true);
    let (ir, iw) = inside.into_split();
    let (or, ow) = outside.into_split();
    tokio::join!(
        pump(ir, ow, &counters.bytes[0], &state.bytes_out),
        pump(or, iw, &counters.bytes[1], &state.bytes_in),
    );
}

/// Copies until EOF or an error, counting, then shuts the writer down.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: &AtomicU64,
    total: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Counted before the write: once written, the sandbox may read the
        // bytes, exit and have its result (with these counters) built before
        // this task runs again. A failed write takes its count back.
        conn.fetch_add(n as u64, Ordering::Relaxed);
        total.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            conn.fetch_sub(n as u64, Ordering::Relaxed);
            total.fetch_sub(n as u64, Ordering::Relaxed);
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn dns_udp_loop(state: Arc<State>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(permit) = state.dns_slots.try_acquire() else {
            continue; // flooded: dropped, the stub retries
        };
        let packet = buf[..n].to_vec();
        let (state, sock) = (state.clone(), sock.clone());
        permit.forget();
        tokio::spawn(async move {
            if let Some(answer) = answer(&state, &packet).await {
                let _ = sock.send_to(&answer, peer).await;
            }
            state.dns_slots.add_permits(1);
        });
    }
}

async fn dns_tcp_loop(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                let read = async {
                    let len = stream.read_u16().await?;
                    let mut q = vec![0u8; usize::from(len)];
                    stream.read_exact(&mut q).await?;
                    io::Result::Ok(q)
                };
                let Ok(Ok(q)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
                    return;
                };
                let Some(a) = answer(&state, &q).await else {
                    return;
                };
                let Ok(len) = u16::try_from(a.len()) else {
                    return;
                };
                if stream.write_u16(len).await.is_err() || stream.write_all(&a).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The sandbox resolver's answer to one query (`None`: not a query).
async fn answer(state: &State, packet: &[u8]) -> Option<Vec<u8>> {
    let query = dns::parse_query(packet)?;
    state.dns_queries.fetch_add(1, Ordering::Relaxed);
    let refuse = |name: String, rcode: ResponseCode, reason: String| {
        state.dns_refused.fetch_add(1, Ordering::Relaxed);
        state.record(
            NetEvent {
                kind: "dns".into(),
                destination: name,
                reason: Some(reason),
                ..NetEvent::default()
            },
            None,
        );
        dns::reply(&query, rcode, Vec::new())
    };
    let qname = query
        .queries()
        .first()
        .map(|q| dns::plain(q.name()))
        .unwrap_or_default();
    let allow = state.allow();
    let (name, rtype, ports) = match dns::decide(&query, &allow) {
        Decision::Reply(ResponseCode::NXDomain) => {
            return Some(refuse(
                qname,
                ResponseCode::NXDomain,
                "not on the allowlist".into(),
            ))
        }
        Decision::Reply(rcode) => return Some(dns::reply(&query, rcode, Vec::new())),
        Decision::Resolve { name, rtype, ports } => (name, rtype, ports),
    };
    let upstream = match ask_upstream(&state.config.resolvers, &name, rtype).await {
        Ok(m) => m,
        Err(e) => {
            return Some(refuse(
                qname,
                ResponseCode::ServFail,
                format!("upstream: {e}"),
            ))
        }
    };
    if upstream.response_code() != ResponseCode::NoError {
        let rcode = upstream.response_code();
        return Some(refuse(qname, rcode, format!("upstream answered {rcode}")));
    }
    let filtered = dns::filter(&upstream, &name, rtype, &allow);
    let mut failed = None;
    for (ip, ttl) in &filtered.reachable {
        if let Err(e) = state.open(*ip, *ttl, &ports, &qname) {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        return Some(refuse(
            qname,
            ResponseCode::ServFail,
            format!("opening an answered address: {e}"),
        ));
    }
    if filtered.reachable.is_empty() && !filtered.refused.is_empty() {
        let why: Vec<String> = filtered
            .refused
            .iter()
            .map(|(ip, r)| format!("{ip}: {r}"))
            .collect();
        return Some(refuse(qname, ResponseCode::Refused, why.join("; ")));
    }
    Some(dns::reply(&query, ResponseCode::NoError, filtered.records))
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 2 {
        // Fall back on the clock: the id is a spoofing speed bump, not a secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let [lo, hi, ..] = (t ^ (t >> 16)).to_le_bytes();
        return u16::from_le_bytes([lo, hi]);
    }
    u16::from_ne_bytes(b)
}

/// Asks the upstream resolvers in order; TCP when the UDP answer is truncated.
async fn ask_upstream(
    resolvers: &[SocketAddr],
    name: &Name,
    rtype: RecordType,
) -> io::Result<Message> {
    let mut last = io::Error::other("no upstream resolver is configured ([network] resolvers)");
    for server in resolvers {
        match ask_one(*server, name, rtype).await {
            Ok(m) => return Ok(m),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn ask_one(server: SocketAddr, name: &Name, rtype: RecordType) -> io::Result<Message> {
    let id = random_id();
    let q = dns::upstream_query(id, name, rtype);
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(&q).await?;
    let mut buf = vec![0u8; 4096];
    let valid = |m: &Message| m.id() == id && m.queries().first().map(|x| x.name()) == Some(name);
    let m = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if let Ok(m) = Message::from_bytes(&buf[..n]) {
                if valid(&m) {
                    return io::Result::Ok(m);
                }
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{server} did not answer")))??;
    if !m.truncated() {
        return Ok(m);
    }
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let mut s = TcpStream::connect(server).await?;
        let len =
            u16::try_from(q.len()).map_err(|_| std::io::Error::other("DNS query over 64 KiB"))?;
        s.write_u16(len).await?;
        s.write_all(&q).await?;
        let len = s.read_u16().await?;
        let mut b = vec![0u8; usize::from(len)];
        s.read_exact(&mut b).await?;
        let m = Message::from_bytes(&b).map_err(io::Error::other)?;
        if valid(&m) {
            Ok(m)
        } else {
            Err(io::Error::other(
                "upstream TCP answer does not match the query",
            ))
        }
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{server} did not answer over TCP"),
        )
    })?
}
