//! Wire-shape tests for the message types. The exact-string assertions are
//! deliberate: any change to the JSON a peer sees must fail here first.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

use std::collections::BTreeMap;

use forkd_ipc::frame::{peek_request_id, read_frame, write_frame};
use forkd_ipc::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Every byte value, so base64 fields are exercised with invalid UTF-8.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

fn sample_spawn() -> SpawnRequest {
    SpawnRequest {
        zygote: Some("py312".into()),
        program: Program::Code("import sys; print(sys.stdin.read().upper())".into()),
        argv: vec!["--fast".into()],
        stdin: b"hello\n".to_vec(),
        env: BTreeMap::from([("LANG".to_string(), "C.UTF-8".to_string())]),
        files: vec![InlineFile {
            path: "data/in.bin".into(),
            content: vec![0x00, 0xff, 0xfe],
            mode: Some(0o600),
        }],
        timeout_ms: Some(5000),
        limits: Limits {
            memory_bytes: Some(268_435_456),
            cpus: Some(1.5),
            pids: Some(32),
            output_bytes: Some(1_048_576),
            scratch_bytes: Some(67_108_864),
            open_files: Some(256),
            file_size_bytes: Some(16_777_216),
        },
        policy: Some("default".into()),
        workspace: None,
        allow_net: vec![],
        terminal: vec![],
    }
}

fn sample_result() -> SpawnResult {
    SpawnResult {
        sandbox: 17,
        zygote: "py312".into(),
        exit_code: Some(0),
        signal: None,
        killed_by: None,
        stdout: b"HELLO\n".to_vec(),
        stderr: vec![0xc3, 0x28],
        stdout_truncated: false,
        stderr_truncated: false,
        timings: Timings {
            total_us: 4210,
            fork_us: 310,
            isolated_us: 980,
            run_us: 3050,
        },
        usage: Usage {
            cpu_user_us: 2100,
            cpu_system_us: 800,
            peak_memory_bytes: 9_437_184,
        },
        limits: AppliedLimits {
            timeout_ms: 5000,
            memory_bytes: 268_435_456,
            cpus: 1.5,
            pids: 32,
            output_bytes: 1_048_576,
            scratch_bytes: 67_108_864,
            open_files: 256,
            file_size_bytes: 16_777_216,
            cgroup_enforced: true,
        },
        warm: true,
        landlock: Some(LandlockStatus::FullyEnforced),
        workspace_delta: None,
        workspace_error: None,
        network: None,
    }
}

fn round_trip<T>(value: &T) -> T
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, value, "round trip through {text}");
    // And through a real frame.
    let mut wire = Vec::new();
    write_frame(&mut wire, value).unwrap();
    let framed: T = read_frame(&mut &wire[..]).unwrap();
    assert_eq!(&framed, value);
    back
}

#[test]
fn spawn_request_exact_json() {
    let req = Request {
        v: 1, // a version-1 request: its shape is unchanged in version 2
        id: 1,
        body: RequestBody::Spawn(sample_spawn()),
    };
    let expected = concat!(
        r#"{"v":1,"id":1,"op":"spawn","zygote":"py312","#,
        r#""program":{"code":"import sys; print(sys.stdin.read().upper())"},"#,
        r#""argv":["--fast"],"stdin":"aGVsbG8K","env":{"LANG":"C.UTF-8"},"#,
        r#""files":[{"path":"data/in.bin","content":"AP/+","mode":384}],"#,
        r#""timeout_ms":5000,"limits":{"memory_bytes":268435456,"cpus":1.5,"pids":32,"#,
        r#""output_bytes":1048576,"scratch_bytes":67108864,"open_files":256,"#,
        r#""file_size_bytes":16777216},"policy":"default"}"#
    );
    assert_eq!(serde_json::to_string(&req).unwrap(), expected);
    round_trip(&req);
}

#[test]
fn minimal_spawn_request_exact_json() {
    // Unset optionals are omitted; `limits` is always present.
    let req = Request {
        v: 1, // a version-1 request: its shape is unchanged in version 2
        id: 2,
        body: RequestBody::Spawn(SpawnRequest {
            program: Program::Script("/opt/job.py".into()),
            ..SpawnRequest::default()
        }),
    };
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"v":1,"id":2,"op":"spawn","program":{"script":"/opt/job.py"},"limits":{}}"#
    );
    round_trip(&req);
    // And `limits` may be left out on input.
    let parsed: Request =
        serde_json::from_str(r#"{"v":1,"id":2,"op":"spawn","program":{"script":"/opt/job.py"}}"#)
            .unwrap();
    assert_eq!(parsed, req);
}

/// `terminal` (added within version 2) is absent when empty, so a request
/// without it reads as before, and names the streams in snake case.
#[test]
fn terminal_streams_exact_json() {
    let mut spawn = sample_spawn();
    assert!(!serde_json::to_string(&spawn).unwrap().contains("terminal"));
    spawn.terminal = vec![Stream::Stdout, Stream::Stderr];
    let text = serde_json::to_string(&spawn).unwrap();
    assert!(
        text.ends_with(r#""policy":"default","terminal":["stdout","stderr"]}"#),
        "{text}"
    );
    round_trip(&spawn);
}

#[test]
fn allowlist_and_network_report_exact_json() {
    let mut spawn = sample_spawn();
    spawn.allow_net = vec!["pkg.example:443".into(), "198.18.0.0/15:80-81".into()];
    let text = serde_json::to_string(&spawn).unwrap();
    assert!(
        text.ends_with(
            r#""policy":"default","allow_net":["pkg.example:443","198.18.0.0/15:80-81"]}"#
        ),
        "{text}"
    );
    round_trip(&spawn);
    let mut result = sample_result();
    result.network = Some(Box::new(NetworkReport {
        bytes_out: 10,
        bytes_in: 20,
        connections_allowed: 1,
        connections_denied: 1,
        dns_queries: 2,
        dns_refused: 1,
        log: vec![NetEvent {
            kind: "connect".into(),
            destination: "198.18.0.1".into(),
            port: Some(80),
            allowed: true,
            bytes_out: 10,
            bytes_in: 20,
            ..NetEvent::default()
        }],
        log_truncated: false,
    }));
    let text = serde_json::to_string(&result).unwrap();
    assert!(
        text.ends_with(concat!(
            r#""landlock":"fully_enforced","network":{"bytes_out":10,"bytes_in":20,"connections_allowed":1,"#,
            r#""connections_denied":1,"dns_queries":2,"dns_refused":1,"log":[{"kind":"connect","#,
            r#""destination":"198.18.0.1","port":80,"allowed":true,"bytes_out":10,"bytes_in":20}],"#,
            r#""log_truncated":false}}"#
        )),
        "{text}"
    );
    round_trip(&result);
}

#[test]
fn result_exact_json() {
    let resp = Response {
        v: 1, // a version-1 request: its shape is unchanged in version 2
        id: 1,
        body: ResponseBody::Result(sample_result()),
    };
    let expected = concat!(
        r#"{"v":1,"id":1,"kind":"result","sandbox":17,"zygote":"py312","#,
        r#""exit_code":0,"signal":null,"killed_by":null,"#,
        r#""stdout":"SEVMTE8K","stderr":"wyg=","#,
        r#""stdout_truncated":false,"stderr_truncated":false,"#,
        r#""timings":{"total_us":4210,"fork_us":310,"isolated_us":980,"run_us":3050},"#,
        r#""usage":{"cpu_user_us":2100,"cpu_system_us":800,"peak_memory_bytes":9437184},"#,
        r#""limits":{"timeout_ms":5000,"memory_bytes":268435456,"cpus":1.5,"pids":32,"#,
        r#""output_bytes":1048576,"scratch_bytes":67108864,"open_files":256,"#,
        r#""file_size_bytes":16777216,"cgroup_enforced":true},"warm":true,"#,
        r#""landlock":"fully_enforced"}"#
    );
    assert_eq!(serde_json::to_string(&resp).unwrap(), expected);
    round_trip(&resp);
    // A daemon that does not report landlock leaves the field out, and a
    // client reads its absence as "unknown".
    let older = expected.replace(r#","landlock":"fully_enforced""#, "");
    let parsed: Response = serde_json::from_str(&older).unwrap();
    let ResponseBody::Result(r) = parsed.body else {
        panic!("not a result: {older}")
    };
    assert_eq!(r.landlock, None);
    for (text, status) in [
        ("partially_enforced", LandlockStatus::PartiallyEnforced),
        ("not_enforced", LandlockStatus::NotEnforced),
    ] {
        let json = format!("\"{text}\"");
        assert_eq!(serde_json::to_string(&status).unwrap(), json);
        assert_eq!(
            serde_json::from_str::<LandlockStatus>(&json).unwrap(),
            status
        );
    }
}

#[test]
fn ping_pong_and_error_exact_json() {
    let ping = Request {
        v: 1,
        id: 3,
        body: RequestBody::Ping,
    };
    assert_eq!(
        serde_json::to_string(&ping).unwrap(),
        r#"{"v":1,"id":3,"op":"ping"}"#
    );
    round_trip(&ping);

    let pong = Response {
        v: 1,
        id: 3,
        body: ResponseBody::Pong {
            daemon_version: "0.1.0".into(),
        },
    };
    assert_eq!(
        serde_json::to_string(&pong).unwrap(),
        r#"{"v":1,"id":3,"kind":"pong","daemon_version":"0.1.0"}"#
    );
    round_trip(&pong);

    let err = Response {
        v: 1,
        id: 0,
        body: ResponseBody::Error(ErrorReply {
            code: ErrorCode::MalformedFrame,
            message: "expected a JSON object".into(),
        }),
    };
    assert_eq!(
        serde_json::to_string(&err).unwrap(),
        r#"{"v":1,"id":0,"kind":"error","code":"malformed_frame","message":"expected a JSON object"}"#
    );
    round_trip(&err);
}

#[test]
fn every_error_code_round_trips_with_its_wire_name() {
    let codes = [
        (ErrorCode::MalformedFrame, "malformed_frame"),
        (ErrorCode::FrameTooLarge, "frame_too_large"),
        (ErrorCode::UnsupportedVersion, "unsupported_version"),
        (ErrorCode::InvalidRequest, "invalid_request"),
        (ErrorCode::LimitExceedsPolicy, "limit_exceeds_policy"),
        (ErrorCode::UnknownZygote, "unknown_zygote"),
        (ErrorCode::UnknownPolicy, "unknown_policy"),
        (ErrorCode::ZygoteUnavailable, "zygote_unavailable"),
        (ErrorCode::SpawnFailed, "spawn_failed"),
        (ErrorCode::ShuttingDown, "shutting_down"),
        (ErrorCode::Internal, "internal"),
    ];
    for (code, name) in codes {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(name));
        assert_eq!(code.to_string(), name);
        round_trip(&Response {
            v: 1,
            id: 5,
            body: ResponseBody::Error(ErrorReply {
                code,
                message: format!("because {name}"),
            }),
        });
    }
}

#[test]
fn every_killed_by_round_trips_with_its_wire_name() {
    let all = [
        (KilledBy::Timeout, "timeout"),
        (KilledBy::Oom, "oom"),
        (KilledBy::Pids, "pids"),
        (KilledBy::OutputLimit, "output_limit"),
        (KilledBy::Signal, "signal"),
        (KilledBy::Shutdown, "shutdown"),
    ];
    for (k, name) in all {
        assert_eq!(serde_json::to_value(k).unwrap(), json!(name));
        let mut r = sample_result();
        r.exit_code = None;
        r.signal = Some(9);
        r.killed_by = Some(k);
        round_trip(&Response {
            v: 1,
            id: 6,
            body: ResponseBody::Result(r),
        });
    }
}

#[test]
fn program_variants_round_trip() {
    for program in [
        Program::Code("print('é')".into()),
        Program::Script("/srv/x.py".into()),
        Program::Module("json.tool".into()),
    ] {
        round_trip(&Request {
            v: 1,
            id: u64::MAX,
            body: RequestBody::Spawn(SpawnRequest {
                program,
                ..SpawnRequest::default()
            }),
        });
    }
}

#[test]
fn base64_fields_carry_arbitrary_bytes() {
    for bytes in [
        Vec::new(),
        all_bytes(),
        vec![0xff; 1],
        vec![0x80, 0x00, 0xc0],
    ] {
        let mut req = sample_spawn();
        req.stdin = bytes.clone();
        req.files[0].content = bytes.clone();
        let back = round_trip(&Request {
            v: 1,
            id: 7,
            body: RequestBody::Spawn(req),
        });
        let RequestBody::Spawn(back) = back.body else {
            panic!("not a spawn")
        };
        assert_eq!(back.stdin, bytes);
        assert_eq!(back.files[0].content, bytes);

        let mut res = sample_result();
        res.stdout = bytes.clone();
        res.stderr = bytes.iter().rev().copied().collect();
        round_trip(&res);
    }
    // Padded standard alphabet on the wire.
    let mut res = sample_result();
    res.stdout = vec![0xfb, 0xff];
    let v = serde_json::to_value(&res).unwrap();
    assert_eq!(v["stdout"], json!("+/8="));
}

#[test]
fn invalid_base64_is_rejected() {
    let bad = r#"{"v":1,"id":1,"op":"spawn","program":{"code":"x"},"stdin":"!!!!"}"#;
    assert!(serde_json::from_str::<Request>(bad).is_err());
}

#[test]
fn unknown_fields_are_rejected() {
    let cases = [
        // Beside the spawn fields.
        r#"{"v":1,"id":1,"op":"spawn","program":{"code":"x"},"bogus":1}"#,
        // Typo of a limit.
        r#"{"v":1,"id":1,"op":"spawn","program":{"code":"x"},"limits":{"memory":1}}"#,
        // Inside a file.
        r#"{"v":1,"id":1,"op":"spawn","program":{"code":"x"},"files":[{"path":"a","content":"","owner":0}]}"#,
        // Unknown program kind.
        r#"{"v":1,"id":1,"op":"spawn","program":{"binary":"x"}}"#,
        // Beside ping.
        r#"{"v":1,"id":1,"op":"ping","bogus":1}"#,
        // Unknown op.
        r#"{"v":1,"id":1,"op":"exec"}"#,
        // Missing op / id / program.
        r#"{"v":1,"id":1}"#,
        r#"{"v":1,"op":"ping"}"#,
        r#"{"v":1,"id":1,"op":"spawn"}"#,
    ];
    for case in cases {
        assert!(
            serde_json::from_str::<Request>(case).is_err(),
            "accepted: {case}"
        );
    }
}

#[test]
fn wrong_version_still_parses_so_the_daemon_can_answer_unsupported_version() {
    let req: Request = serde_json::from_str(r#"{"v":2,"id":9,"op":"ping"}"#).unwrap();
    assert_eq!(req.v, 2);
    assert_eq!(req.id, 9);
}

#[test]
fn integer_cpus_accepted() {
    let req: Request = serde_json::from_str(
        r#"{"v":1,"id":1,"op":"spawn","program":{"code":"x"},"limits":{"cpus":2}}"#,
    )
    .unwrap();
    let RequestBody::Spawn(s) = req.body else {
        panic!("not a spawn")
    };
    assert_eq!(s.limits.cpus, Some(2.0));
}

#[test]
fn peek_request_id_on_unparseable_requests() {
    let unknown_op = br#"{"v":1,"id":12,"op":"exec"}"#;
    assert!(serde_json::from_slice::<Request>(unknown_op).is_err());
    assert_eq!(peek_request_id(unknown_op), 12);
    assert_eq!(peek_request_id(br#"{"v":1,"op":"exec"}"#), 0);
    assert_eq!(peek_request_id(b"{\"id\":3,"), 0);
}

#[test]
fn shell_status_convention() {
    let mut r = sample_result();
    r.exit_code = Some(3);
    r.signal = None;
    assert_eq!(r.shell_status(), 3);
    r.exit_code = None;
    r.signal = Some(9);
    assert_eq!(r.shell_status(), 137);
    r.signal = None;
    assert_eq!(r.shell_status(), 255);
    r.signal = Some(i32::MAX);
    assert_eq!(r.shell_status(), i32::MAX);
}

/// The JSON examples in PROTOCOL.md must parse, and must say everything the
/// types would say about them (no field dropped or misspelt).
#[test]
fn protocol_md_examples_are_valid() {
    let doc = include_str!("../PROTOCOL.md");
    let mut blocks = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("unterminated json block");
        blocks.push(&body[..end]);
        rest = &body[end..];
    }
    assert!(blocks.len() >= 4, "found only {} json blocks", blocks.len());
    let (mut requests, mut responses) = (0, 0);
    for block in blocks {
        let doc_value: Value = serde_json::from_str(block)
            .unwrap_or_else(|e| panic!("PROTOCOL.md block is not JSON ({e}):\n{block}"));
        let reparsed = if doc_value.get("op").is_some() {
            requests += 1;
            let r: Request = serde_json::from_value(doc_value.clone())
                .unwrap_or_else(|e| panic!("not a Request ({e}):\n{block}"));
            serde_json::to_value(r).unwrap()
        } else if doc_value.get("kind").is_some() {
            responses += 1;
            let r: Response = serde_json::from_value(doc_value.clone())
                .unwrap_or_else(|e| panic!("not a Response ({e}):\n{block}"));
            serde_json::to_value(r).unwrap()
        } else {
            panic!("PROTOCOL.md block is neither a request nor a response:\n{block}");
        };
        // Input may omit `limits`; everything else must match exactly.
        let mut reparsed = reparsed;
        if doc_value.get("limits").is_none() {
            if let Some(obj) = reparsed.as_object_mut() {
                if obj.get("limits") == Some(&json!({})) {
                    obj.remove("limits");
                }
            }
        }
        assert_eq!(doc_value, reparsed, "PROTOCOL.md example drifted:\n{block}");
    }
    assert!(requests >= 2 && responses >= 2);
}
