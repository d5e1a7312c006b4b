//! The forkd daemon.
//!
//! [`daemon`] is the composition root: it builds the parts from the validated
//! [`settings`], wires them and stops them. [`server`] speaks the protocol on
//! the socket, [`admission`] checks peers and requests and fills in defaults,
//! and [`sandbox`] turns one admitted request into one isolated child and its
//! result, using what [`state`] holds (zygotes, warm pools, cgroups). The daemon is a
//! multi-threaded tokio program and never forks: zygotes do
//! (see the `forkd-zygote` and `forkd-pool` crates).

pub mod admission;
pub mod audit;
pub mod branch_copy;
pub mod cli_session;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod io_limits;
pub mod locate;
pub mod metrics;
pub mod metrics_http;
pub mod network;
pub mod sandbox;
pub mod server;
pub mod session;
pub mod settings;
pub mod size;
pub mod start_error;
pub mod state;
pub mod subids;
pub(crate) mod sys;
pub mod systemd;
pub mod workspace;
pub mod ws_warm;

pub use config::Config;
pub use daemon::{start, start_with, Running, StartError};

/// Installs the log subscriber (`RUST_LOG` or `level`), once. `json`: one
/// JSON object per line (`timestamp`, `level`, `fields.message`, other
/// fields, `target`), for log collectors.
pub fn init_logging(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only for a person at a terminal, and never with NO_COLOR set
    // (https://no-color.org): log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
