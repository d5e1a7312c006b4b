//! Session helpers the session, branch and checkpoint tests share: one
//! cell request, a cell's text (asserting it raised nothing), a default
//! session.

use forkd_ipc::{AsyncClient, RunCode, SessionCreate};

/// A cell with a 30 s timeout.
pub fn cell(session: &str, code: &str) -> RunCode {
    RunCode {
        session: session.into(),
        code: code.into(),
        timeout_ms: Some(30_000),
    }
}

/// The cell's trailing expression as text; panics (with its stderr) if the
/// cell raised.
pub async fn text(c: &AsyncClient, s: &str, code: &str) -> String {
    let r = c.run_code(&cell(s, code)).await.unwrap();
    assert!(
        r.error.is_none(),
        "{code}: {:?}\n{}",
        r.error,
        String::from_utf8_lossy(&r.stderr)
    );
    r.text.unwrap_or_default()
}

/// A session with the daemon's defaults; its id.
pub async fn create(c: &AsyncClient) -> String {
    c.session_create(&SessionCreate::default())
        .await
        .unwrap()
        .session
}
