//! Why the daemon did not start, each variant saying what to do.

use std::path::PathBuf;

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
