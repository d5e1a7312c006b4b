//! Session operations of the Rust clients (protocol version 2).
//!
//! Waits: a cell or command waits for its `timeout_ms` plus
//! [`REPLY_GRACE`] (or [`DEFAULT_SPAWN_WAIT`] plus it when unset); every
//! other session call waits [`REPLY_GRACE`]. `with_timeout` overrides both.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::{
    unexpected, AsyncClient, BodyRef, Client, ClientError, ReplyStream, DEFAULT_SPAWN_WAIT,
    REPLY_GRACE,
};
use crate::protocol::{RequestBody, Response, ResponseBody};
use crate::session::{
    CellResult, CheckpointInfo, CheckpointRef, Command, CommandInput, CommandKill, CommandResult,
    DisplayData, FileData, FileEntry, FilePath, FileRead, FileWrite, RunCode, SessionBranch,
    SessionCheckpoint, SessionCreate, SessionInfo, SessionList, SessionRef, SetNetwork, SetTtl,
    Stream, MAX_FILE_CHUNK,
};

/// A streamed event of a cell or command, before its final result.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Output as it was written.
    Output {
        /// stdout or stderr.
        stream: Stream,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A rich value a cell displayed.
    Display(DisplayData),
    /// The command runs with this pid.
    CommandStarted {
        /// Its pid inside the sandbox.
        pid: u32,
    },
}

impl Event {
    fn from_body(body: ResponseBody) -> Option<Event> {
        match body {
            ResponseBody::Output { stream, data } => Some(Event::Output { stream, data }),
            ResponseBody::Display(d) => Some(Event::Display(d)),
            ResponseBody::CommandStarted { pid } => Some(Event::CommandStarted { pid }),
            _ => None,
        }
    }
}

fn cell_wait(timeout_ms: Option<u64>) -> Duration {
    timeout_ms
        .map_or(DEFAULT_SPAWN_WAIT, Duration::from_millis)
        .saturating_add(REPLY_GRACE)
}

fn session_ref(id: &str) -> SessionRef {
    SessionRef {
        session: id.to_owned(),
    }
}

fn expect_session(op: &str, resp: Response) -> Result<SessionInfo, ClientError> {
    match resp.body {
        ResponseBody::Session(s) => Ok(s),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected(op, &other)),
    }
}

fn expect_done(op: &str, resp: Response) -> Result<(), ClientError> {
    match resp.body {
        ResponseBody::Done {} => Ok(()),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected(op, &other)),
    }
}

fn expect_cell(resp: Response) -> Result<CellResult, ClientError> {
    match resp.body {
        ResponseBody::Cell(c) => Ok(c),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("run_code", &other)),
    }
}

fn expect_command(resp: Response) -> Result<CommandResult, ClientError> {
    match resp.body {
        ResponseBody::Command(c) => Ok(c),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("command", &other)),
    }
}

fn expect_data(resp: Response) -> Result<FileData, ClientError> {
    match resp.body {
        ResponseBody::FileData(d) => Ok(d),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("file_read", &other)),
    }
}

fn expect_entries(resp: Response) -> Result<Vec<FileEntry>, ClientError> {
    match resp.body {
        ResponseBody::Files { entries } => Ok(entries),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("file_list", &other)),
    }
}

fn expect_stat(resp: Response) -> Result<FileEntry, ClientError> {
    match resp.body {
        ResponseBody::FileStat(e) => Ok(e),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("file_stat", &other)),
    }
}

fn expect_checkpoint(resp: Response) -> Result<CheckpointInfo, ClientError> {
    match resp.body {
        ResponseBody::Checkpoint(c) => Ok(c),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("session_checkpoint", &other)),
    }
}

fn expect_checkpoints(resp: Response) -> Result<Vec<CheckpointInfo>, ClientError> {
    match resp.body {
        ResponseBody::Checkpoints { checkpoints } => Ok(checkpoints),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("session_checkpoints", &other)),
    }
}

fn checkpoint_ref(id: &str, checkpoint: &str) -> CheckpointRef {
    CheckpointRef {
        session: id.to_owned(),
        checkpoint: checkpoint.to_owned(),
    }
}

fn expect_sessions(resp: Response) -> Result<Vec<SessionInfo>, ClientError> {
    match resp.body {
        ResponseBody::Sessions { sessions } => Ok(sessions),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("session_list", &other)),
    }
}

/// The chunks a write of `data` is sent in (one empty chunk for an empty file).
fn chunks(data: &[u8]) -> impl Iterator<Item = (bool, &[u8])> {
    let first = std::iter::once((false, &data[..data.len().min(MAX_FILE_CHUNK)]));
    let rest = data
        .get(MAX_FILE_CHUNK..)
        .unwrap_or_default()
        .chunks(MAX_FILE_CHUNK)
        .map(|c| (true, c));
    first.chain(rest)
}

impl Client {
    fn wait_or(&self, derived: Duration) -> Duration {
        self.timeout().unwrap_or(derived)
    }

    fn simple(&mut self, body: &RequestBody) -> Result<Response, ClientError> {
        let wait = self.wait_or(REPLY_GRACE);
        self.call_streaming(BodyRef::Any(body), wait, &mut |_| {})
    }

    /// Starts a session.
    pub fn session_create(&mut self, req: &SessionCreate) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionCreate(req.clone()))?;
        expect_session("session_create", resp)
    }

    /// The caller's sessions carrying every label in `labels`.
    pub fn session_list(
        &mut self,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<SessionInfo>, ClientError> {
        let resp = self.simple(&RequestBody::SessionList(SessionList { labels }))?;
        expect_sessions(resp)
    }

    /// One session's state and usage.
    pub fn session_info(&mut self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionInfo(session_ref(id)))?;
        expect_session("session_info", resp)
    }

    /// Ends a session.
    pub fn session_kill(&mut self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionKill(session_ref(id)))?;
        expect_session("session_kill", resp)
    }

    /// Freezes a session.
    pub fn session_pause(&mut self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionPause(session_ref(id)))?;
        expect_session("session_pause", resp)
    }

    /// Thaws a paused session.
    pub fn session_resume(&mut self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionResume(session_ref(id)))?;
        expect_session("session_resume", resp)
    }

    /// Sets the session's remaining lifetime.
    pub fn session_set_ttl(&mut self, id: &str, ttl_ms: u64) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionSetTtl(SetTtl {
            session: id.to_owned(),
            ttl_ms,
        }))?;
        expect_session("session_set_ttl", resp)
    }

    /// The session's overlay workspace changes so far, as a tar (the format
    /// of a spawn's `workspace_delta`).
    pub fn session_workspace_delta(&mut self, id: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self.simple(&RequestBody::SessionWorkspaceDelta(session_ref(id)))?;
        Ok(expect_data(resp)?.data)
    }

    /// Replaces the session's network allowlist (`allow_net` syntax).
    pub fn session_set_network(
        &mut self,
        id: &str,
        allow_net: &[String],
    ) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionSetNetwork(SetNetwork {
            session: id.to_owned(),
            allow_net: allow_net.to_vec(),
        }))?;
        expect_session("session_set_network", resp)
    }

    /// `count` copies of the live session (its interpreter state and
    /// scratch), each a new session in namespaces of its own; see
    /// [`SessionBranch`] for `same_seed` and `force`.
    pub fn session_branch(
        &mut self,
        branch: SessionBranch,
    ) -> Result<Vec<SessionInfo>, ClientError> {
        expect_sessions(self.simple(&RequestBody::SessionBranch(branch))?)
    }

    /// Keeps a frozen copy of the session (interpreter and scratch) to
    /// restore later; see [`SessionCheckpoint`].
    pub fn session_checkpoint(
        &mut self,
        id: &str,
        force: bool,
    ) -> Result<CheckpointInfo, ClientError> {
        expect_checkpoint(
            self.simple(&RequestBody::SessionCheckpoint(SessionCheckpoint {
                session: id.to_owned(),
                force,
                keep: false,
            }))?,
        )
    }

    /// [`Self::session_checkpoint`] with every option (`keep`: the
    /// checkpoint outlives the session's end).
    pub fn session_checkpoint_with(
        &mut self,
        req: SessionCheckpoint,
    ) -> Result<CheckpointInfo, ClientError> {
        expect_checkpoint(self.simple(&RequestBody::SessionCheckpoint(req))?)
    }

    /// Puts the session back in the state of `checkpoint` (same id; the
    /// checkpoint stays, to be restored again).
    pub fn session_restore(
        &mut self,
        id: &str,
        checkpoint: &str,
    ) -> Result<SessionInfo, ClientError> {
        let resp = self.simple(&RequestBody::SessionRestore(checkpoint_ref(id, checkpoint)))?;
        expect_session("session_restore", resp)
    }

    /// The session's checkpoints, oldest first.
    pub fn session_checkpoints(&mut self, id: &str) -> Result<Vec<CheckpointInfo>, ClientError> {
        expect_checkpoints(self.simple(&RequestBody::SessionCheckpoints(session_ref(id)))?)
    }

    /// Drops a checkpoint (its memory and scratch copy are freed).
    pub fn session_checkpoint_delete(
        &mut self,
        id: &str,
        checkpoint: &str,
    ) -> Result<(), ClientError> {
        let resp = self.simple(&RequestBody::SessionCheckpointDelete(checkpoint_ref(
            id, checkpoint,
        )))?;
        expect_done("session_checkpoint_delete", resp)
    }

    /// A streamed request: `on_event` sees its events, the final reply is
    /// returned.
    fn streamed(
        &mut self,
        body: &RequestBody,
        timeout_ms: Option<u64>,
        mut on_event: impl FnMut(Event),
    ) -> Result<Response, ClientError> {
        let wait = self.wait_or(cell_wait(timeout_ms));
        self.call_streaming(BodyRef::Any(body), wait, &mut |b| {
            if let Some(e) = Event::from_body(b) {
                on_event(e)
            }
        })
    }

    /// Runs a cell; `on_event` sees its output and displays as they come.
    pub fn run_code(
        &mut self,
        req: &RunCode,
        on_event: impl FnMut(Event),
    ) -> Result<CellResult, ClientError> {
        let body = RequestBody::RunCode(req.clone());
        expect_cell(self.streamed(&body, req.timeout_ms, on_event)?)
    }

    /// Interrupts the session's running cell.
    pub fn interrupt(&mut self, id: &str) -> Result<(), ClientError> {
        let resp = self.simple(&RequestBody::Interrupt(session_ref(id)))?;
        expect_done("interrupt", resp)
    }

    /// Runs a shell command; `on_event` sees its pid and output.
    pub fn command(
        &mut self,
        req: &Command,
        on_event: impl FnMut(Event),
    ) -> Result<CommandResult, ClientError> {
        let body = RequestBody::Command(req.clone());
        expect_command(self.streamed(&body, req.timeout_ms, on_event)?)
    }

    /// Kills a running command.
    pub fn command_kill(&mut self, id: &str, pid: u32) -> Result<(), ClientError> {
        let resp = self.simple(&RequestBody::CommandKill(CommandKill {
            session: id.to_owned(),
            pid,
        }))?;
        expect_done("command_kill", resp)
    }

    /// Sends `data` to the stdin of a command started with `stdin: true`
    /// (in requests of at most [`MAX_FILE_CHUNK`]), then closes it if
    /// `eof`. Returns once the executor holds the bytes, not when the
    /// command has read them.
    pub fn command_input(
        &mut self,
        id: &str,
        pid: u32,
        data: &[u8],
        eof: bool,
    ) -> Result<(), ClientError> {
        for req in input_requests(id, pid, data, eof) {
            let resp = self.simple(&RequestBody::CommandInput(req))?;
            expect_done("command_input", resp)?;
        }
        Ok(())
    }

    /// Writes a whole file, in chunks of at most [`MAX_FILE_CHUNK`].
    pub fn write_file(
        &mut self,
        id: &str,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        for (append, chunk) in chunks(data) {
            let resp = self.simple(&RequestBody::FileWrite(FileWrite {
                session: id.to_owned(),
                path: path.to_owned(),
                data: chunk.to_vec(),
                append,
                mode,
            }))?;
            expect_done("file_write", resp)?;
        }
        Ok(())
    }

    /// Reads one chunk of a file.
    pub fn read_file_chunk(
        &mut self,
        id: &str,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<FileData, ClientError> {
        let resp = self.simple(&RequestBody::FileRead(FileRead {
            session: id.to_owned(),
            path: path.to_owned(),
            offset,
            length,
        }))?;
        expect_data(resp)
    }

    /// Reads a whole file, chunk by chunk.
    pub fn read_file(&mut self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read_file_chunk(id, path, out.len() as u64, None)?;
            out.extend_from_slice(&chunk.data);
            if chunk.eof || chunk.data.is_empty() {
                return Ok(out);
            }
        }
    }

    fn path_op(&mut self, body: RequestBody) -> Result<Response, ClientError> {
        self.simple(&body)
    }

    /// Lists a directory.
    pub fn list_files(&mut self, id: &str, path: &str) -> Result<Vec<FileEntry>, ClientError> {
        let resp = self.path_op(RequestBody::FileList(file_path(id, path)))?;
        expect_entries(resp)
    }

    /// Removes a file or a directory tree.
    pub fn remove_file(&mut self, id: &str, path: &str) -> Result<(), ClientError> {
        let resp = self.path_op(RequestBody::FileRemove(file_path(id, path)))?;
        expect_done("file_remove", resp)
    }

    /// Makes a directory and its parents.
    pub fn make_dir(&mut self, id: &str, path: &str) -> Result<(), ClientError> {
        let resp = self.path_op(RequestBody::FileMakeDir(file_path(id, path)))?;
        expect_done("file_make_dir", resp)
    }

    /// Stats a path.
    pub fn stat_file(&mut self, id: &str, path: &str) -> Result<FileEntry, ClientError> {
        let resp = self.path_op(RequestBody::FileStat(file_path(id, path)))?;
        expect_stat(resp)
    }
}

fn file_path(id: &str, path: &str) -> FilePath {
    FilePath {
        session: id.to_owned(),
        path: path.to_owned(),
    }
}

/// A cell or command running through an [`AsyncClient`]: its events as they
/// come, then its result. Dropping it before the result cancels the request
/// (the cell is interrupted, the command killed).
pub struct RequestStream {
    inner: ReplyStream,
    wait: tokio::time::Instant,
    op: &'static str,
    last: Option<Response>,
}

impl RequestStream {
    /// The next event; `Ok(None)` once the final result has arrived (take it
    /// with [`Self::cell`] or [`Self::command`]).
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        if self.last.is_some() {
            return Ok(None);
        }
        let reply = match tokio::time::timeout_at(self.wait, self.inner.next()).await {
            Ok(Some(r)) => r?,
            Ok(None) => return Ok(None),
            Err(_) => {
                return Err(ClientError::Timeout {
                    after: self.wait.elapsed(),
                })
            }
        };
        if reply.body.is_final() {
            self.last = Some(reply);
            return Ok(None);
        }
        Ok(Event::from_body(reply.body))
    }

    async fn finish(&mut self) -> Result<Response, ClientError> {
        while self.next_event().await?.is_some() {}
        self.last
            .take()
            .ok_or_else(|| ClientError::UnexpectedReply(format!("{} ended twice", self.op)))
    }

    /// The cell's result (skipping events not yet read).
    pub async fn cell(mut self) -> Result<CellResult, ClientError> {
        expect_cell(self.finish().await?)
    }

    /// The command's result (skipping events not yet read).
    pub async fn command(mut self) -> Result<CommandResult, ClientError> {
        expect_command(self.finish().await?)
    }

    /// The request's id on the connection.
    pub fn id(&self) -> u64 {
        self.inner.id()
    }
}

impl AsyncClient {
    fn wait_or(&self, derived: Duration) -> Duration {
        self.timeout().unwrap_or(derived)
    }

    async fn simple(&self, body: &RequestBody) -> Result<Response, ClientError> {
        let wait = self.wait_or(REPLY_GRACE);
        self.call_body(BodyRef::Any(body), wait).await
    }

    /// Starts a session.
    pub async fn session_create(&self, req: &SessionCreate) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionCreate(req.clone()))
            .await?;
        expect_session("session_create", resp)
    }

    /// The caller's sessions carrying every label in `labels`.
    pub async fn session_list(
        &self,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<SessionInfo>, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionList(SessionList { labels }))
            .await?;
        expect_sessions(resp)
    }

    /// One session's state and usage.
    pub async fn session_info(&self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionInfo(session_ref(id)))
            .await?;
        expect_session("session_info", resp)
    }

    /// Ends a session.
    pub async fn session_kill(&self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionKill(session_ref(id)))
            .await?;
        expect_session("session_kill", resp)
    }

    /// Freezes a session.
    pub async fn session_pause(&self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionPause(session_ref(id)))
            .await?;
        expect_session("session_pause", resp)
    }

    /// Thaws a paused session.
    pub async fn session_resume(&self, id: &str) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionResume(session_ref(id)))
            .await?;
        expect_session("session_resume", resp)
    }

    /// Sets the session's remaining lifetime.
    pub async fn session_set_ttl(&self, id: &str, ttl_ms: u64) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionSetTtl(SetTtl {
                session: id.to_owned(),
                ttl_ms,
            }))
            .await?;
        expect_session("session_set_ttl", resp)
    }

    /// The session's overlay workspace changes so far, as a tar (the format
    /// of a spawn's `workspace_delta`).
    pub async fn session_workspace_delta(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionWorkspaceDelta(session_ref(id)))
            .await?;
        Ok(expect_data(resp)?.data)
    }

    /// Replaces the session's network allowlist (`allow_net` syntax).
    pub async fn session_set_network(
        &self,
        id: &str,
        allow_net: &[String],
    ) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionSetNetwork(SetNetwork {
                session: id.to_owned(),
                allow_net: allow_net.to_vec(),
            }))
            .await?;
        expect_session("session_set_network", resp)
    }

    /// `count` copies of the live session (its interpreter state and
    /// scratch), each a new session in namespaces of its own; see
    /// [`SessionBranch`] for `same_seed` and `force`.
    pub async fn session_branch(
        &self,
        branch: SessionBranch,
    ) -> Result<Vec<SessionInfo>, ClientError> {
        expect_sessions(self.simple(&RequestBody::SessionBranch(branch)).await?)
    }

    /// Keeps a frozen copy of the session (interpreter and scratch) to
    /// restore later; see [`SessionCheckpoint`].
    pub async fn session_checkpoint(
        &self,
        id: &str,
        force: bool,
    ) -> Result<CheckpointInfo, ClientError> {
        expect_checkpoint(
            self.simple(&RequestBody::SessionCheckpoint(SessionCheckpoint {
                session: id.to_owned(),
                force,
                keep: false,
            }))
            .await?,
        )
    }

    /// [`Self::session_checkpoint`] with every option (`keep`: the
    /// checkpoint outlives the session's end).
    pub async fn session_checkpoint_with(
        &self,
        req: SessionCheckpoint,
    ) -> Result<CheckpointInfo, ClientError> {
        expect_checkpoint(self.simple(&RequestBody::SessionCheckpoint(req)).await?)
    }

    /// Puts the session back in the state of `checkpoint` (same id; the
    /// checkpoint stays, to be restored again).
    pub async fn session_restore(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> Result<SessionInfo, ClientError> {
        let resp = self
            .simple(&RequestBody::SessionRestore(checkpoint_ref(id, checkpoint)))
            .await?;
        expect_session("session_restore", resp)
    }

    /// The session's checkpoints, oldest first.
    pub async fn session_checkpoints(&self, id: &str) -> Result<Vec<CheckpointInfo>, ClientError> {
        expect_checkpoints(
            self.simple(&RequestBody::SessionCheckpoints(session_ref(id)))
                .await?,
        )
    }

    /// Drops a checkpoint (its memory and scratch copy are freed).
    pub async fn session_checkpoint_delete(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> Result<(), ClientError> {
        let resp = self
            .simple(&RequestBody::SessionCheckpointDelete(checkpoint_ref(
                id, checkpoint,
            )))
            .await?;
        expect_done("session_checkpoint_delete", resp)
    }

    /// A streamed request: its events, then its result, within `timeout_ms`
    /// plus the grace (or the client's own wait).
    async fn stream(
        &self,
        body: RequestBody,
        timeout_ms: Option<u64>,
        op: &'static str,
    ) -> Result<RequestStream, ClientError> {
        let wait = self.wait_or(cell_wait(timeout_ms));
        let inner = self.call_stream(BodyRef::Any(&body)).await?;
        Ok(RequestStream {
            inner,
            wait: tokio::time::Instant::now() + wait,
            op,
            last: None,
        })
    }

    /// Starts a cell; read its events and result from the stream.
    pub async fn run_code_stream(&self, req: &RunCode) -> Result<RequestStream, ClientError> {
        self.stream(
            RequestBody::RunCode(req.clone()),
            req.timeout_ms,
            "run_code",
        )
        .await
    }

    /// Runs a cell to its end.
    pub async fn run_code(&self, req: &RunCode) -> Result<CellResult, ClientError> {
        self.run_code_stream(req).await?.cell().await
    }

    /// Interrupts the session's running cell.
    pub async fn interrupt(&self, id: &str) -> Result<(), ClientError> {
        let resp = self
            .simple(&RequestBody::Interrupt(session_ref(id)))
            .await?;
        expect_done("interrupt", resp)
    }

    /// Starts a shell command; read its events and result from the stream.
    pub async fn command_stream(&self, req: &Command) -> Result<RequestStream, ClientError> {
        self.stream(RequestBody::Command(req.clone()), req.timeout_ms, "command")
            .await
    }

    /// Runs a shell command to its end.
    pub async fn command(&self, req: &Command) -> Result<CommandResult, ClientError> {
        self.command_stream(req).await?.command().await
    }

    /// Kills a running command.
    pub async fn command_kill(&self, id: &str, pid: u32) -> Result<(), ClientError> {
        let resp = self
            .simple(&RequestBody::CommandKill(CommandKill {
                session: id.to_owned(),
                pid,
            }))
            .await?;
        expect_done("command_kill", resp)
    }

    /// Sends `data` to the stdin of a command started with `stdin: true`,
    /// then closes it if `eof` (see [`Client::command_input`]).
    pub async fn command_input(
        &self,
        id: &str,
        pid: u32,
        data: &[u8],
        eof: bool,
    ) -> Result<(), ClientError> {
        for req in input_requests(id, pid, data, eof) {
            let resp = self.simple(&RequestBody::CommandInput(req)).await?;
            expect_done("command_input", resp)?;
        }
        Ok(())
    }

    /// Writes a whole file, in chunks of at most [`MAX_FILE_CHUNK`].
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        for (append, chunk) in chunks(data) {
            let resp = self
                .simple(&RequestBody::FileWrite(FileWrite {
                    session: id.to_owned(),
                    path: path.to_owned(),
                    data: chunk.to_vec(),
                    append,
                    mode,
                }))
                .await?;
            expect_done("file_write", resp)?;
        }
        Ok(())
    }

    /// Reads a whole file, chunk by chunk.
    pub async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let resp = self
                .simple(&RequestBody::FileRead(FileRead {
                    session: id.to_owned(),
                    path: path.to_owned(),
                    offset: out.len() as u64,
                    length: None,
                }))
                .await?;
            let chunk = expect_data(resp)?;
            out.extend_from_slice(&chunk.data);
            if chunk.eof || chunk.data.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Lists a directory.
    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>, ClientError> {
        let resp = self
            .simple(&RequestBody::FileList(file_path(id, path)))
            .await?;
        expect_entries(resp)
    }

    /// Removes a file or a directory tree.
    pub async fn remove_file(&self, id: &str, path: &str) -> Result<(), ClientError> {
        let resp = self
            .simple(&RequestBody::FileRemove(file_path(id, path)))
            .await?;
        expect_done("file_remove", resp)
    }

    /// Makes a directory and its parents.
    pub async fn make_dir(&self, id: &str, path: &str) -> Result<(), ClientError> {
        let resp = self
            .simple(&RequestBody::FileMakeDir(file_path(id, path)))
            .await?;
        expect_done("file_make_dir", resp)
    }

    /// Stats a path.
    pub async fn stat_file(&self, id: &str, path: &str) -> Result<FileEntry, ClientError> {
        let resp = self
            .simple(&RequestBody::FileStat(file_path(id, path)))
            .await?;
        expect_stat(resp)
    }
}

/// `command_input` requests for `data`: chunks of at most
/// [`MAX_FILE_CHUNK`], `eof` on the last (one empty request for no data).
fn input_requests(id: &str, pid: u32, data: &[u8], eof: bool) -> Vec<CommandInput> {
    let mut chunks: Vec<&[u8]> = data.chunks(MAX_FILE_CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| CommandInput {
            session: id.to_owned(),
            pid,
            data: c.to_vec(),
            eof: eof && i == last,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_chunked_with_append_after_the_first() {
        let empty: Vec<_> = chunks(&[]).collect();
        assert_eq!(empty, vec![(false, &[][..])]);
        let data = vec![7u8; MAX_FILE_CHUNK * 2 + 5];
        let parts: Vec<_> = chunks(&data).map(|(a, c)| (a, c.len())).collect();
        assert_eq!(
            parts,
            vec![(false, MAX_FILE_CHUNK), (true, MAX_FILE_CHUNK), (true, 5)]
        );
    }

    #[test]
    fn input_is_chunked_with_eof_on_the_last() {
        let close = input_requests("s", 3, &[], true);
        assert_eq!(close.len(), 1);
        assert!(close[0].eof && close[0].data.is_empty());
        let data = vec![1u8; MAX_FILE_CHUNK + 1];
        let parts: Vec<_> = input_requests("s", 3, &data, true)
            .into_iter()
            .map(|r| (r.data.len(), r.eof))
            .collect();
        assert_eq!(parts, vec![(MAX_FILE_CHUNK, false), (1, true)]);
        assert!(!input_requests("s", 3, b"x", false)[0].eof);
    }
}
