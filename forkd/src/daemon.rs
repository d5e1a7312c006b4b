//! Daemon start-up and shutdown: configuration, cgroups, zygotes, the socket.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkd_pool::{Makers, NetnsStock, PoolPolicy, Recycle, Supervisor, WarmPool, ZygoteConfig};
use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Config;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "another forkd is already serving {0}; stop it first or pick another socket with --socket"
    )]
    AlreadyServed(PathBuf),
    #[error("cannot use socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroups: {0}\n(run as root on a host with cgroup v1 or v2 controllers, delegate a cgroup v2 subtree and set cgroup.v2_root, or set cgroup.mode = \"disabled\" to run without memory/cpu/pids limits)")]
    Cgroup(forkd_cgroup::Error),
    #[error("cannot find forkd's native zygote library {name}; looked in: {tried}. Build the whole workspace (`cargo build --release`) or set zygote_library in the config / FORKD_ZYGOTE_LIB")]
    Library { name: &'static str, tried: String },
    #[error("interpreter `{0}` for zygote `{1}` was not found (a bare name is looked up on PATH); set `python` to an existing interpreter, e.g. a venv's bin/python")]
    Python(PathBuf, String),
    #[error("{0}")]
    Zygote(String),
    #[error(transparent)]
    Metrics(#[from] crate::metrics_http::MetricsListenError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditOpenError),
}

/// The running daemon's shared state.
pub struct Daemon {
    pub config: Config,
    pub policies: BTreeMap<String, forkd_zygote::Policy>,
    pub pool: Arc<Supervisor>,
    pub cgroups: Arc<forkd_cgroup::Manager>,
    pub(crate) slots: Semaphore,
    pub(crate) netns: Arc<Option<NetnsStock>>,
    /// Warm pools by zygote name.
    pub warm: std::collections::HashMap<String, WarmPool>,
    next_id: Arc<AtomicU64>,
    next_connection: AtomicU64,
    shutdown: watch::Sender<bool>,
    socket: PathBuf,
    /// False when systemd bound the socket (socket activation): the file is
    /// then its to keep, for the next activation.
    owns_socket_file: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The audit log, when `audit_log` is configured.
    pub audit: Option<crate::audit::AuditLog>,
    /// Egress for requests with `allow_net`.
    pub network: crate::network::Network,
}

impl Daemon {
    pub fn next_sandbox_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn next_connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Sandboxes running right now.
    pub fn running(&self) -> usize {
        self.config.max_concurrent - self.slots.available_permits()
    }
}

/// Resolves once shutdown has begun.
pub async fn stopping(rx: &mut watch::Receiver<bool>) {
    // The guard wait_for returns must not live across an await point.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Socket path by precedence: explicit, config, `FORKD_SOCKET`, default.
pub fn socket_path(explicit: Option<&Path>, config: &Config) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| config.socket.clone())
        .unwrap_or_else(forkd_ipc::client::default_socket_path)
}

/// Locates `libforkd_zygote.so`: `explicit`, else `FORKD_ZYGOTE_LIB`, else
/// next to the executable (and its parent, for test binaries).
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, StartError> {
    let name = forkd_zygote::LIBRARY_FILE_NAME;
    let mut candidates = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else if let Some(p) = std::env::var_os("FORKD_ZYGOTE_LIB") {
        candidates.push(PathBuf::from(p));
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(name));
            // Test binaries live in target/<profile>/deps.
            candidates.push(dir.join("..").join(name));
            candidates.push(dir.join("../lib/forkd").join(name));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| StartError::Library {
            name,
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Resolves a zygote's interpreter: a path as given (made absolute, symlinks
/// kept), or a bare name on PATH.
pub fn find_python(python: &Path, zygote: &str) -> Result<PathBuf, StartError> {
    if python.components().count() > 1 {
        // Absolute but not canonical: a venv's python is a symlink whose
        // location is what selects the venv.
        return match std::path::absolute(python) {
            Ok(p) if p.exists() => Ok(p),
            _ => Err(StartError::Python(python.to_path_buf(), zygote.into())),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(python))
        .find(|p| p.is_file())
        .ok_or_else(|| StartError::Python(python.to_path_buf(), zygote.into()))
}

/// Everything [`start`] checks before it starts anything: the configuration's
/// rules, the policies, the native library and every zygote's interpreter
/// (what `forkd --check-config` runs).
pub fn preflight(config: &Config) -> Result<(), StartError> {
    config.validate()?;
    config.load_policies()?;
    find_library(config.zygote_library.as_deref())?;
    for z in config.zygote_sections() {
        find_python(&z.python, &z.name)?;
    }
    Ok(())
}

/// Replaces a stale socket file; refuses if a live daemon answers on it.
fn claim_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, StartError> {
    let sock_err = |source| StartError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(sock_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(sock_err)?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket may be taken for a stale one and removed: anything
        // else at the path (a mistyped --socket naming a regular file, say)
        // is refused rather than deleted.
        if !meta.file_type().is_socket() {
            return Err(sock_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; remove it or pick another socket path",
            )));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(StartError::AlreadyServed(path.to_path_buf())),
            Err(_) => {
                tracing::info!(socket = %path.display(), "removing stale socket file");
                std::fs::remove_file(path).map_err(sock_err)?;
            }
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(sock_err)?;
    listener.set_nonblocking(true).map_err(sock_err)?;
    Ok(listener)
}

/// Serves the socket systemd bound, with the mode forkd gives its own
/// socket (0660: owner and group, as set by SocketUser=/SocketGroup=).
fn adopt_activated(
    a: crate::systemd::Activated,
) -> Result<std::os::unix::net::UnixListener, StartError> {
    std::fs::set_permissions(&a.path, std::fs::Permissions::from_mode(0o660)).map_err(
        |source| StartError::Socket {
            path: a.path.clone(),
            source,
        },
    )?;
    tracing::info!(socket = %a.path.display(), "socket-activated: serving the socket systemd passed");
    Ok(a.listener)
}

/// A started daemon: serving until [`Running::shutdown`].
pub struct Running {
    pub daemon: Arc<Daemon>,
    server: tokio::task::JoinHandle<()>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Running {
    pub fn socket_path(&self) -> &Path {
        self.daemon.socket_path()
    }

    /// The metrics endpoint's TCP address, when it listens on TCP (the
    /// actual port when the configuration asked for port 0).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting, kills running sandboxes (reported as
    /// `killed_by: shutdown`), waits up to the grace period for their replies,
    /// stops the zygotes, removes every cgroup and the socket file.
    pub async fn shutdown(self) {
        let d = &self.daemon;
        tracing::info!(running = d.running(), "shutting down");
        let _ = d.shutdown.send(true);
        let grace = d.config.shutdown_grace();
        let deadline = tokio::time::Instant::now() + grace;
        while d.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the connections flush the final replies.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.server).await;
        if let Some(task) = self.metrics_server {
            let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
        }
        for (name, pool) in &d.warm {
            let s = pool.stats();
            tracing::info!(
                zygote = %name,
                hits = s.hits.load(Ordering::Relaxed),
                misses = s.misses.load(Ordering::Relaxed),
                refills = s.refills.load(Ordering::Relaxed),
                "warm pool stopped"
            );
            pool.shutdown().await;
        }
        d.pool.shutdown(Duration::from_secs(2)).await;
        let stock = d.netns.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(stock) = stock.as_ref() {
                stock.stop();
            }
        })
        .await;
        let cgroups = d.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = cgroups.shutdown() {
                tracing::warn!("removing cgroups at shutdown: {e}");
            }
        })
        .await;
        if d.owns_socket_file {
            let _ = std::fs::remove_file(&d.socket);
        }
        if let Some(audit) = &d.audit {
            // Last, so that every request finished above has queued its record.
            audit.close().await;
        }
        tracing::info!("forkd stopped");
    }
}

/// Starts a daemon: cgroups, zygotes (waiting until each has imported its
/// preload modules), then the socket.
pub async fn start(config: Config, socket: Option<&Path>) -> Result<Running, StartError> {
    start_with(config, socket, None).await
}

/// [`start`], serving the socket systemd passed when `activated` is given
/// (see [`crate::systemd`]) instead of binding one.
pub async fn start_with(
    config: Config,
    socket: Option<&Path>,
    activated: Option<crate::systemd::Activated>,
) -> Result<Running, StartError> {
    config.validate()?;
    let policies = config.load_policies()?;
    let network = crate::network::Network::start(&config.network, sys::euid() == 0)?;
    let configured = socket_path(socket, &config);
    let socket = match &activated {
        Some(a) => {
            if (socket.is_some() || config.socket.is_some()) && configured != a.path {
                tracing::warn!(configured = %configured.display(), activated = %a.path.display(), "socket-activated: serving systemd's socket, not the configured path");
            }
            a.path.clone()
        }
        None => configured,
    };

    // Everything that can fail without side effects first, so that a bad
    // library or interpreter path leaves no cgroups behind.
    let library = find_library(config.zygote_library.as_deref())?;
    let init = forkd_zygote::InitConfig {
        policies: policies.clone(),
        interpreter_paths: Vec::new(),
        hostname: config.hostname.clone(),
    };
    let mut zygotes = Vec::new();
    for z in config.zygote_sections() {
        let python = find_python(&z.python, &z.name)?;
        zygotes.push((
            ZygoteConfig {
                name: z.name.clone(),
                python,
                preload: z.preload.clone(),
                env: z.env.clone(),
                library: library.clone(),
                init: init.clone(),
                start_timeout: Duration::from_secs(z.start_timeout_secs),
                rootless: sys::euid() != 0,
            },
            Recycle {
                max_forks: z.max_forks,
                max_age: z.max_age_secs.map(Duration::from_secs),
            },
        ));
    }
    let cgroups = match forkd_cgroup::Manager::new(&config.cgroup) {
        Ok(m) => m,
        Err(e) if sys::euid() != 0 && config.cgroup.mode == forkd_cgroup::ModeChoice::Auto => {
            tracing::warn!("no usable cgroup for an unprivileged daemon ({e}); memory, cpu and pids limits are NOT enforced and every result says so (cgroup_enforced: false)");
            let disabled = forkd_cgroup::Config {
                mode: forkd_cgroup::ModeChoice::Disabled,
                ..config.cgroup.clone()
            };
            forkd_cgroup::Manager::new(&disabled).map_err(StartError::Cgroup)?
        }
        Err(e) => return Err(StartError::Cgroup(e)),
    };
    match cgroups.cleanup_stale() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            removed = n,
            "removed sandbox cgroups left by a daemon that died"
        ),
        Err(e) => tracing::warn!("cleaning up stale cgroups: {e}"),
    }
    let cgroups = Arc::new(cgroups);
    tracing::info!(mode = ?cgroups.mode(), enforced = cgroups.limits_enforced(), "cgroups ready");

    let pool = Supervisor::start(zygotes);
    if let Err(e) = pool.wait_ready().await {
        pool.shutdown(Duration::from_secs(1)).await;
        let _ = cgroups.shutdown();
        return Err(StartError::Zygote(e.to_string()));
    }

    let metrics = Arc::new(crate::metrics::Metrics::new());
    let bound = async {
        let metrics_listener = match config.metrics()? {
            Some(listen) => Some(crate::metrics_http::Listener::bind(&listen).await?),
            None => None,
        };
        let audit = match &config.audit_log {
            Some(path) => Some(crate::audit::AuditLog::open(
                path,
                config.audit_payloads,
                metrics.clone(),
            )?),
            None => None,
        };
        Ok::<_, StartError>((metrics_listener, audit))
    }
    .await;
    let (metrics_listener, audit) = match bound {
        Ok(b) => b,
        Err(e) => {
            pool.shutdown(Duration::from_secs(1)).await;
            let _ = cgroups.shutdown();
            return Err(e);
        }
    };

    let owns_socket_file = activated.is_none();
    let claimed = match activated {
        Some(a) => adopt_activated(a),
        None => claim_socket(&socket),
    };
    // Registering the socket with tokio (epoll) can fail too: undo the same.
    let listener = claimed.and_then(|l| {
        UnixListener::from_std(l).map_err(|source| {
            if owns_socket_file {
                let _ = std::fs::remove_file(&socket);
            }
            StartError::Socket {
                path: socket.clone(),
                source,
            }
        })
    });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            pool.shutdown(Duration::from_secs(1)).await;
            let _ = cgroups.shutdown();
            return Err(e);
        }
    };
    let (shutdown, _) = watch::channel(false);
    let netns = Arc::new(if sys::euid() == 0 {
        NetnsStock::start(config.netns_stock)
    } else {
        None
    });
    let pool = Arc::new(pool);
    let next_id = Arc::new(AtomicU64::new(1));
    let makers = Makers {
        supervisor: pool.clone(),
        cgroups: cgroups.clone(),
        netns: netns.clone(),
        ids: next_id.clone(),
    };
    let mut warm = std::collections::HashMap::new();
    for z in config
        .zygote_sections()
        .iter()
        .filter(|z| z.warm_pool_bounds().1 > 0)
    {
        let defaults = config.limits.default.applied(cgroups.limits_enforced());
        let plan = crate::sandbox::plan_for(config.default_policy.clone(), &defaults);
        let (min, max) = z.warm_pool_bounds();
        let policy = PoolPolicy {
            target: z.warm_pool,
            min,
            max,
            shrink_after: Duration::from_secs(z.warm_shrink_after_secs),
            refill_concurrency: z.warm_refill_concurrency,
            max_idle: z.warm_max_idle_secs.map(Duration::from_secs),
        };
        warm.insert(
            z.name.clone(),
            WarmPool::start(&z.name, plan, policy, makers.clone()),
        );
    }
    let daemon = Arc::new(Daemon {
        slots: Semaphore::new(config.max_concurrent),
        netns,
        warm,
        config,
        policies,
        pool,
        cgroups,
        next_id,
        next_connection: AtomicU64::new(1),
        shutdown,
        socket,
        owns_socket_file,
        metrics,
        audit,
        network,
    });
    tracing::info!(socket = %daemon.socket.display(), "forkd listening");
    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(crate::metrics_http::Listener::local_addr);
    if let Ok(Some(listen)) = daemon.config.metrics() {
        let shown = match metrics_addr {
            Some(a) => format!("http://{a}/metrics"),
            None => listen.to_string(),
        };
        tracing::info!(endpoint = %shown, "serving metrics");
    }
    let metrics_server =
        metrics_listener.map(|l| tokio::spawn(crate::metrics_http::serve(daemon.clone(), l)));
    if let Some(path) = &daemon.config.audit_log {
        tracing::info!(path = %path.display(), payloads = daemon.config.audit_payloads, "audit log open");
    }
    let server = tokio::spawn(crate::server::serve(daemon.clone(), listener));
    Ok(Running {
        daemon,
        server,
        metrics_server,
        metrics_addr,
    })
}
