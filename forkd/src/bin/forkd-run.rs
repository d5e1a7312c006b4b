//! `forkd-run`: run Python in forkd sandboxes from the command line.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use forkd_ipc::{AsyncClient, ClientError, KilledBy, Limits, Program, SpawnRequest, SpawnResult};
use hdrhistogram::Histogram;

/// Run Python code in an isolated forkd sandbox and mirror its output and exit status.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Run Python code in an isolated forkd sandbox and mirror its output and exit status",
    after_help = "Exit status: the sandbox's exit code, or 128+signal when it was killed; 2 for usage errors, 3 when forkd refused or failed the request."
)]
struct Args {
    /// Python code to run (like `python -c`).
    #[arg(short = 'c', long = "code", conflicts_with = "module")]
    code: Option<String>,
    /// Module to run as `__main__` (like `python -m`), followed by its arguments.
    #[arg(short = 'm', long = "module")]
    module: Option<String>,
    /// Script to run (sent into the sandbox's working directory), followed
    /// by its arguments; with -c or -m, the program's first argument.
    script: Option<PathBuf>,
    /// Arguments for the program (sys.argv[1:]).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
    /// Wall-clock limit in seconds (fractions allowed).
    // Negative values parse, so that `--timeout -1` gets forkd's message
    // (clap's own would suggest `-- -1`, which makes it the program's argument).
    #[arg(long, allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// Memory limit, e.g. 256M or 1G.
    #[arg(long, value_parser = forkd::size::parse_size)]
    memory: Option<u64>,
    /// Process/thread limit.
    #[arg(long)]
    pids: Option<u64>,
    /// CPU limit in cores.
    // Negative values parse, so that `--cpus -1` gets forkd's message (as --timeout).
    #[arg(long, allow_negative_numbers = true)]
    cpus: Option<f64>,
    /// Output limit (stdout+stderr), e.g. 1M.
    #[arg(long, value_parser = forkd::size::parse_size)]
    output_limit: Option<u64>,
    /// Zygote to fork from.
    #[arg(long)]
    zygote: Option<String>,
    /// Isolation policy name.
    #[arg(long)]
    policy: Option<String>,
    /// Let the sandbox reach a destination: HOST[:PORT], *.DOMAIN[:PORT] or
    /// CIDR[:PORT], ports as N or LO-HI (repeatable; without it: no network).
    #[arg(long = "allow-net", value_name = "SPEC")]
    allow_net: Vec<String>,
    /// Environment variable for the program (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Print the full result as JSON (protocol shape: stdout/stderr base64).
    #[arg(long)]
    json: bool,
    /// Run N copies concurrently and print a summary.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    count: usize,
    /// With -n: how many run at once (default: all).
    #[arg(long)]
    concurrency: Option<usize>,
    /// With -n: each copy holds its concurrency slot this many milliseconds
    /// after its result (paces requests, e.g. to let warm children finish
    /// isolating between them; not part of the latency).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// With -n: a copy counts as OK only if its stdout (trimmed) equals this.
    #[arg(long)]
    expect: Option<String>,
    /// Socket of the daemon.
    #[arg(long, env = "FORKD_SOCKET")]
    socket: Option<PathBuf>,
    /// Start a private daemon for this command instead of using a running one.
    #[arg(long)]
    embedded: bool,
    /// With --embedded: the zygote's interpreter (e.g. .venv/bin/python).
    #[arg(long, requires = "embedded")]
    python: Option<PathBuf>,
    /// With --embedded: comma-separated preload modules (default numpy).
    #[arg(long, value_delimiter = ',', requires = "embedded")]
    preload: Option<Vec<String>>,
    /// With --embedded: daemon config file.
    #[arg(long, requires = "embedded")]
    config: Option<PathBuf>,
    /// With --embedded: warm children to keep ready (waits until they are
    /// before running).
    #[arg(long, requires = "embedded")]
    warm_pool: Option<usize>,
    /// Mount this host directory at /workspace (see docs/workspaces.md).
    #[arg(long, conflicts_with = "workspace_name")]
    workspace: Option<PathBuf>,
    /// Mount the workspace the daemon's configuration names.
    #[arg(long)]
    workspace_name: Option<String>,
    /// Workspace rule GLOB=MODE (none, view, read, write); repeatable, in order.
    #[arg(long = "rule")]
    rules: Vec<String>,
    /// Mode of workspace paths no rule matches (default read).
    #[arg(long)]
    workspace_default: Option<String>,
    /// direct (writes reach the host directory) or overlay (copy-on-write).
    #[arg(long, value_parser = ["direct", "overlay"])]
    workspace_mode: Option<String>,
    /// Where the sandbox sees the workspace (default /workspace).
    #[arg(long)]
    workspace_mount: Option<PathBuf>,
    /// Overlay: write the changes here, as a tar if the name ends in .tar,
    /// else as a new directory tree (deletions as .wh.NAME files).
    #[arg(long)]
    export_delta: Option<PathBuf>,
}

/// `forkd-run workspace ...`: rules and deltas without a sandbox.
#[derive(Parser, Debug)]
#[command(name = "forkd-run workspace")]
enum WorkspaceCmd {
    /// Print the mode a path gets and the rule behind it (a dry run).
    Explain {
        /// Path relative to the workspace root.
        path: String,
        /// GLOB=MODE, repeatable, in order.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// Mode of paths no rule matches.
        #[arg(long, default_value = "read")]
        default: String,
    },
    /// Apply an exported delta (tar) to a host directory; with rules, only
    /// changes to `write` paths are accepted.
    Apply {
        delta: PathBuf,
        dir: PathBuf,
        #[arg(long = "rule")]
        rules: Vec<String>,
        #[arg(long)]
        default: Option<String>,
    },
}

fn workspace_cmd(argv: Vec<std::ffi::OsString>) -> ExitCode {
    use forkd_workspace::{Mode, Rules};
    let cmd = match WorkspaceCmd::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let rules = |rules: &[String], default: &str| -> Result<Rules, String> {
        let mode: Mode = default.parse().map_err(|e| format!("{e}"))?;
        Rules::parse(rules, mode).map_err(|e| e.to_string())
    };
    let outcome = match cmd {
        WorkspaceCmd::Explain {
            path,
            rules: r,
            default,
        } => rules(&r, &default).and_then(|rs| {
            let (mode, why) = rs.explain(&path).map_err(|e| e.to_string())?;
            println!("{path}: {mode} ({why})");
            Ok(())
        }),
        WorkspaceCmd::Apply {
            delta,
            dir,
            rules: r,
            default,
        } => (|| {
            let rs = if r.is_empty() && default.is_none() {
                None
            } else {
                Some(rules(&r, default.as_deref().unwrap_or("read"))?)
            };
            let f = std::fs::File::open(&delta).map_err(|e| format!("{}: {e}", delta.display()))?;
            let stats = forkd_workspace::apply_tar(std::io::BufReader::new(f), &dir, rs.as_ref())
                .map_err(|e| e.to_string())?;
            eprintln!(
                "forkd-run: applied {} files, {} directories, {} symlinks, {} deletions, {} replaced directories",
                stats.files, stats.dirs, stats.symlinks, stats.deletions, stats.opaque_dirs
            );
            Ok(())
        })(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd-run: {e}");
            ExitCode::from(2)
        }
    }
}

fn build_workspace(args: &Args) -> Result<Option<forkd_ipc::WorkspaceRequest>, String> {
    if args.workspace.is_none() && args.workspace_name.is_none() {
        if !args.rules.is_empty() || args.workspace_mode.is_some() || args.export_delta.is_some() {
            return Err("--rule, --workspace-mode and --export-delta need --workspace DIR or --workspace-name NAME".into());
        }
        return Ok(None);
    }
    let path = match &args.workspace {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .map_err(|e| format!("--workspace {}: {e}", p.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let mode = match args.workspace_mode.as_deref() {
        Some("overlay") => forkd_ipc::WorkspaceMode::Overlay,
        _ => forkd_ipc::WorkspaceMode::Direct,
    };
    if args.export_delta.is_some() && mode != forkd_ipc::WorkspaceMode::Overlay {
        return Err("--export-delta needs --workspace-mode overlay".into());
    }
    Ok(Some(forkd_ipc::WorkspaceRequest {
        name: args.workspace_name.clone(),
        path,
        rules: args.rules.clone(),
        default_mode: args.workspace_default.clone(),
        mode,
        mount_point: args
            .workspace_mount
            .as_ref()
            .map(|p| p.display().to_string()),
        export_delta: args.export_delta.is_some(),
    }))
}

/// Writes an exported delta where `--export-delta` says.
fn write_delta(out: &std::path::Path, tar: &[u8]) -> Result<(), String> {
    if out.extension().is_some_and(|e| e == "tar") {
        std::fs::write(out, tar).map_err(|e| format!("{}: {e}", out.display()))
    } else {
        forkd_workspace::unpack_tree(tar, out)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))
}

/// The local script sent as a file of the sandbox's working directory, at
/// the same relative path when it is one without `..` (so `__file__` and
/// `sys.argv[0]` read as with `python PATH`), else under its file name. Sent
/// as bytes: a non-UTF-8 source with a coding cookie compiles as in Python.
fn script_file(path: &std::path::Path) -> Result<(forkd_ipc::InlineFile, String), String> {
    let content =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let relative = path.is_relative()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    let inside: PathBuf = if relative {
        path.components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect()
    } else {
        PathBuf::from(
            path.file_name()
                .ok_or_else(|| format!("{} is not a file", path.display()))?,
        )
    };
    let inside = inside
        .to_str()
        .ok_or_else(|| format!("script path {} is not UTF-8", path.display()))?
        .to_string();
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    };
    Ok((
        forkd_ipc::InlineFile {
            path: inside.clone(),
            content,
            mode,
        },
        // `python ./x.py` shows `./x.py`; keep what was typed when it is inside.
        if relative {
            path.display().to_string()
        } else {
            inside
        },
    ))
}

fn build_request(args: &Args) -> Result<SpawnRequest, String> {
    // With -c or -m, clap puts a first argument in `script`: it is argv.
    let mut argv: Vec<String> = Vec::new();
    let mut files = Vec::new();
    let program = match (&args.code, &args.module, &args.script) {
        (Some(code), _, first) => {
            argv.extend(first.iter().map(|p| p.display().to_string()));
            Program::Code(code.clone())
        }
        (None, Some(module), first) => {
            argv.extend(first.iter().map(|p| p.display().to_string()));
            Program::Module(module.clone())
        }
        (None, None, Some(path)) => {
            let (file, inside) = script_file(path)?;
            files.push(file);
            Program::Script(inside)
        }
        (None, None, None) => {
            return Err("give code with -c CODE, a module with -m MODULE or a script path".into())
        }
    };
    argv.extend(args.args.iter().cloned());
    let stdin = if std::io::stdin().is_terminal() {
        Vec::new()
    } else {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading stdin: {e}"))?;
        buf
    };
    let mut env = BTreeMap::new();
    for (k, v) in &args.env {
        env.insert(k.clone(), v.clone());
    }
    let timeout_ms = match args.timeout {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "positive finite seconds; float-to-int casts saturate"
        )]
        Some(t) if t.is_finite() && t > 0.0 => Some((t * 1000.0).ceil() as u64),
        Some(t) => {
            return Err(format!(
                "--timeout {t} must be a positive number of seconds"
            ))
        }
        None => None,
    };
    if let Some(c) = args.cpus {
        if !(c.is_finite() && c > 0.0) {
            return Err(format!(
                "--cpus {c} must be a positive number of cores, e.g. 0.5 or 2"
            ));
        }
    }
    if args.pids == Some(0) {
        return Err("--pids 0: a sandbox needs at least 1 process".into());
    }
    if args.concurrency == Some(0) {
        return Err("--concurrency must be at least 1".into());
    }
    Ok(SpawnRequest {
        zygote: args.zygote.clone(),
        program,
        argv,
        stdin,
        env,
        files,
        timeout_ms,
        limits: Limits {
            memory_bytes: args.memory,
            cpus: args.cpus,
            pids: args.pids,
            output_bytes: args.output_limit,
            ..Limits::default()
        },
        policy: args.policy.clone(),
        workspace: build_workspace(args)?,
        allow_net: args.allow_net.clone(),
        terminal: terminal_streams(args),
    })
}

/// Our streams that are terminals, where the program's output is mirrored
/// (not with --json or -n): the program line-buffers them, as `python`
/// does on a terminal, so a line printed before a crash or a kill shows.
fn terminal_streams(args: &Args) -> Vec<forkd_ipc::Stream> {
    if args.json || args.count != 1 {
        return Vec::new();
    }
    let mut streams = Vec::new();
    if std::io::stdout().is_terminal() {
        streams.push(forkd_ipc::Stream::Stdout);
    }
    if std::io::stderr().is_terminal() {
        streams.push(forkd_ipc::Stream::Stderr);
    }
    streams
}

/// As with python, everything after `-c CODE` or `-m MODULE` is the
/// program's argv, options included (`forkd-run -m json.tool --sort-keys`).
/// Returns forkd-run's own arguments and, when split, the program's.
fn split_program_argv(
    argv: Vec<std::ffi::OsString>,
) -> (Vec<std::ffi::OsString>, Option<Vec<String>>) {
    use clap::CommandFactory;
    let cmd = Args::command();
    let mut with_value: Vec<String> = Vec::new();
    for a in cmd.get_arguments() {
        if a.get_action().takes_values() {
            with_value.extend(a.get_long().map(|l| format!("--{l}")));
            with_value.extend(a.get_short().map(|s| format!("-{s}")));
        }
    }
    let mut i = 1;
    while i < argv.len() {
        let arg = argv[i].to_string_lossy();
        let end = match arg.as_ref() {
            "--" => break,
            "-c" | "--code" | "-m" | "--module" => i + 2,
            a if a.starts_with("--code=") || a.starts_with("--module=") => i + 1,
            a if (a.starts_with("-c") || a.starts_with("-m")) && !a.starts_with("--") => i + 1,
            a if with_value.iter().any(|w| w == a) => {
                i += 2;
                continue;
            }
            a if a.starts_with('-') => {
                i += 1;
                continue;
            }
            _ => break, // the script: clap's trailing arguments take the rest
        };
        if end > argv.len() {
            break; // let clap report the missing value
        }
        let tail = argv[end..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return (argv[..end].to_vec(), Some(tail));
    }
    (argv, None)
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "workspace") {
        return workspace_cmd(argv[1..].to_vec());
    }
    if argv.get(1).is_some_and(|a| a == "session") {
        return forkd::cli_session::session_main(argv[1..].to_vec());
    }
    if argv.get(1).is_some_and(|a| a == "repl") {
        return forkd::cli_session::repl_main(argv[1..].to_vec());
    }
    let (head, tail) = split_program_argv(argv);
    let mut args = Args::parse_from(head);
    if let Some(tail) = tail {
        args.args = tail;
    }
    let req = match build_request(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("forkd-run: {e}");
            return ExitCode::from(2);
        }
    };
    if args.count == 0 {
        eprintln!("forkd-run: -n must be at least 1");
        return ExitCode::from(2);
    }
    // An embedded start failure is said once, by us (exit 3), not also by
    // the pool's log line.
    forkd::init_logging(
        if args.embedded {
            "warn,forkd_pool::start=off"
        } else {
            "error"
        },
        false,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("forkd-run: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    runtime.block_on(run(args, req))
}

async fn run(args: Args, req: SpawnRequest) -> ExitCode {
    let mut embedded = None;
    let mut socket_dir = None;
    let socket = if args.embedded {
        let mut config = match &args.config {
            Some(p) => match forkd::Config::load(p) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("forkd-run: {e}");
                    return ExitCode::from(2);
                }
            },
            None => forkd::Config::default(),
        };
        forkd::config::apply_overrides(&mut config, args.python.clone(), args.preload.clone());
        if let Some(n) = args.warm_pool {
            if config.zygotes.is_empty() {
                config.zygotes.push(forkd::config::ZygoteSection::default());
            }
            for z in &mut config.zygotes {
                z.warm_pool = n;
            }
        }
        if config.max_concurrent < args.count {
            config.max_concurrent = args.count.min(4096);
        }
        let dir = match tempdir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("forkd-run: cannot create a private socket directory: {e}");
                return ExitCode::from(3);
            }
        };
        let path = dir.join("forkd.sock");
        let started = Instant::now();
        match forkd::start(config, Some(&path)).await {
            Ok(r) => {
                // Let the warm pools fill, so the run shows the steady state.
                let deadline = Instant::now() + Duration::from_secs(30);
                while r.daemon.warm.values().any(|p| p.ready() < p.target())
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let warm: usize = r.daemon.warm.values().map(|p| p.ready()).sum();
                eprintln!(
                    "forkd-run: embedded daemon ready in {:.0} ms (zygote preloaded, {warm} warm children, socket {})",
                    started.elapsed().as_secs_f64() * 1000.0,
                    path.display()
                );
                embedded = Some(r);
            }
            Err(e) => {
                eprintln!("forkd-run: cannot start the embedded daemon: {e}");
                let _ = std::fs::remove_dir_all(&dir);
                return ExitCode::from(3);
            }
        }
        socket_dir = Some(dir);
        path
    } else {
        args.socket
            .clone()
            .unwrap_or_else(forkd_ipc::client::default_socket_path)
    };

    let code = match AsyncClient::connect(&socket).await {
        Ok(client) => {
            if args.count == 1 {
                single(&client, &req, args.json, args.export_delta.as_deref()).await
            } else {
                fan_out(&client, &req, &args).await
            }
        }
        Err(e) => {
            eprintln!("forkd-run: {e}");
            if matches!(e, ClientError::Connect { .. }) {
                eprintln!("forkd-run: hint: `forkd-run --embedded ...` starts a private daemon for one command");
            }
            ExitCode::from(3)
        }
    };
    if let Some(r) = embedded {
        r.shutdown().await;
    }
    if let Some(dir) = socket_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    code
}

fn tempdir() -> std::io::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!("forkd-run-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary directory name"))
}

/// Said once per command when the daemon could not enforce the limits.
const UNENFORCED: &str = "forkd-run: warning: memory/cpu/pids limits were not enforced (the daemon has no usable cgroup, e.g. rootless without a delegated subtree; `forkd doctor` says why)";

fn report_limits(result: &SpawnResult) {
    if result.stdout_truncated || result.stderr_truncated {
        eprintln!(
            "forkd-run: output truncated at {} bytes (raise --output-limit)",
            result.limits.output_bytes
        );
    }
    match (result.killed_by, result.kill_message()) {
        // The limit, the peak and the flag to raise: stderr may be empty.
        (Some(KilledBy::Oom), Some(m)) => eprintln!("forkd-run: sandbox {m}; raise --memory"),
        (Some(KilledBy::Timeout), Some(m)) => eprintln!("forkd-run: sandbox {m}; raise --timeout"),
        (Some(KilledBy::Pids), Some(m)) => eprintln!("forkd-run: sandbox {m}; raise --pids"),
        (Some(KilledBy::OutputLimit), Some(m)) => {
            eprintln!("forkd-run: sandbox {m}; raise --output-limit")
        }
        (Some(k), _) => eprintln!(
            "forkd-run: sandbox killed by {}",
            serde_json::to_string(&k)
                .unwrap_or_default()
                .trim_matches('"')
        ),
        (None, _) => {}
    }
    if !result.limits_enforced() {
        eprintln!("{UNENFORCED}");
    }
}

async fn single(
    client: &AsyncClient,
    req: &SpawnRequest,
    json: bool,
    export: Option<&std::path::Path>,
) -> ExitCode {
    match client.spawn(req).await {
        Ok(result) => {
            if let Some(e) = &result.workspace_error {
                eprintln!("forkd-run: {e}");
            }
            if let (Some(out), Some(tar)) = (export, &result.workspace_delta) {
                if let Err(e) = write_delta(out, tar) {
                    eprintln!("forkd-run: cannot write the delta: {e}");
                    return ExitCode::from(3);
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&result).unwrap_or_default()
                );
            } else {
                let _ = std::io::stdout().write_all(&result.stdout);
                let _ = std::io::stderr().write_all(&result.stderr);
                let _ = std::io::stdout().flush();
                report_limits(&result);
            }
            ExitCode::from(result.shell_status().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("forkd-run: {e}");
            ExitCode::from(3)
        }
    }
}

async fn fan_out(client: &AsyncClient, req: &SpawnRequest, args: &Args) -> ExitCode {
    let n = args.count;
    let concurrency = args.concurrency.unwrap_or(n).max(1);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let wall = Instant::now();
    let pause = std::time::Duration::from_millis(args.pause_ms);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let client = client.clone();
        let req = req.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let t = Instant::now();
            let r = client.spawn(&req).await;
            let elapsed = t.elapsed();
            tokio::time::sleep(pause).await;
            (elapsed, r)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    let mut fork_us = Vec::new();
    let mut total_us = Vec::new();
    let mut ok = 0usize;
    let mut warm = 0usize;
    let mut outputs: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut results = Vec::new();
    let mut unenforced = false;
    for task in tasks {
        let (elapsed, r) = match task.await {
            Ok(x) => x,
            Err(e) => {
                *errors.entry(format!("task failed: {e}")).or_default() += 1;
                continue;
            }
        };
        let _ = latency.record(u64::try_from(elapsed.as_micros().max(1)).unwrap_or(u64::MAX));
        match r {
            Ok(result) => {
                unenforced |= !result.limits_enforced();
                let out = result.stdout_lossy();
                let good = result.exit_code == Some(0)
                    && args
                        .expect
                        .as_deref()
                        .is_none_or(|e| out.trim() == e.trim());
                if good {
                    ok += 1;
                }
                warm += usize::from(result.warm);
                fork_us.push(result.timings.fork_us);
                total_us.push(result.timings.total_us);
                let key = if result.exit_code == Some(0) {
                    out.trim_end().to_string()
                } else {
                    format!(
                        "exit {:?} signal {:?} killed_by {:?}: {}",
                        result.exit_code,
                        result.signal,
                        result.killed_by,
                        result.stderr_lossy().trim_end()
                    )
                };
                *outputs.entry(key).or_default() += 1;
                if args.json {
                    results.push(result);
                }
            }
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    let wall = wall.elapsed();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).unwrap_or_default()
        );
    }
    if unenforced {
        eprintln!("{UNENFORCED}");
    }
    for (out, count) in &outputs {
        eprintln!("{count:>6} × {out}");
    }
    for (err, count) in &errors {
        eprintln!("{count:>6} × error: {err}");
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    eprintln!(
        "ok {ok}/{n}  wall {:.1} ms  latency p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (concurrency {concurrency})",
        ms(wall),
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.9) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0,
    );
    eprintln!(
        "daemon-side medians: request→forked {:.2} ms, request→result {:.2} ms; {warm}/{n} from warm children",
        median(&mut fork_us) as f64 / 1000.0,
        median(&mut total_us) as f64 / 1000.0
    );
    if ok == n {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
