//! `forkd-run session ...` and `forkd-run repl`: sessions from the command
//! line (the binary dispatches here; kept in the library so the binary's
//! own file stays about one-shot runs).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use forkd_ipc::{
    AsyncClient, CellResult, ClientError, Command, Event, Limits, RunCode, SessionCreate,
    SessionInfo, Stream,
};

/// Sessions: interpreters that keep their state between cells.
#[derive(Parser, Debug)]
#[command(name = "forkd-run session")]
pub struct SessionCli {
    /// Socket of the daemon.
    #[arg(long, env = "FORKD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: SessionCmd,
}

#[derive(Subcommand, Debug)]
enum SessionCmd {
    /// Start a session; prints its id.
    Create {
        #[command(flatten)]
        opts: CreateOpts,
        /// Print the session as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List your sessions.
    Ls {
        /// Only sessions with this label (K=V, repeatable).
        #[arg(long = "label", value_parser = parse_pair)]
        labels: Vec<(String, String)>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One session's state and usage, as JSON.
    Info { id: String },
    /// Run a cell: -c CODE, a file, or stdin ("-" or nothing).
    Exec {
        id: String,
        /// The cell's code.
        #[arg(short = 'c', long = "code")]
        code: Option<String>,
        /// A file holding the cell ("-": stdin).
        file: Option<PathBuf>,
        /// Interrupt the cell after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Run a shell command in the session; its exit status is ours.
    Sh {
        id: String,
        /// The command line.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
        /// Working directory inside the sandbox.
        #[arg(long)]
        cwd: Option<String>,
        /// Kill it after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Copy a local file into the session ("-": stdin).
    Put {
        id: String,
        local: PathBuf,
        remote: String,
    },
    /// Copy a file out of the session ("-": stdout).
    Get {
        id: String,
        remote: String,
        local: PathBuf,
    },
    /// Replace the session's network allowlist (SPEC as --allow-net; none:
    /// no network for new connections). Prints the session as JSON.
    Net {
        id: String,
        /// Destinations: HOST[:PORTS], *.DOMAIN[:PORTS], CIDR[:PORTS].
        specs: Vec<String>,
    },
    /// Copy a live session (its interpreter state and scratch) into new
    /// sessions, each in namespaces of its own; prints their ids, one per
    /// line (docs/branch.md).
    Branch {
        id: String,
        /// How many copies.
        #[arg(short = 'k', long, default_value_t = 1)]
        count: u32,
        /// Keep the parent's PRNG states (random, numpy's global generator).
        #[arg(long)]
        same_seed: bool,
        /// Branch although the session runs threads of its own (a copy has
        /// only the thread that forked).
        #[arg(long)]
        force: bool,
        /// Print the new sessions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep a frozen copy of the session (interpreter and scratch) and print
    /// its id; with --list, print the session's checkpoints; with --delete,
    /// drop one.
    Checkpoint {
        id: String,
        /// Checkpoint although the session runs threads of its own.
        #[arg(long)]
        force: bool,
        /// Keep the checkpoint beyond the session's end (kill, TTL): the
        /// ended session can be restored from it
        /// (`[sessions] kept_checkpoint_ttl_secs`).
        #[arg(long)]
        keep: bool,
        /// List the session's checkpoints instead (id, age, scratch bytes,
        /// restores).
        #[arg(long, conflicts_with_all = ["delete", "force", "keep"])]
        list: bool,
        /// Drop this checkpoint instead.
        #[arg(long, value_name = "CHECKPOINT", conflicts_with_all = ["force", "keep"])]
        delete: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put the session back in the state of one of its checkpoints.
    Restore { id: String, checkpoint: String },
    /// Save the session's overlay workspace changes so far as a tar ("-":
    /// stdout).
    Delta { id: String, out: PathBuf },
    /// End a session.
    Kill { id: String },
}

/// What a new session gets.
#[derive(Args, Debug, Default)]
pub struct CreateOpts {
    /// Zygote to fork from.
    #[arg(long)]
    zygote: Option<String>,
    /// Lifetime in seconds.
    #[arg(long)]
    ttl: Option<f64>,
    /// Ended after this many idle seconds.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// A label K=V (repeatable).
    #[arg(long = "label", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Memory limit, e.g. 512M.
    #[arg(long, value_parser = crate::size::parse_size)]
    memory: Option<u64>,
    /// CPU limit in cores.
    #[arg(long)]
    cpus: Option<f64>,
}

/// `forkd-run repl`: an interactive session.
#[derive(Parser, Debug)]
#[command(name = "forkd-run repl")]
pub struct ReplCli {
    /// Socket of the daemon.
    #[arg(long, env = "FORKD_SOCKET")]
    socket: Option<PathBuf>,
    /// Use this session instead of starting one (it is not killed at exit).
    #[arg(long)]
    session: Option<String>,
    #[command(flatten)]
    opts: CreateOpts,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))
}

fn millis(secs: Option<f64>, what: &str) -> Result<Option<u64>, String> {
    match secs {
        None => Ok(None),
        #[allow(
            clippy::cast_possible_truncation,
            reason = "positive finite seconds; float-to-int casts saturate"
        )]
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some((t * 1000.0).ceil() as u64)),
        Some(t) => Err(format!("--{what} {t} must be a positive number of seconds")),
    }
}

impl CreateOpts {
    fn request(&self) -> Result<SessionCreate, String> {
        Ok(SessionCreate {
            zygote: self.zygote.clone(),
            env: self.env.iter().cloned().collect(),
            limits: Limits {
                memory_bytes: self.memory,
                cpus: self.cpus,
                ..Limits::default()
            },
            ttl_ms: millis(self.ttl, "ttl")?,
            idle_timeout_ms: millis(self.idle_timeout, "idle-timeout")?,
            labels: self.labels.iter().cloned().collect(),
            ..SessionCreate::default()
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("forkd-run: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

async fn connect(socket: &Option<PathBuf>) -> Result<AsyncClient, ExitCode> {
    let path = socket
        .clone()
        .unwrap_or_else(forkd_ipc::client::default_socket_path);
    AsyncClient::connect(&path).await.map_err(|e| fail(&e))
}

/// Reports a client error; exit status 3 (forkd refused or failed).
fn fail(e: &ClientError) -> ExitCode {
    eprintln!("forkd-run: {e}");
    ExitCode::from(3)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("forkd-run: {msg}");
    ExitCode::from(2)
}

/// `forkd-run session ARGS` (argv from "session" on).
pub fn session_main(argv: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = SessionCli::parse_from(argv);
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let client = match connect(&cli.socket).await {
            Ok(c) => c,
            Err(code) => return code,
        };
        session_cmd(&client, cli.cmd).await
    })
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("forkd-run: cannot print JSON: {e}"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}M", b as f64 / (1 << 20) as f64)
}

fn print_table(sessions: &[SessionInfo]) {
    println!(
        "{:<28} {:<8} {:>8} {:>9} {:>6} {:>8}  LABELS",
        "SESSION", "STATE", "AGE", "TTL LEFT", "CELLS", "MEMORY"
    );
    for s in sessions {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<28} {:<8} {:>7}s {:>8}s {:>6} {:>8}  {}",
            s.session,
            format!("{:?}", s.state).to_lowercase(),
            s.age_ms / 1000,
            s.ttl_left_ms / 1000,
            s.cells,
            mib(s.usage.memory_bytes),
            labels.join(",")
        );
    }
}

async fn session_cmd(client: &AsyncClient, cmd: SessionCmd) -> ExitCode {
    match cmd {
        SessionCmd::Create { opts, json } => {
            let req = match opts.request() {
                Ok(r) => r,
                Err(e) => return usage(&e),
            };
            match client.session_create(&req).await {
                Ok(info) if json => {
                    print_json(&info);
                    ExitCode::SUCCESS
                }
                Ok(info) => {
                    println!("{}", info.session);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Ls { labels, json } => {
            match client.session_list(labels.into_iter().collect()).await {
                Ok(list) if json => {
                    print_json(&list);
                    ExitCode::SUCCESS
                }
                Ok(list) => {
                    print_table(&list);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Info { id } => match client.session_info(&id).await {
            Ok(info) => {
                print_json(&info);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        SessionCmd::Net { id, specs } => match client.session_set_network(&id, &specs).await {
            Ok(info) => {
                print_json(&info);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        SessionCmd::Branch {
            id,
            count,
            same_seed,
            force,
            json,
        } => match client
            .session_branch(forkd_ipc::SessionBranch {
                session: id,
                count,
                same_seed,
                force,
                labels: None,
            })
            .await
        {
            Ok(branches) => {
                for b in &branches {
                    if json {
                        print_json(b);
                    } else {
                        println!("{}", b.session);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        SessionCmd::Checkpoint {
            id,
            force,
            keep,
            list,
            delete,
            json,
        } => {
            let done = if list {
                client.session_checkpoints(&id).await.map(|all| {
                    for k in &all {
                        if json {
                            print_json(k);
                        } else {
                            println!(
                                "{}\t{} ms\t{} B\t{} restores{}",
                                k.checkpoint,
                                k.age_ms,
                                k.scratch_bytes,
                                k.restores,
                                if k.kept { "\tkept" } else { "" }
                            );
                        }
                    }
                })
            } else if let Some(ck) = delete {
                client.session_checkpoint_delete(&id, &ck).await
            } else {
                let req = forkd_ipc::SessionCheckpoint {
                    session: id.clone(),
                    force,
                    keep,
                };
                client.session_checkpoint_with(req).await.map(|k| {
                    if json {
                        print_json(&k);
                    } else {
                        println!("{}", k.checkpoint);
                    }
                })
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Restore { id, checkpoint } => {
            match client.session_restore(&id, &checkpoint).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Kill { id } => match client.session_kill(&id).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        SessionCmd::Exec {
            id,
            code,
            file,
            timeout,
        } => {
            let code = match (code, file) {
                (Some(c), None) => c,
                (None, Some(p)) if p.as_os_str() != "-" => match std::fs::read_to_string(&p) {
                    Ok(c) => c,
                    Err(e) => return usage(&format!("cannot read {}: {e}", p.display())),
                },
                (None, _) => {
                    let mut s = String::new();
                    if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                        return usage(&format!("reading stdin: {e}"));
                    }
                    s
                }
                (Some(_), Some(_)) => return usage("give -c CODE or a file, not both"),
            };
            let timeout_ms = match millis(timeout, "timeout") {
                Ok(t) => t,
                Err(e) => return usage(&e),
            };
            match run_cell(client, &id, code, timeout_ms).await {
                Ok(r) if r.error.is_some() => ExitCode::from(1),
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Sh {
            id,
            cmd,
            cwd,
            timeout,
        } => {
            let timeout_ms = match millis(timeout, "timeout") {
                Ok(t) => t,
                Err(e) => return usage(&e),
            };
            let req = Command {
                session: id,
                cmd: cmd.join(" "),
                cwd,
                env: BTreeMap::new(),
                timeout_ms,
                stdin: false,
            };
            let mut stream = match client.command_stream(&req).await {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            loop {
                match stream.next_event().await {
                    Ok(Some(e)) => echo(&e),
                    Ok(None) => break,
                    Err(e) => return fail(&e),
                }
            }
            match stream.command().await {
                Ok(r) => {
                    if let Some(m) = r.kill_message() {
                        let fix = if r.timed_out {
                            "raise --timeout"
                        } else {
                            "write less output, or to a file in the session"
                        };
                        eprintln!("forkd-run: command {m}; {fix}");
                    }
                    let status = match (r.exit_code, r.signal) {
                        (Some(c), _) => c,
                        (None, Some(s)) => 128 + s,
                        (None, None) => 255,
                    };
                    ExitCode::from(u8::try_from(status & 0xff).unwrap_or(255))
                }
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Put { id, local, remote } => {
            let data = if local.as_os_str() == "-" {
                let mut v = Vec::new();
                if let Err(e) = std::io::stdin().read_to_end(&mut v) {
                    return usage(&format!("reading stdin: {e}"));
                }
                v
            } else {
                match std::fs::read(&local) {
                    Ok(d) => d,
                    Err(e) => return usage(&format!("cannot read {}: {e}", local.display())),
                }
            };
            match client.write_file(&id, &remote, &data, None).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        SessionCmd::Get { id, remote, local } => match client.read_file(&id, &remote).await {
            Ok(data) => save(&local, &data),
            Err(e) => fail(&e),
        },
        SessionCmd::Delta { id, out } => match client.session_workspace_delta(&id).await {
            Ok(tar) => save(&out, &tar),
            Err(e) => fail(&e),
        },
    }
}

/// Writes `data` to `local` ("-": stdout).
fn save(local: &std::path::Path, data: &[u8]) -> ExitCode {
    let written = if local.as_os_str() == "-" {
        std::io::stdout().write_all(data)
    } else {
        std::fs::write(local, data)
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd-run: cannot write {}: {e}", local.display());
            ExitCode::FAILURE
        }
    }
}

/// Writes a streamed event where it belongs.
fn echo(e: &Event) {
    match e {
        Event::Output {
            stream: Stream::Stdout,
            data,
        } => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
        Event::Output {
            stream: Stream::Stderr,
            data,
        } => {
            let _ = std::io::stderr().write_all(data);
        }
        Event::Display(d) => {
            if let Some(text) = d.data.get("text/plain") {
                println!("{text}");
            }
        }
        Event::CommandStarted { .. } => {}
    }
}

/// Runs a cell, echoing its output as it comes, then its value or its
/// traceback; Ctrl-C interrupts the cell (not this program).
async fn run_cell(
    client: &AsyncClient,
    id: &str,
    code: String,
    timeout_ms: Option<u64>,
) -> Result<CellResult, ClientError> {
    let mut stream = client
        .run_code_stream(&RunCode {
            session: id.to_owned(),
            code,
            timeout_ms,
        })
        .await?;
    loop {
        tokio::select! {
            e = stream.next_event() => match e? {
                Some(e) => echo(&e),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => {
                client.interrupt(id).await?;
            }
        }
    }
    let r = stream.cell().await?;
    if let Some(text) = &r.text {
        println!("{text}");
    }
    if let Some(err) = &r.error {
        let tb = if err.traceback.is_empty() {
            format!("{}: {}\n", err.name, err.value)
        } else {
            err.traceback.clone()
        };
        eprint!("{tb}");
        if !tb.ends_with('\n') {
            eprintln!();
        }
    }
    if let Some(m) = r.kill_message() {
        let raise = if r.killed_by.is_some() {
            "create the session with a larger --memory"
        } else {
            "raise --timeout"
        };
        eprintln!("forkd-run: cell {m}; {raise}");
    }
    let _ = std::io::stdout().flush();
    Ok(r)
}

/// Whether `cell` (lines so far) needs more lines, as Python's interactive
/// prompt decides it in the common cases: an open bracket or string, a
/// trailing backslash, or a block (a line ending in `:`) not yet closed by
/// a blank line.
fn needs_more(lines: &[String]) -> bool {
    let Some(last) = lines.last() else {
        return false;
    };
    let mut depth: i32 = 0;
    let mut in_str: Option<&str> = None;
    let text = lines.join("\n");
    let mut rest = text.as_str();
    while let Some(c) = rest.chars().next() {
        let step = c.len_utf8();
        if let Some(q) = in_str {
            if rest.starts_with('\\') {
                rest = rest.get(2..).unwrap_or("");
                continue;
            }
            if rest.starts_with(q) {
                in_str = None;
                rest = &rest[q.len()..];
                continue;
            }
            rest = &rest[step..];
            continue;
        }
        match c {
            '#' => {
                rest = rest.find('\n').map_or("", |i| &rest[i..]);
                continue;
            }
            '"' | '\'' => {
                let q = if rest.starts_with("\"\"\"") {
                    "\"\"\""
                } else if rest.starts_with("'''") {
                    "'''"
                } else if c == '"' {
                    "\""
                } else {
                    "'"
                };
                in_str = Some(q);
                rest = &rest[q.len()..];
                continue;
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
        rest = &rest[step..];
    }
    if depth > 0 || matches!(in_str, Some("\"\"\"" | "'''")) || last.ends_with('\\') {
        return true;
    }
    let block = lines
        .iter()
        .any(|l| l.trim_end().ends_with(':') && !l.trim_start().starts_with('#'));
    block && !last.trim().is_empty()
}

/// `forkd-run repl ARGS` (argv from "repl" on).
pub fn repl_main(argv: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = ReplCli::parse_from(argv);
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let client = match connect(&cli.socket).await {
            Ok(c) => c,
            Err(code) => return code,
        };
        let (id, ours) = match &cli.session {
            Some(id) => (id.clone(), false),
            None => {
                let req = match cli.opts.request() {
                    Ok(r) => r,
                    Err(e) => return usage(&e),
                };
                match client.session_create(&req).await {
                    Ok(info) => (info.session, true),
                    Err(e) => return fail(&e),
                }
            }
        };
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            eprintln!("forkd session {id} (Ctrl-C interrupts a cell, Ctrl-D ends)");
        }
        let code = repl_loop(&client, &id, interactive).await;
        if ours {
            let _ = tokio::time::timeout(Duration::from_secs(10), client.session_kill(&id)).await;
        }
        code
    })
}

async fn repl_loop(client: &AsyncClient, id: &str, interactive: bool) -> ExitCode {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    // stdin is read on its own thread: a blocking read must not hold the runtime.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut cell: Vec<String> = Vec::new();
    let mut failed = false;
    loop {
        if interactive {
            eprint!("{}", if cell.is_empty() { ">>> " } else { "... " });
        }
        let line = match rx.recv().await {
            Some(Some(l)) => l,
            _ => break,
        };
        // A line at column 0 after a block ends the block: run what came
        // before, then start a new cell with this line.
        let ends_block = !cell.is_empty()
            && !line.starts_with([' ', '\t'])
            && !line.trim().is_empty()
            && cell.iter().any(|l| l.trim_end().ends_with(':'))
            && !needs_more_brackets(&cell);
        if ends_block {
            let code = std::mem::take(&mut cell).join("\n");
            failed |= !run_one(client, id, code).await;
        }
        if cell.is_empty() && line.trim().is_empty() {
            continue;
        }
        cell.push(line);
        if !needs_more(&cell) {
            let code = std::mem::take(&mut cell).join("\n");
            failed |= !run_one(client, id, code).await;
        }
    }
    if !cell.is_empty() {
        let code = cell.join("\n");
        failed |= !run_one(client, id, code).await;
    }
    if interactive {
        eprintln!();
    }
    if failed && !interactive {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn needs_more_brackets(cell: &[String]) -> bool {
    // needs_more without the block rule.
    let mut c = cell.to_vec();
    c.push(String::new());
    needs_more(&c) && !c.iter().any(|l| l.trim_end().ends_with(':'))
}

/// One cell; false when it raised.
async fn run_one(client: &AsyncClient, id: &str, code: String) -> bool {
    match run_cell(client, id, code, None).await {
        Ok(r) => r.error.is_none(),
        Err(e) => {
            eprintln!("forkd-run: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::needs_more;

    fn v(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn continuation_follows_pythons_prompt() {
        assert!(!needs_more(&v(&["x = 1"])));
        assert!(needs_more(&v(&["x = (1,"])));
        assert!(!needs_more(&v(&["x = (1,", "2)"])));
        assert!(needs_more(&v(&["for i in range(3):"])));
        assert!(needs_more(&v(&["for i in range(3):", "    print(i)"])));
        assert!(!needs_more(&v(&["for i in range(3):", "    print(i)", ""])));
        assert!(!needs_more(&v(&["s = '(: not a bracket'"])));
        assert!(needs_more(&v(&["s = '''start"])));
        assert!(!needs_more(&v(&["s = '''start", "end'''"])));
        assert!(needs_more(&v(&["x = 1 + \\"])));
        assert!(!needs_more(&v(&["x = {'a': 1}  # (comment"])));
    }
}
