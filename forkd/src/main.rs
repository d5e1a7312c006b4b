//! `forkd`: the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Runs isolated Python sandboxes forked from warm zygotes, served on a Unix socket.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "forkd: runs isolated Python sandboxes forked from warm zygotes, served on a Unix socket"
)]
struct Args {
    /// TOML configuration file (every key is optional; see README).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Socket path (overrides the config; default /run/forkd/forkd.sock as root,
    /// $XDG_RUNTIME_DIR/forkd/forkd.sock otherwise).
    #[arg(long, env = "FORKD_SOCKET")]
    socket: Option<PathBuf>,
    /// Interpreter of the default zygote (overrides the config), e.g. a venv's bin/python.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Comma-separated preload modules of the default zygote (overrides the config).
    #[arg(long, value_delimiter = ',')]
    preload: Option<Vec<String>>,
    /// Log level when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    forkd::init_logging(&args.log_level, false);
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
    if args.check_config {
        return match config
            .validate()
            .and_then(|_| config.load_policies().map(|_| ()))
        {
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
    runtime.block_on(async move {
        let running = match forkd::start_with(config, args.socket.as_deref(), activated).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("forkd: {e}");
                return ExitCode::FAILURE;
            }
        };
        forkd::systemd::notify("READY=1");
        wait_for_signal().await;
        forkd::systemd::notify("STOPPING=1");
        running.shutdown().await;
        ExitCode::SUCCESS
    })
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
