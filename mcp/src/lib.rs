//! `forkd mcp`: a Model Context Protocol server on stdio (built with the
//! official Rust SDK, `rmcp`) that gives an MCP client (Claude Desktop, an
//! agent framework, the MCP Python SDK) forkd's sandboxes as tools: run
//! Python one-shot or in a session, manage sessions, run shell commands,
//! read, write and list files.
//!
//! It is a client of a running daemon (the socket of `forkd`): it holds one
//! multiplexed connection, made on first use and remade after it breaks, so
//! a daemon that is down makes each tool call fail with a message saying how
//! to start it, never a hang. User code that fails (an exception, a non-zero
//! exit, a timeout) is a tool result with `is_error: true`; bad arguments are
//! tool errors too (the model can correct them), as the MCP specification
//! asks. Sessions created through it are killed when it exits (its stdin
//! closes, or SIGINT/SIGTERM) unless created with `keep: true`.

#![warn(missing_docs)]

pub mod args;
pub mod render;
pub mod server;

use std::path::PathBuf;
use std::time::Duration;

use rmcp::ServiceExt as _;

pub use server::ForkdMcp;

/// How long the exit waits for the kills of this server's sessions.
const EXIT_KILL_WAIT: Duration = Duration::from_secs(10);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The MCP handshake on stdio failed (the client sent no valid
    /// `initialize`, or stdin closed first).
    #[error("MCP initialization on stdio failed: {0}; start forkd mcp from an MCP client")]
    Init(String),
    /// The server task failed.
    #[error("the MCP server stopped abnormally: {0}")]
    Run(String),
}

/// Serves MCP on stdin/stdout for the daemon at `socket` until stdin closes
/// or SIGINT/SIGTERM arrives, then kills the sessions it created (those
/// without `keep`). Logs go to stderr only: stdout is the protocol.
pub async fn serve_stdio(socket: PathBuf) -> Result<(), ServeError> {
    let server = ForkdMcp::new(socket);
    let owned = server.owned();
    let daemon = server.daemon();
    let outcome = run_until_closed(server).await;
    let ids = owned.take();
    let n = ids.len();
    let killed = server::kill_all(&daemon, ids, EXIT_KILL_WAIT).await;
    if n > 0 {
        tracing::info!(
            killed,
            of = n,
            "killed the sessions this MCP server created"
        );
    }
    outcome
}

async fn run_until_closed(server: ForkdMcp) -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| ServeError::Init(e.to_string()))?;
    let token = running.cancellation_token();
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let signalled = async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = running.waiting() => r.map(|_| ()).map_err(|e| ServeError::Run(e.to_string())),
        () = signalled => {
            token.cancel();
            Ok(())
        }
    }
}
