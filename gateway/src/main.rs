//! `forkd-gateway`: the E2B-compatible HTTP gateway as its own process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Serves E2B's API (control plane, envd, code interpreter) over HTTP, as a
/// client of a forkd daemon.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The daemon's socket.
    #[arg(long, env = "FORKD_SOCKET")]
    socket: Option<PathBuf>,
    /// Address to listen on (set E2B_API_URL and E2B_SANDBOX_URL to
    /// http://ADDR).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// API key file: one `KEY [TENANT]` per line, `#` comments; reloaded on
    /// SIGHUP. Without it any key is accepted as one tenant.
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Allow a non-loopback --listen address.
    #[arg(long)]
    allow_remote: bool,
    /// Largest /files upload, bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_upload: usize,
    /// Most sandboxes (with their code contexts) one tenant may hold at once.
    #[arg(long)]
    max_sessions_per_tenant: Option<usize>,
    /// Most cells one tenant may run at once (more: 429).
    #[arg(long)]
    max_cells_per_tenant: Option<usize>,
    /// Most checkpoints one tenant may hold at once (more: 429).
    #[arg(long)]
    max_checkpoints_per_tenant: Option<usize>,
    /// Seconds a client may take to send a request head (slowloris).
    #[arg(long, default_value_t = 30)]
    header_timeout_secs: u64,
    /// Serve Prometheus metrics at GET /metrics on this address (loopback
    /// unless --allow-remote).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log level when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// This node's name, carried in the sandbox ids handed out
    /// (`s-HEX--NODE`) so that other nodes' gateways forward requests for
    /// them here (default: the host name; dots become '-').
    #[arg(long, env = "FORKD_NODE")]
    node: Option<String>,
    /// Another node's gateway: NAME=http://HOST:PORT (repeatable).
    #[arg(long = "peer", value_name = "NAME=URL")]
    peers: Vec<String>,
    /// Address of a node not given with --peer, with {node} in it (e.g.
    /// http://{node}.forkd-gateway.forkd.svc.cluster.local:3000).
    #[arg(long, env = "FORKD_PEER_URL")]
    peer_url: Option<String>,
    /// Print the OpenAPI document (gateway/openapi.json) and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", forkd_gateway::openapi::document_json());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("forkd-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut opts = forkd_gateway::Options::new(
            args.socket
                .unwrap_or_else(forkd_ipc::client::default_socket_path),
        );
        opts.api_keys = args.api_keys;
        opts.max_upload = args.max_upload;
        opts.max_sessions_per_tenant = args.max_sessions_per_tenant;
        opts.max_cells_per_tenant = args.max_cells_per_tenant;
        opts.max_checkpoints_per_tenant = args.max_checkpoints_per_tenant;
        opts.header_timeout = std::time::Duration::from_secs(args.header_timeout_secs.max(1));
        opts.node = Some(
            args.node
                .unwrap_or_else(forkd_gateway::forward::default_node),
        );
        for p in &args.peers {
            match forkd_gateway::forward::parse_peer(p) {
                Ok((name, url)) => {
                    opts.peers.insert(name, url);
                }
                Err(e) => {
                    eprintln!("forkd-gateway: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        opts.peer_url = args.peer_url;
        let gw = match forkd_gateway::Gateway::new(opts) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("forkd-gateway: {e}");
                return ExitCode::from(2);
            }
        };
        let listener = match forkd_gateway::bind(&gw, args.listen, args.allow_remote).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("forkd-gateway: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(addr) = args.metrics_listen {
            let ml = match forkd_gateway::bind(&gw, addr, args.allow_remote).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("forkd-gateway: metrics: {e}");
                    return ExitCode::from(2);
                }
            };
            let app = forkd_gateway::metrics_router(gw.clone());
            tokio::spawn(async move {
                if let Err(e) = forkd_gateway::serve_router(ml, app).await {
                    tracing::error!("metrics listener stopped: {e}");
                }
            });
        }
        tracing::info!(
            node = gw.node().unwrap_or_default(),
            "forkd-gateway listening on http://{}",
            args.listen
        );
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match forkd_gateway::serve(gw, listener, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("forkd-gateway: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
