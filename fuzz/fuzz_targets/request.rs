//! Request parsing and validation: a frame body as the daemon receives it.
//!
//! Runs exactly the daemon's code: `forkd::server::parse_request` (JSON →
//! request, version check, error reply) and, for spawn requests,
//! `forkd::admission::Admission::resolve` (defaults, limits against the maximum, paths,
//! env, argv) and `forkd::sandbox::job_frame` (what the child is sent).
//! Checked: nothing panics; every refusal is a typed reply that encodes; an
//! accepted request's limits lie between the minimums and the configured
//! maximum, and its files fit the scratch size and stay inside it.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use forkd::admission::Admission;
use forkd::config::{Config, ZygoteSection};
use forkd_ipc::frame::{encode_frame, peek_request_id};
use forkd_ipc::{ErrorCode, RequestBody, Response, ResponseBody, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

struct Setup {
    config: Config,
    policies: BTreeMap<String, forkd_zygote::Policy>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let mut config = Config::default();
        config.zygotes = vec![
            ZygoteSection::default(),
            ZygoteSection {
                name: "other".into(),
                ..ZygoteSection::default()
            },
        ];
        config.validate().expect("the fuzz config is valid");
        let policies = config.load_policies().expect("built-in policies load");
        Setup { config, policies }
    })
}

fuzz_target!(|body: &[u8]| {
    let Setup { config, policies } = setup();
    let request = match forkd::server::parse_request(body) {
        Ok(r) => r,
        Err((id, e)) => {
            assert!(
                matches!(
                    e.code,
                    ErrorCode::MalformedFrame | ErrorCode::UnsupportedVersion
                ),
                "{e:?}"
            );
            assert!(!e.message.is_empty());
            // Parse failures carry the best-effort id; a wrong version with a
            // valid shape carries the request's own.
            if e.code == ErrorCode::MalformedFrame {
                assert_eq!(id, peek_request_id(body));
            }
            let reply = Response {
                v: PROTOCOL_VERSION,
                id,
                body: ResponseBody::Error(e),
            };
            encode_frame(&reply).expect("an error reply always encodes");
            return;
        }
    };
    let RequestBody::Spawn(spawn) = &request.body else {
        return;
    };
    for enforced in [true, false] {
        let resolved = match Admission::new(config, policies, enforced).resolve(spawn) {
            Ok(r) => r,
            Err(e) => {
                assert!(
                    matches!(
                        e.code,
                        ErrorCode::InvalidRequest
                            | ErrorCode::LimitExceedsPolicy
                            | ErrorCode::UnknownZygote
                            | ErrorCode::UnknownPolicy
                    ),
                    "{e:?}"
                );
                assert!(!e.message.is_empty());
                continue;
            }
        };
        let (l, max) = (&resolved.limits, &config.limits.max);
        assert_eq!(l.cgroup_enforced, enforced);
        assert!((1..=max.timeout_ms).contains(&l.timeout_ms), "{l:?}");
        assert!(
            (8 << 20..=max.memory_bytes).contains(&l.memory_bytes),
            "{l:?}"
        );
        assert!(
            l.cpus.is_finite() && l.cpus >= 0.01 && l.cpus <= max.cpus,
            "{l:?}"
        );
        assert!((1..=max.pids).contains(&l.pids), "{l:?}");
        assert!((1..=max.output_bytes).contains(&l.output_bytes), "{l:?}");
        assert!(
            (4096..=max.scratch_bytes).contains(&l.scratch_bytes),
            "{l:?}"
        );
        assert!((16..=max.open_files).contains(&l.open_files), "{l:?}");
        assert!(
            (1..=max.file_size_bytes).contains(&l.file_size_bytes),
            "{l:?}"
        );
        assert!(config
            .zygote_sections()
            .iter()
            .any(|z| z.name == resolved.zygote));
        assert!(policies.contains_key(&resolved.policy));
        let total: u64 = spawn.files.iter().map(|f| f.content.len() as u64).sum();
        assert!(total <= l.scratch_bytes);
        for f in &spawn.files {
            let p = std::path::Path::new(&f.path);
            assert!(p.is_relative() && !f.path.contains('\0'), "{:?}", f.path);
            assert!(
                p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{:?}",
                f.path
            );
            assert!(f.mode.is_none_or(|m| m & !0o777 == 0));
        }
        // The job the child would read: a length prefix, then JSON.
        let job = forkd::sandbox::job_frame(spawn).expect("a request within the frame limit encodes");
        let len = u32::from_be_bytes(job[..4].try_into().unwrap()) as usize;
        assert_eq!(len, job.len() - 4);
        serde_json::from_slice::<serde_json::Value>(&job[4..]).expect("the job is JSON");
    }
});
