//! `forkd`: the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs isolated Python sandboxes forked from warm zygotes, served on a Unix socket.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "forkd: runs isolated Python sandboxes forked from warm zygotes, served on a Unix socket"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (every key is optional; see README).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Socket path (overrides the config; default /run/forkd/forkd.sock as root,
    /// $XDG_RUNTIME_DIR/forkd/forkd.sock otherwise).
    #[arg(long, env = "FORKD_SOCKET")]
    socket: Option<PathBuf>,
    /// Interpreter of the default zygote (overrides the config), e.g. a venv's bin/python.
    #[arg(long, global = true)]
    python: Option<PathBuf>,
    /// Comma-separated preload modules of the default zygote (overrides the config).
    #[arg(long, value_delimiter = ',', global = true)]
    preload: Option<Vec<String>>,
    /// Log level when RUST_LOG is unset: error, warn, info, debug, trace, or
    /// a filter like `info,forkd_pool=debug`.
    #[arg(long, default_value = "info", global = true, value_parser = parse_log_level)]
    log_level: String,
    /// Log line format (overrides the config's log_format).
    #[arg(long, value_enum)]
    log_format: Option<forkd::config::LogFormat>,
    /// Serve Prometheus metrics at GET /metrics on this loopback IP:port or
    /// Unix socket path (overrides the config's metrics_listen).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Check the configuration (and that its interpreters and the zygote
    /// library exist) and exit.
    #[arg(long)]
    check_config: bool,
    /// Also serve the E2B-compatible HTTP gateway on this address, as a client
    /// of this daemon's socket (docs/e2b.md; `forkd-gateway` runs it alone).
    /// Overrides `[http] listen` in the configuration.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// The gateway's API key file: `KEY [TENANT]` per line, reloaded on SIGHUP.
    #[arg(long, requires = "http")]
    api_keys: Option<PathBuf>,
    /// Let --http listen on a non-loopback address.
    #[arg(long, requires = "http")]
    http_allow_remote: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check this machine and the configuration: kernel, namespaces, cgroups,
    /// landlock, seccomp, interpreters and preload imports, then one sandbox
    /// end to end. One PASS/WARN/FAIL line per check; exit status 1 if any failed.
    Doctor,
    /// Serve MCP (Model Context Protocol) on stdin/stdout as a client of the
    /// daemon's socket: tools to run Python (one-shot or in sessions), run
    /// shell commands and move files. Sessions it creates are killed when it
    /// exits unless created with keep=true. See README "MCP server".
    Mcp {
        /// Socket of the daemon to use (default as for the daemon:
        /// $FORKD_SOCKET, else the `socket` of -c FILE, else
        /// /run/forkd/forkd.sock as root).
        #[arg(long = "socket", env = "FORKD_SOCKET")]
        daemon_socket: Option<PathBuf>,
    },
    /// One of the doctor's probes, run in a child process (internal).
    #[command(name = "__probe", hide = true)]
    Probe { what: String },
}

/// A bare word that is not a level would silently become a filter for a
/// module of that name (and hide every log line): refuse it.
fn parse_log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_filter = s.contains('=') || s.contains(',') || s.contains("::");
    if LEVELS.contains(&s.to_ascii_lowercase().as_str()) || is_filter {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a level: use one of {} or a filter like `info,forkd_pool=debug`",
            LEVELS.join(", ")
        ))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Probe { what }) = &args.command {
        return match forkd::doctor::probe(what) {
            Ok(detail) => {
                println!("{detail}");
                ExitCode::SUCCESS
            }
            Err(detail) => {
                println!("{detail}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Mcp { daemon_socket }) = &args.command {
        // --socket or FORKD_SOCKET, then the config's socket (-c FILE), then the default.
        let from_config = match &args.config {
            Some(path) => match forkd::Config::load(path) {
                Ok(c) => c.socket,
                Err(e) => {
                    eprintln!("forkd mcp: {e}");
                    return ExitCode::from(2);
                }
            },
            None => None,
        };
        let socket = daemon_socket
            .clone()
            .or(args.socket.clone())
            .or(from_config);
        return mcp(socket, &args.log_level);
    }
    let mut config = match &args.config {
        Some(path) => match forkd::Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("forkd: {e}");
                return ExitCode::from(2);
            }
        },
        None => forkd::Config::default(),
    };
    forkd::config::apply_overrides(&mut config, args.python.clone(), args.preload.clone());
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if let Some(listen) = &args.metrics_listen {
        config.metrics_listen = Some(listen.clone());
    }
    let json_logs = config.log_format == forkd::config::LogFormat::Json;
    if let Some(Command::Doctor) = args.command {
        // Only the doctor's own warnings; the private daemon it starts is quiet.
        forkd::init_logging("warn", json_logs);
        println!("{}", forkd::doctor::describe(args.config.as_deref()));
        let checks = forkd::doctor::run(&config, |c| println!("{c}"));
        return ExitCode::from(forkd::doctor::exit_code(&checks));
    }
    forkd::init_logging(&args.log_level, json_logs);
    if args.check_config {
        let h = &config.http;
        if let Err(e) =
            forkd_gateway::forward::Peers::new(h.node.as_deref(), &h.peers, h.peer_url.as_deref())
        {
            eprintln!("forkd: [http]: {e}");
            return ExitCode::from(2);
        }
        return match forkd::daemon::preflight(&config) {
            Ok(()) => {
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("forkd: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Before the runtime starts any thread (it edits the environment).
    let activated = match forkd::systemd::take_listener() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("forkd: socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("forkd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let http = config.http.clone();
    runtime.block_on(async move {
        let running = match forkd::start_with(config, args.socket.as_deref(), activated).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("forkd: {e}");
                return ExitCode::FAILURE;
            }
        };
        let gateway = match args.http.or(http.listen) {
            Some(addr) => match start_gateway(&running, addr, &args, &http).await {
                Ok(g) => Some(g),
                Err(e) => {
                    eprintln!("forkd: --http: {e}");
                    running.shutdown().await;
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        forkd::systemd::notify("READY=1");
        wait_for_signal().await;
        forkd::systemd::notify("STOPPING=1");
        if let Some((stop, task)) = gateway {
            let _ = stop.send(());
            let _ = task.await;
        }
        // A second SIGTERM or SIGINT ends the drain at once.
        running
            .shutdown_with(async {
                wait_for_signal().await;
                tracing::info!("second signal: forcing shutdown");
            })
            .await;
        ExitCode::SUCCESS
    })
}

/// Starts the E2B gateway on `addr` against this daemon's socket; returns
/// what stops it.
async fn start_gateway(
    running: &forkd::daemon::Running,
    addr: std::net::SocketAddr,
    args: &Args,
    http: &forkd::config::HttpSection,
) -> Result<
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    forkd_gateway::StartError,
> {
    let mut opts = forkd_gateway::Options::new(running.socket_path().to_owned());
    opts.api_keys = args.api_keys.clone().or_else(|| http.api_keys.clone());
    opts.max_sessions_per_tenant = http.max_sessions_per_tenant;
    opts.max_cells_per_tenant = http.max_cells_per_tenant;
    opts.max_checkpoints_per_tenant = http.max_checkpoints_per_tenant;
    if let Some(secs) = http.header_timeout_secs {
        opts.header_timeout = std::time::Duration::from_secs(secs.max(1));
    }
    opts.node = Some(
        http.node
            .clone()
            .unwrap_or_else(forkd_gateway::forward::default_node),
    );
    opts.peers = http.peers.clone();
    opts.peer_url = http.peer_url.clone();
    let gw = forkd_gateway::Gateway::new(opts)?;
    let allow_remote = args.http_allow_remote || http.allow_remote;
    let listener = forkd_gateway::bind(&gw, addr, allow_remote).await?;
    tracing::info!("E2B gateway listening on http://{addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = forkd_gateway::serve(gw, listener, async {
            let _ = stopped.await;
        })
        .await
        {
            tracing::error!("E2B gateway stopped: {e}");
        }
    });
    Ok((stop, task))
}

/// `forkd mcp`: stdout carries the protocol, so logs go to stderr (the
/// default "info" is lowered to "warn" to keep a client's log quiet).
fn mcp(socket: Option<PathBuf>, log_level: &str) -> ExitCode {
    forkd::init_logging(
        if log_level == "info" {
            "warn"
        } else {
            log_level
        },
        false,
    );
    let socket = socket.unwrap_or_else(forkd_ipc::client::default_socket_path);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("forkd mcp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(forkd_mcp::serve_stdio(socket));
    // A read of stdin may still be pending in a blocking thread: do not wait for it.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd mcp: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon could not stop cleanly; run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
