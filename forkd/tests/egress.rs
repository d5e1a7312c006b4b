//! Network egress end to end: real sandboxes with `allow_net`, real servers
//! and a DNS server on test hosts in network namespaces these tests create
//! (veth pairs, 198.18.0.0/15). No traffic goes anywhere else.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;
#[path = "../../net/tests/testbed/mod.rs"]
mod testbed;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use forkd_ipc::ErrorCode;
use testbed::TestHost;

/// One test at a time, each with a runtime of its own made after taking the
/// lock: every test checks the process and host for leaks (fds, mounts), and
/// another test's runtime or test host would show up there.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial<F: std::future::Future<Output = ()>>(test: F) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test);
    drop(rt);
}

/// What the sandbox program observes; one JSON object on stdout.
const PROBE: &str = r#"
import json, os, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
out = {}
def attempt(f):
    try:
        return "ok:" + str(f())
    except OSError as e:
        return type(e).__name__ + ":" + str(e.errno)
def talk(a):
    s = socket.create_connection((a, port), timeout=5)
    s.sendall(b"hi")
    data = s.recv(100).decode()
    s.close()
    return data
# By name: forkd's resolver (glibc falls back to 127.0.0.1 without a
# resolv.conf).
out["name"] = attempt(lambda: talk(socket.getaddrinfo("pkg.test", port, type=socket.SOCK_STREAM)[0][4][0]))
out["addr"] = attempt(lambda: talk(addr))
out["port"] = attempt(lambda: socket.create_connection((addr, port + 1), timeout=5).close())
out["host"] = attempt(lambda: socket.create_connection(("198.18.255.1", port), timeout=5).close())
out["unlisted"] = attempt(lambda: socket.getaddrinfo("other.test", port))
out["rebind"] = attempt(lambda: socket.getaddrinfo("rebind.test", port))
out["meta"] = attempt(lambda: socket.create_connection(("169.254.169.254", 80), timeout=5).close())
print(json.dumps(out))
"#;

fn probe(addr: std::net::Ipv4Addr, allow: Vec<String>) -> forkd_ipc::SpawnRequest {
    let mut r = req(PROBE);
    r.argv = vec![addr.to_string(), "8080".into()];
    r.allow_net = allow;
    r
}

#[test]
fn a_sandbox_reaches_its_allowlist_by_name_and_address_and_nothing_else() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(a_sandbox_reaches_its_allowlist_by_name_and_address_and_nothing_else_());
}

async fn a_sandbox_reaches_its_allowlist_by_name_and_address_and_nothing_else_() {
    let host = TestHost::create();
    host.echo(8080, "a");
    host.echo(8081, "b");
    let names: HashMap<String, _> = [
        ("pkg.test", host.addr),
        ("other.test", host.addr),
        ("rebind.test", [10, 0, 0, 1].into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dns = host.dns(names, 60);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.network.resolvers = Some(vec![dns.to_string()]);
        c.audit_log = Some(a2);
        c.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;

    let allow = vec![
        "pkg.test:8080".to_string(),
        "rebind.test:8080".to_string(),
        format!("{}:8080", host.addr),
    ];
    let r = d.spawn(&probe(host.addr, allow.clone())).await.unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        r.exit_code,
        Some(0),
        "{out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["name"], "ok:a: hi", "{v}");
    assert_eq!(v["addr"], "ok:a: hi", "{v}");
    assert_eq!(v["port"], "ConnectionRefusedError:111", "{v}");
    assert_eq!(v["host"], "OSError:101", "no route: {v}");
    assert!(
        v["unlisted"].as_str().unwrap().starts_with("gaierror"),
        "{v}"
    );
    assert!(v["rebind"].as_str().unwrap().starts_with("gaierror"), "{v}");
    assert_eq!(v["meta"], "OSError:101", "{v}");
    let net = r.network.as_ref().expect("a network report");
    assert_eq!(net.connections_allowed, 2);
    assert_eq!((net.bytes_out, net.bytes_in), (4, 10));
    assert!(net.dns_refused >= 2, "{net:?}");
    assert!(net
        .log
        .iter()
        .any(|e| e.kind == "connect" && e.host.as_deref() == Some("pkg.test")));
    assert!(net
        .log
        .iter()
        .any(|e| e.kind == "dns" && e.destination == "rebind.test"));

    // And in the metrics.
    let text = common::scrape::scrape(d.metrics_addr().unwrap()).await;
    for (name, kind, value) in [
        ("forkd_egress_bytes_total", "in", 10.0),
        ("forkd_egress_bytes_total", "out", 4.0),
        ("forkd_egress_connections_total", "allowed", 2.0),
    ] {
        assert_eq!(
            common::scrape::sample(&text, name, &[("kind", kind)]),
            Some(value),
            "{name} {kind} in\n{text}"
        );
    }

    // A bystander without an allowlist: no network at all, no report.
    let plain = d.spawn(&probe(host.addr, vec![])).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(v["addr"], "OSError:101", "{v}");
    assert!(
        v["name"].as_str().unwrap().starts_with("gaierror") || v["name"] == "OSError:101",
        "{v}"
    );
    assert!(plain.network.is_none());

    // The audit record carries the allowlist and the counters.
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&audit)
            .is_ok_and(|s| s.lines().count() == 2))
        .await
    );
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&audit)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["requested"]["allow_net"][0], "pkg.test:8080");
    assert_eq!(first["network"]["bytes_in"], 10);
    d.finish().await;
}

#[test]
fn bad_allowlists_are_refused_at_admission_naming_the_rule() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(bad_allowlists_are_refused_at_admission_naming_the_rule_());
}

async fn bad_allowlists_are_refused_at_admission_naming_the_rule_() {
    let d = TestDaemon::start(|_| {}).await;
    let ask = |allow: &[&str]| {
        let mut r = req("print(1)");
        r.allow_net = allow.iter().map(|s| s.to_string()).collect();
        r
    };
    let cases: &[(&[&str], ErrorCode, &str)] = &[
        (
            &["169.254.169.254:80"],
            ErrorCode::LimitExceedsPolicy,
            "169.254.0.0/16",
        ),
        (
            &["[fd00:ec2::254]:80"],
            ErrorCode::LimitExceedsPolicy,
            "fd00:ec2::254/128",
        ),
        // The proxy connects from the host's namespace: its loopback stays closed.
        (
            &["127.0.0.1:22"],
            ErrorCode::LimitExceedsPolicy,
            "127.0.0.0/8",
        ),
        (&["[::1]:22"], ErrorCode::LimitExceedsPolicy, "::1/128"),
        (&["*"], ErrorCode::LimitExceedsPolicy, "allow_wildcards"),
        (
            &["0.0.0.0/0:443"],
            ErrorCode::LimitExceedsPolicy,
            "allow_wildcards",
        ),
        (&["pkg.test:99999"], ErrorCode::InvalidRequest, "1-65535"),
        (&["pkg..test:80"], ErrorCode::InvalidRequest, "empty label"),
        (&["10.0.0.1/8"], ErrorCode::InvalidRequest, "10.0.0.0/8"),
        (&["pkg.test"], ErrorCode::InvalidRequest, "name the ports"),
    ];
    for (allow, code, says) in cases {
        let e = server_error(d.spawn(&ask(allow)).await.unwrap_err());
        assert_eq!(e.code, *code, "{allow:?}: {}", e.message);
        assert!(e.message.contains(says), "{allow:?}: {}", e.message);
    }
    let many: Vec<String> = (0..65).map(|i| format!("h{i}.test:443")).collect();
    let mut r = req("print(1)");
    r.allow_net = many;
    let e = server_error(d.spawn(&r).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::InvalidRequest, "{}", e.message);
    // The daemon still serves.
    assert_eq!(d.run("print(2)").await.stdout, b"2\n");
    d.finish().await;
}

#[test]
fn a_zygote_narrows_the_network_bound_for_its_requests() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(a_zygote_narrows_the_network_bound_for_its_requests_());
}

async fn a_zygote_narrows_the_network_bound_for_its_requests_() {
    let d = TestDaemon::start(|c| {
        let mut narrow = c.zygotes[0].clone();
        narrow.name = "narrow".into();
        narrow.warm_pool = 0;
        narrow.network_allow = Some(vec!["198.18.0.0/15:8000-8099".into()]);
        narrow.network_deny = vec!["198.18.7.0/24".into()];
        c.zygotes.push(narrow);
    })
    .await;
    let ask = |zygote: &str, allow: &str| {
        let mut r = req("print(1)");
        r.zygote = Some(zygote.into());
        r.allow_net = vec![allow.into()];
        r
    };
    // The zygote's own allow bound, named in the refusal.
    let e = server_error(d.spawn(&ask("narrow", "pkg.test:443")).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::LimitExceedsPolicy, "{}", e.message);
    assert!(
        e.message.contains("zygote `narrow` network_allow")
            && e.message.contains("198.18.0.0/15:8000-8099"),
        "{}",
        e.message
    );
    // Its extra deny rule, and the daemon-wide one, both hold.
    let e = server_error(
        d.spawn(&ask("narrow", "198.18.7.9:8080"))
            .await
            .unwrap_err(),
    );
    assert!(e.message.contains("198.18.7.0/24"), "{}", e.message);
    // Inside its bound: admitted (nothing is sent: the program does not connect).
    let r = d.spawn(&ask("narrow", "198.18.0.9:8080")).await.unwrap();
    assert_eq!(r.stdout, b"1\n");
    // The default zygote keeps the [network] bound.
    let r = d.spawn(&ask("default", "pkg.test:443")).await.unwrap();
    assert_eq!(r.stdout, b"1\n");
    d.finish().await;
}

#[test]
fn many_sandboxes_with_network_leave_nothing_behind() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(many_sandboxes_with_network_leave_nothing_behind_());
}

async fn many_sandboxes_with_network_leave_nothing_behind_() {
    let n: usize = std::env::var("FORKD_EGRESS_SPAWNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let host = TestHost::create();
    host.echo(8080, "a");
    let links_before = std::fs::read_dir("/sys/class/net").unwrap().count();
    let d = TestDaemon::start(|_| {}).await;
    let code = "import socket,sys\ns=socket.create_connection((sys.argv[1],8080),timeout=5)\ns.sendall(b'x')\nprint(s.recv(10).decode())";
    let mut r = req(code);
    r.argv = vec![host.addr.to_string()];
    r.allow_net = vec![format!("{}:8080", host.addr)];
    let mut bytes = 0;
    for i in 0..n {
        let res = d.spawn(&r).await.unwrap();
        assert_eq!(
            res.stdout,
            b"a: x\n",
            "spawn {i}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        bytes += res.network.unwrap().bytes_in;
    }
    assert_eq!(bytes, 4 * n as u64);
    // No interface was made for any sandbox (and none is left).
    assert_eq!(
        std::fs::read_dir("/sys/class/net").unwrap().count(),
        links_before
    );
    d.finish().await;
}

/// The index pip would use, from pip's own configuration (PIP_INDEX_URL,
/// `pip config`, else pip's built-in default), and pip's CA bundle setting:
/// (hosts to allowlist, cert path). Never spelled out in this repository.
fn pip_index() -> Option<(Vec<String>, Option<String>)> {
    let py = python();
    let script = r#"
import os, sys, urllib.parse
from pip._internal.configuration import Configuration
from pip._internal.models.index import PyPI
c = Configuration(isolated=False); c.load()
vals = dict(c.items())
def get(k):
    for key in (":env:." + k, "global." + k, "install." + k):
        if key in vals: return vals[key]
    return None
index = os.environ.get("PIP_INDEX_URL") or get("index-url") or PyPI.simple_url
hosts = [urllib.parse.urlsplit(index).hostname]
if index == PyPI.simple_url:
    hosts.append(PyPI.file_storage_domain)
print(" ".join(hosts)); print(os.environ.get("PIP_CERT") or get("cert") or "")
"#;
    let out = std::process::Command::new(&py)
        .args(["-c", script])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    let hosts: Vec<String> = lines.next()?.split_whitespace().map(String::from).collect();
    let cert = lines.next().filter(|c| !c.is_empty()).map(String::from);
    Some((hosts, cert))
}

#[test]
fn pip_installs_a_package_with_only_the_index_hosts_allowed() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(pip_installs_a_package_with_only_the_index_hosts_allowed_());
}

async fn pip_installs_a_package_with_only_the_index_hosts_allowed_() {
    let Some((hosts, cert)) = pip_index() else {
        eprintln!("skipped: no pip in the test interpreter");
        return;
    };
    // The machine must reach the index at all (the only test that sends
    // traffic beyond test hosts, to the index pip itself is configured with).
    let reachable = hosts.iter().all(|h| {
        std::process::Command::new("getent")
            .args(["hosts", h])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !reachable {
        eprintln!("skipped: the package index ({hosts:?}) does not resolve on this machine");
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let mut r = req(concat!(
        "import subprocess, sys\n",
        "p = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', '--quiet',\n",
        "    '--target', '/tmp/pkgs', 'tabulate'], capture_output=True, text=True)\n",
        "print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)\n",
        "sys.path.insert(0, '/tmp/pkgs')\n",
        "import tabulate\n",
        "print(tabulate.tabulate([[1, 2]]))\n",
    ));
    r.timeout_ms = Some(170_000);
    r.allow_net = hosts.iter().map(|h| format!("{h}:443")).collect();
    r.env
        .insert("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into());
    if let Some(c) = cert {
        r.env.insert("PIP_CERT".into(), c);
    }
    let res = d.spawn(&r).await.unwrap();
    let net = res.network.clone().unwrap();
    assert_eq!(
        res.exit_code,
        Some(0),
        "{}\n{net:#?}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(String::from_utf8_lossy(&res.stdout).contains("1  2"));
    assert!(
        net.connections_allowed >= 1 && net.bytes_in > 10_000,
        "{net:?}"
    );
    assert!(net
        .log
        .iter()
        .filter(|e| e.kind == "connect")
        .all(|e| e.port == Some(443) && e.allowed));
    d.finish().await;
}

#[test]
fn a_session_keeps_its_allowlist_across_cells_and_commands() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(a_session_keeps_its_allowlist_across_cells_and_commands_());
}

async fn a_session_keeps_its_allowlist_across_cells_and_commands_() {
    let host = TestHost::create();
    host.echo(8080, "a");
    let names: HashMap<String, _> = [("pkg.test".to_string(), host.addr)].into_iter().collect();
    let dns = host.dns(names, 60);
    let d = TestDaemon::start(move |c| c.network.resolvers = Some(vec![dns.to_string()])).await;
    let c = d.client().await;
    let s = c
        .session_create(&forkd_ipc::SessionCreate {
            allow_net: vec!["pkg.test:8080".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .session;
    let talk = "import socket\ns = socket.create_connection(('pkg.test', 8080), timeout=5)\ns.sendall(b'hi')\nreply = s.recv(100).decode()\ns.close()\nreply";
    for _ in 0..2 {
        let r = c
            .run_code(&forkd_ipc::RunCode {
                session: s.clone(),
                code: talk.into(),
                timeout_ms: Some(20_000),
            })
            .await
            .unwrap();
        assert_eq!(r.text.as_deref(), Some("'a: hi'"), "{r:?}");
    }
    let r = c
        .run_code(&forkd_ipc::RunCode {
            session: s.clone(),
            code: format!(
                "import socket\ntry:\n    socket.create_connection(('{}', 8081), timeout=5)\n    got = 'reached'\nexcept OSError as e:\n    got = type(e).__name__\ngot",
                host.addr
            ),
            timeout_ms: Some(20_000),
        })
        .await
        .unwrap();
    assert_eq!(r.text.as_deref(), Some("'ConnectionRefusedError'"), "{r:?}");
    // A branch inherits the allowlist (its own egress, in its own network
    // namespace), and changing the branch's leaves the parent's alone.
    let b = c
        .session_branch(forkd_ipc::SessionBranch {
            session: s.clone(),
            count: 1,
            same_seed: false,
            force: false,
            labels: None,
        })
        .await
        .unwrap()
        .remove(0);
    assert_eq!(b.allow_net, vec!["pkg.test:8080".to_string()]);
    let run = |session: &str, code: &str| forkd_ipc::RunCode {
        session: session.into(),
        code: code.into(),
        timeout_ms: Some(20_000),
    };
    let r = c.run_code(&run(&b.session, talk)).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("'a: hi'"), "{r:?}");
    c.session_set_network(&b.session, &[]).await.unwrap();
    let r = c
        .run_code(&run(
            &b.session,
            "import socket\ntry:\n    socket.create_connection(('pkg.test', 8080), timeout=5)\n    got = 'reached'\nexcept OSError as e:\n    got = type(e).__name__\ngot",
        ))
        .await
        .unwrap();
    assert_ne!(r.text.as_deref(), Some("'reached'"), "{r:?}");
    let r = c.run_code(&run(&s, talk)).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("'a: hi'"), "{r:?}");
    c.session_kill(&s).await.unwrap();
    drop(c);
    d.finish().await;
}

#[test]
fn a_session_changes_its_allowlist_within_the_bound() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(a_session_changes_its_allowlist_within_the_bound_());
}

async fn a_session_changes_its_allowlist_within_the_bound_() {
    let host = TestHost::create();
    host.echo(8080, "a");
    host.echo(8081, "b");
    let names: HashMap<String, _> = [("pkg.test".to_string(), host.addr)].into_iter().collect();
    let dns = host.dns(names, 60);
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.network.resolvers = Some(vec![dns.to_string()]);
        c.metrics_listen = Some("127.0.0.1:0".into());
        c.audit_log = Some(a2);
    })
    .await;
    let c = d.client().await;
    // No allowlist at creation: no network, as for spawn.
    let s = c
        .session_create(&forkd_ipc::SessionCreate::default())
        .await
        .unwrap()
        .session;
    let cell = |code: String| forkd_ipc::RunCode {
        session: s.clone(),
        code,
        timeout_ms: Some(20_000),
    };
    // One line per destination: the echo's reply, or the error's class.
    let reach = |target: &str, port: u16| {
        format!(
            "import socket\ntry:\n    c = socket.create_connection(('{target}', {port}), timeout=5)\n    c.sendall(b'hi')\n    got = c.recv(100).decode()\n    c.close()\nexcept OSError as e:\n    got = type(e).__name__\ngot"
        )
    };
    let addr = host.addr.to_string();
    let text = |r: forkd_ipc::CellResult| r.text.unwrap_or_default();
    assert_eq!(
        text(c.run_code(&cell(reach(&addr, 8080))).await.unwrap()),
        "'OSError'",
        "no route without an allowlist"
    );

    // Opened by name.
    let info = c
        .session_set_network(&s, &["pkg.test:8080".into()])
        .await
        .unwrap();
    assert_eq!(info.allow_net, vec!["pkg.test:8080".to_string()]);
    assert_eq!(
        text(c.run_code(&cell(reach("pkg.test", 8080))).await.unwrap()),
        "'a: hi'"
    );

    // Replaced by an address on another port: the name and the old port close.
    c.session_set_network(&s, &[format!("{addr}:8081")])
        .await
        .unwrap();
    assert_eq!(
        text(c.run_code(&cell(reach(&addr, 8081))).await.unwrap()),
        "'b: hi'"
    );
    assert_eq!(
        text(c.run_code(&cell(reach(&addr, 8080))).await.unwrap()),
        "'ConnectionResetError'",
        "a port the list dropped is refused by the proxy"
    );
    assert_eq!(
        text(c.run_code(&cell(reach("pkg.test", 8081))).await.unwrap()),
        "'gaierror'",
        "a name the list dropped no longer resolves"
    );

    // Outside the operator's bound: refused naming the rule, the list in force stays.
    let e = server_error(
        c.session_set_network(&s, &["169.254.169.254:80".into()])
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, forkd_ipc::ErrorCode::LimitExceedsPolicy, "{e:?}");
    assert!(e.message.contains("169.254.0.0/16"), "{e:?}");
    assert_eq!(
        text(c.run_code(&cell(reach(&addr, 8081))).await.unwrap()),
        "'b: hi'"
    );

    // The same from forkd-run.
    let (socket, sid) = (d.socket.clone(), s.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(["session", "net", "--socket"])
            .arg(&socket)
            .args([sid.as_str(), "198.18.0.9:80", "pkg.test:8080"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["allow_net"],
        serde_json::json!(["198.18.0.9:80", "pkg.test:8080"])
    );
    assert_eq!(
        text(c.run_code(&cell(reach("pkg.test", 8080))).await.unwrap()),
        "'a: hi'"
    );

    // Emptied: no new connection gets out.
    let info = c.session_set_network(&s, &[]).await.unwrap();
    assert!(info.allow_net.is_empty());
    let closed = text(c.run_code(&cell(reach(&addr, 8081))).await.unwrap());
    assert!(
        closed == "'ConnectionRefusedError'" || closed == "'OSError'",
        "{closed}"
    );
    c.session_kill(&s).await.unwrap();
    // A session's egress is counted and audited like a spawn's: each change
    // of its list, and its traffic when its egress stops (here: emptied).
    let records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || records().iter().any(|r| r
            ["event"]
            == "session_network_changed"
            && r["allow_net"] == serde_json::json!([])
            && r["network"]["bytes_out"].as_u64() > Some(0)))
        .await,
        "{:?}",
        records()
    );
    assert!(records()
        .iter()
        .any(|r| r["event"] == "session_network_changed"
            && r["allow_net"] == serde_json::json!(["pkg.test:8080"])));
    let text = common::scrape::scrape(d.metrics_addr().unwrap()).await;
    let out = common::scrape::sample(&text, "forkd_egress_bytes_total", &[("kind", "out")]);
    assert!(out.is_some_and(|n| n > 0.0), "{text}");
    drop(c);
    d.finish().await;
}

#[test]
fn a_bandwidth_limit_slows_a_sandbox_down() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    serial(a_bandwidth_limit_slows_a_sandbox_down_());
}

/// `[network] bandwidth`: 3 MiB at 1 MiB/s takes about 3 s (the bucket
/// lends a tenth of a second). Only the lower bound is asserted: load can
/// make it slower, never faster.
async fn a_bandwidth_limit_slows_a_sandbox_down_() {
    let host = TestHost::create();
    host.sink(9000);
    let d = TestDaemon::start(|c| c.network.bandwidth = Some(1 << 20)).await;
    let mut r = req(&format!(
        "import socket, time\nt = time.monotonic()\ns = socket.create_connection(('{}', 9000), timeout=30)\ns.sendall(b'x' * (3 << 20))\ns.shutdown(socket.SHUT_WR)\ngot = s.recv(100).decode()\nprint(got, round(time.monotonic() - t, 2))",
        host.addr
    ));
    r.allow_net = vec![format!("{}:9000", host.addr)];
    r.timeout_ms = Some(60_000);
    let res = d.spawn(&r).await.unwrap();
    let out = String::from_utf8_lossy(&res.stdout).to_string();
    let mut words = out.split_whitespace();
    assert_eq!(
        words.next(),
        Some("3145728"),
        "{out} {}",
        res.stderr_lossy()
    );
    let secs: f64 = words.next().unwrap().parse().unwrap();
    assert!(secs >= 2.5, "3 MiB at 1 MiB/s took {secs} s");
    let net = res.network.expect("a network report");
    assert_eq!(net.bytes_out, 3 << 20);
    d.finish().await;
}
