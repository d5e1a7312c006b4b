//! The opt-in metrics endpoint: `GET /metrics` over HTTP/1.1 on a loopback
//! TCP address or a Unix socket.
//!
//! A scrape endpoint needs one route and one request per connection, so this
//! is a deliberately tiny responder rather than an HTTP framework: it reads
//! one request head (bounded in size and time), answers, and closes. Anything
//! else gets 404/405/400. It shares the daemon's runtime and never blocks it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::MetricsListen;

/// A request head larger than this is refused (scrapers send a few hundred bytes).
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// A client must send its request head within this time.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes answered at once; more connections wait to be accepted.
const MAX_CONCURRENT_SCRAPES: usize = 16;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {listen}: {source}{}",
    listen_advice(source)
)]
pub struct MetricsListenError {
    listen: String,
    source: std::io::Error,
}

/// What to do about a failed bind of the metrics listener.
fn listen_advice(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "; another process listens there: stop it or choose another address (--metrics-listen, or metrics_listen in the config)",
        std::io::ErrorKind::PermissionDenied => "; choose a port above 1023 or a path the daemon may create",
        _ => "",
    }
}

/// A bound metrics listener, not yet serving.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `listen`. A Unix socket path is replaced if it is a stale socket
    /// and made 0660.
    pub async fn bind(listen: &MetricsListen) -> Result<Listener, MetricsListenError> {
        let err = |source| MetricsListenError {
            listen: listen.to_string(),
            source,
        };
        match listen {
            MetricsListen::Tcp(addr) => Ok(Listener::Tcp(
                tokio::net::TcpListener::bind(addr).await.map_err(err)?,
            )),
            MetricsListen::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket",
                        )));
                    }
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "another process serves this socket",
                        )));
                    }
                    std::fs::remove_file(path).map_err(err)?;
                }
                let l = tokio::net::UnixListener::bind(path).map_err(err)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(err)?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The bound TCP address (useful with port 0).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

/// Serves scrapes until shutdown begins; removes a Unix socket file on the way out.
/// What a scrape answers with: the OpenMetrics text at that moment.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

pub async fn serve(
    render: Render,
    listener: Listener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SCRAPES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = crate::state::stopping(&mut shutdown) => break,
        };
        match accepted {
            Ok(stream) => {
                let render = render.clone();
                tokio::spawn(async move {
                    answer(&*render, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn accept(listener: &Listener) -> std::io::Result<Box<dyn Stream>> {
    Ok(match listener {
        Listener::Tcp(l) => Box::new(l.accept().await?.0),
        Listener::Unix(l, _) => Box::new(l.accept().await?.0),
    })
}

/// Reads until the end of the request head (`\r\n\r\n`); `None` if the peer
/// closed, stalled, or sent too much.
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
            if head.len() > MAX_HEAD_BYTES {
                return None;
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, read).await.ok()??;
    Some(head)
}

/// (status line, content type, body) for a request line.
fn route(request_line: &str, render: &dyn Fn() -> String) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, render()),
        (_, "/metrics") => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics is served\n".into(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "forkd serves metrics at /metrics only\n".into(),
        ),
    }
}

async fn answer(render: &(dyn Fn() -> String + Send + Sync), mut stream: Box<dyn Stream>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let text = String::from_utf8_lossy(&head);
    let request_line = text.lines().next().unwrap_or("");
    let (status, content_type, body) =
        if request_line.ends_with(" HTTP/1.1") || request_line.ends_with(" HTTP/1.0") {
            route(request_line, render)
        } else {
            (
                "400 Bad Request",
                "text/plain; charset=utf-8",
                "not an HTTP/1.x request\n".into(),
            )
        };
    let head_only = request_line.starts_with("HEAD ");
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    let _ = tokio::time::timeout(HEAD_TIMEOUT, async {
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
