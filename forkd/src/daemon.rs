//! The composition root: builds the daemon's parts from its settings, wires
//! them together, and takes them down again in order.
//!
//! Start-up runs in steps, each undoing what the earlier ones made when it
//! fails: settings → zygote configurations (no side effects) → cgroups →
//! zygotes → metrics listener and audit log → socket → warm pools → serving.
//! Nothing else in the crate imports this module: handlers get narrow parts
//! ([`crate::state::State`], [`crate::admission::Admission`], metrics, audit).

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkd_pool::{Makers, NetnsStock, Recycle, Supervisor, WarmPool, ZygoteConfig};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::audit::AuditLog;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::state::State;
use crate::sys;

pub use crate::locate::{find_library, find_python, socket_path};
pub use crate::start_error::StartError;

/// Everything [`start`] checks before it starts anything: the configuration's
/// rules, the policies, the native library and every zygote's interpreter
/// (what `forkd --check-config` runs).
pub fn preflight(config: &Config) -> Result<(), StartError> {
    let settings = Settings::new(config.clone())?;
    find_library(settings.config.zygote_library.as_deref())?;
    for z in &settings.zygotes {
        find_python(&z.section.python, &z.section.name)?;
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
            // Only the default socket's directory is made: a mistyped
            // --socket must not leave a directory tree behind.
            if path != forkd_ipc::client::builtin_socket_path() {
                return Err(sock_err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "its directory {} does not exist; create it, or check the socket path for a typo (forkd creates only the directory of its default socket, {})",
                        dir.display(),
                        forkd_ipc::client::builtin_socket_path().display()
                    ),
                )));
            }
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
    /// What runs sandboxes (zygotes, warm pools, cgroups).
    pub daemon: Arc<State>,
    settings: Arc<Settings>,
    shutdown: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    socket: PathBuf,
    /// False when systemd bound the socket (socket activation): the file is
    /// then its to keep, for the next activation.
    owns_socket_file: bool,
    /// The bound socket file's (device, inode): at shutdown the path is
    /// removed only while it is still this file (a daemon started during
    /// the drain may have bound a new one there).
    socket_file: Option<(u64, u64)>,
    audit: Option<Arc<AuditLog>>,
    server: tokio::task::JoinHandle<()>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Running {
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The metrics endpoint's TCP address, when it listens on TCP (the
    /// actual port when the configuration asked for port 0).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Drains, then stops: [`Running::shutdown_with`] with nothing to cut
    /// the drain short.
    pub async fn shutdown(self) {
        self.shutdown_with(std::future::pending()).await
    }

    /// Stops accepting connections and new work (requests get
    /// `shutting_down`), lets running sandboxes finish for up to the grace
    /// period (`shutdown_grace_ms`; `force` ending cuts it short), then
    /// kills what still runs, sessions included (reported as
    /// `killed_by: shutdown`), waits briefly for their replies, stops the
    /// zygotes, removes every cgroup and the socket file.
    pub async fn shutdown_with(self, force: impl std::future::Future<Output = ()>) {
        let d = &self.daemon;
        tracing::info!(
            running = d.running(),
            grace = ?self.settings.shutdown_grace,
            "shutting down: draining"
        );
        let _ = self.draining.send(true);
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_grace;
        tokio::pin!(force);
        while d.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = &mut force => {
                    tracing::info!("shutdown forced: not waiting for running sandboxes");
                    break;
                }
            }
        }
        if d.running() > 0 {
            tracing::info!(running = d.running(), "killing what still runs");
        }
        let _ = self.shutdown.send(true);
        // The killed sandboxes' replies (a kill and a reap: milliseconds).
        let replies = tokio::time::Instant::now() + Duration::from_secs(2);
        while d.running() > 0 && tokio::time::Instant::now() < replies {
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
        let s = &d.ws_warm.stats;
        tracing::info!(
            hits = s.hits.load(Ordering::Relaxed),
            misses = s.misses.load(Ordering::Relaxed),
            refills = s.refills.load(Ordering::Relaxed),
            "warm workspace children stopped"
        );
        d.ws_warm.shutdown().await;
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
        if self.owns_socket_file && file_id(&self.socket) == self.socket_file {
            let _ = std::fs::remove_file(&self.socket);
        }
        if let Some(audit) = &self.audit {
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

/// The zygotes' launch configurations (no side effects: a bad library or
/// interpreter path fails here, before anything exists).
fn zygote_configs(
    settings: &Settings,
    subids: Option<&crate::subids::SubIds>,
) -> Result<Vec<(ZygoteConfig, Recycle)>, StartError> {
    let library = find_library(settings.config.zygote_library.as_deref())?;
    let init = forkd_zygote::InitConfig {
        policies: settings.policies.clone(),
        interpreter_paths: Vec::new(),
        hostname: settings.config.hostname.clone(),
    };
    settings
        .zygotes
        .iter()
        .map(|z| {
            let python = find_python(&z.section.python, &z.section.name)?;
            Ok((
                ZygoteConfig {
                    name: z.section.name.clone(),
                    python,
                    preload: z.section.preload.clone(),
                    env: z.section.env.clone(),
                    library: library.clone(),
                    init: init.clone(),
                    start_timeout: z.start_timeout,
                    rootless: sys::euid() != 0,
                    subids: subids.cloned(),
                },
                z.recycle,
            ))
        })
        .collect()
}

/// The cgroup manager, with stale sandbox cgroups of a dead daemon removed.
/// An unprivileged daemon without a usable cgroup runs without limits (and
/// every result says so).
fn cgroup_manager(config: &forkd_cgroup::Config) -> Result<forkd_cgroup::Manager, StartError> {
    let cgroups = match forkd_cgroup::Manager::new(config) {
        Ok(m) => m,
        Err(e) if sys::euid() != 0 && config.mode == forkd_cgroup::ModeChoice::Auto => {
            tracing::warn!("no usable cgroup for an unprivileged daemon ({e}); memory, cpu and pids limits are NOT enforced and every result says so (cgroup_enforced: false)");
            let disabled = forkd_cgroup::Config {
                mode: forkd_cgroup::ModeChoice::Disabled,
                ..config.clone()
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
    tracing::info!(mode = ?cgroups.mode(), enforced = cgroups.limits_enforced(), "cgroups ready");
    Ok(cgroups)
}

/// The metrics listener and the audit log, when configured.
async fn open_outputs(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<(Option<crate::metrics_http::Listener>, Option<Arc<AuditLog>>), StartError> {
    let metrics_listener = match &settings.metrics_listen {
        Some(listen) => Some(crate::metrics_http::Listener::bind(listen).await?),
        None => None,
    };
    let audit = match &settings.config.audit_log {
        Some(path) => Some(Arc::new(AuditLog::open(
            path,
            settings.config.audit_payloads,
            metrics.clone(),
        )?)),
        None => None,
    };
    Ok((metrics_listener, audit))
}

/// A path's (device, inode), not following a symlink.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The socket to serve: systemd's when activated, else one we bind.
fn listen(
    socket: &Path,
    activated: Option<crate::systemd::Activated>,
) -> Result<UnixListener, StartError> {
    let owns_socket_file = activated.is_none();
    let claimed = match activated {
        Some(a) => adopt_activated(a),
        None => claim_socket(socket),
    };
    // Registering the socket with tokio (epoll) can fail too: undo the same.
    claimed.and_then(|l| {
        UnixListener::from_std(l).map_err(|source| {
            if owns_socket_file {
                let _ = std::fs::remove_file(socket);
            }
            StartError::Socket {
                path: socket.to_path_buf(),
                source,
            }
        })
    })
}

/// One warm pool per zygote that asks for one, filled with children isolated
/// for the default policy and limits.
fn warm_pools(
    settings: &Settings,
    admission: &Admission,
    makers: &Makers,
) -> HashMap<String, WarmPool> {
    let plan = crate::sandbox::plan_for(
        settings.config.default_policy.clone(),
        &admission.default_limits(),
    );
    settings
        .zygotes
        .iter()
        .filter_map(|z| {
            let policy = z.warm?;
            let name = z.section.name.clone();
            let pool = WarmPool::start(&name, plan.clone(), policy, makers.clone());
            Some((name, pool))
        })
        .collect()
}

/// [`start`], serving the socket systemd passed when `activated` is given
/// (see [`crate::systemd`]) instead of binding one.
pub async fn start_with(
    config: Config,
    socket: Option<&Path>,
    activated: Option<crate::systemd::Activated>,
) -> Result<Running, StartError> {
    let settings = Arc::new(Settings::new(config)?);
    // Rootless: ids of its own per sandbox only with a subordinate range
    // (mapped by the zygotes); else one warning saying what to add.
    let subids = match sys::euid() {
        0 => None,
        euid => match crate::subids::why_not(&settings.config, euid) {
            Ok(sub) => {
                tracing::info!("{}", crate::doctor::rootless_subids_line(&sub));
                let _ = forkd_pool::uids::configure_subordinate(sub.count);
                Some(sub)
            }
            Err(missing) => {
                tracing::warn!(
                    "{}",
                    crate::doctor::rootless_shared_uid_warning(euid, &missing)
                );
                None
            }
        },
    };
    // Validated above; the first daemon of the process sets the range.
    let _ = forkd_pool::uids::configure(
        settings.config.sandbox_uid_base,
        settings.config.sandbox_uid_count,
    );
    let configured = socket_path(socket, &settings.config);
    let socket = match &activated {
        Some(a) => {
            if (socket.is_some() || settings.config.socket.is_some()) && configured != a.path {
                tracing::warn!(configured = %configured.display(), activated = %a.path.display(), "socket-activated: serving systemd's socket, not the configured path");
            }
            a.path.clone()
        }
        None => configured,
    };

    let network = crate::network::Network::start(
        &settings.config.network,
        &settings.config.zygotes,
        sys::euid() == 0,
    )?;
    let zygotes = zygote_configs(&settings, subids.as_ref())?;
    let cgroups = Arc::new(cgroup_manager(&crate::io_limits::cgroup_config(&settings))?);
    let pool = Supervisor::start(zygotes);
    // From here on a failure must stop the zygotes and remove the cgroups.
    let undo = |pool: Supervisor, cgroups: Arc<forkd_cgroup::Manager>| async move {
        pool.shutdown(Duration::from_secs(1)).await;
        let _ = cgroups.shutdown();
    };
    if let Err(e) = pool.wait_ready().await {
        undo(pool, cgroups).await;
        return Err(StartError::Zygote(e.to_string()));
    }
    let metrics = Arc::new(Metrics::new());
    let (metrics_listener, audit) = match open_outputs(&settings, &metrics).await {
        Ok(outputs) => outputs,
        Err(e) => {
            undo(pool, cgroups).await;
            return Err(e);
        }
    };
    let owns_socket_file = activated.is_none();
    let listener = match listen(&socket, activated) {
        Ok(l) => l,
        Err(e) => {
            undo(pool, cgroups).await;
            return Err(e);
        }
    };
    let socket_file = file_id(&socket);

    let (shutdown, shutdown_rx) = watch::channel(false);
    let (draining, draining_rx) = watch::channel(false);
    let netns = Arc::new(if sys::euid() == 0 {
        NetnsStock::start(settings.config.netns_stock)
    } else {
        None
    });
    let admission = Arc::new(Admission::new(
        &settings.config,
        &settings.policies,
        cgroups.limits_enforced(),
    ));
    let makers = Makers {
        supervisor: Arc::new(pool),
        cgroups,
        netns,
        ids: Arc::new(AtomicU64::new(1)),
        load: Arc::new(forkd_pool::Load::default()),
    };
    let warm = warm_pools(&settings, &admission, &makers);
    let state = Arc::new(State::new(
        &makers,
        warm,
        settings.max_concurrent,
        shutdown_rx.clone(),
        draining_rx.clone(),
        network,
        settings.config.workspace_warm.into(),
    ));
    tracing::info!(socket = %socket.display(), "forkd listening");

    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(crate::metrics_http::Listener::local_addr);
    if let Some(listen) = &settings.metrics_listen {
        let shown = match metrics_addr {
            Some(a) => format!("http://{a}/metrics"),
            None => listen.to_string(),
        };
        tracing::info!(endpoint = %shown, "serving metrics");
    }
    let sessions = Arc::new(crate::session::Sessions::new(
        state.clone(),
        admission.clone(),
        settings.config.sessions.clone(),
        audit.clone(),
        metrics.clone(),
    ));
    let metrics_server = metrics_listener.map(|l| {
        let (state, metrics, sessions) = (state.clone(), metrics.clone(), sessions.clone());
        let render: crate::metrics_http::Render = Arc::new(move || {
            let mut snapshot = state.snapshot();
            snapshot.sessions = sessions.snapshot();
            metrics.render(snapshot)
        });
        tokio::spawn(crate::metrics_http::serve(render, l, shutdown_rx.clone()))
    });
    if let Some(path) = &settings.config.audit_log {
        tracing::info!(path = %path.display(), payloads = settings.config.audit_payloads, "audit log open");
    }
    let server = Arc::new(crate::server::Server::new(
        state.clone(),
        admission,
        metrics,
        audit.clone(),
        settings.frames,
        sessions,
    ));
    let server = tokio::spawn(crate::server::serve(server, listener, draining_rx));
    Ok(Running {
        daemon: state,
        settings,
        shutdown,
        draining,
        socket,
        owns_socket_file,
        socket_file,
        audit,
        server,
        metrics_server,
        metrics_addr,
    })
}
