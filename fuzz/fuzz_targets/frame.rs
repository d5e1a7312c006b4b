//! Frame decoding: arbitrary bytes as the stream a hostile client sends.
//!
//! Input: byte 0 picks the reader's chunk size (to exercise the incremental
//! paths), byte 1 the frame size limit, the rest is the stream. Checked:
//! nothing panics or over-allocates; every frame read is exactly the bytes the
//! header announced, within the limit; the blocking reader and the daemon's
//! async reader (`read_frame_bytes_async_within`) agree on every outcome; a
//! JSON body re-encodes and decodes to the same value.
#![no_main]

use std::io::{self, Read};
use std::time::Duration;

use forkd_ipc::frame::{
    encode_frame, peek_request_id, peek_request_version, read_frame_bytes,
    read_frame_bytes_async_within, FrameError, HEADER_LEN,
};
use forkd_ipc::MAX_FRAME_BYTES;
use libfuzzer_sys::fuzz_target;

/// Hands out at most `step` bytes per read.
struct Dribble<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.data.len().min(self.step).min(out.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// One reader outcome, comparable across the two readers.
#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Vec<u8>),
    Empty,
    TooLarge { len: usize, max: usize },
    Truncated { expected: usize, got: usize },
    Closed,
    Other(String),
}

impl From<Result<Vec<u8>, FrameError>> for Outcome {
    fn from(r: Result<Vec<u8>, FrameError>) -> Self {
        match r {
            Ok(b) => Outcome::Frame(b),
            Err(FrameError::Empty) => Outcome::Empty,
            Err(FrameError::TooLarge { len, max }) => Outcome::TooLarge { len, max },
            Err(FrameError::Truncated { expected, got }) => Outcome::Truncated { expected, got },
            Err(FrameError::Closed) => Outcome::Closed,
            Err(e) => Outcome::Other(e.to_string()),
        }
    }
}

/// Whether the reader may go on after this outcome (the stream is in sync).
fn continues(o: &Outcome) -> bool {
    matches!(o, Outcome::Frame(_) | Outcome::Empty)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime")
    })
}

/// JSON equality, except that floats may differ in their last bits:
/// serde_json's default (fast) float parser is not correctly rounded, so
/// `7.777777777777777e54` can come back one ULP off. The protocol's only
/// float (`limits.cpus`) does not care; everything else must be exact.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same_json(vx, vy))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let [step, limit, stream @ ..] = data else {
        return;
    };
    let step = usize::from(*step).max(1);
    // Small limits exercise the refusal path; 0xff means the protocol maximum.
    let max = if *limit == 0xff {
        MAX_FRAME_BYTES
    } else {
        usize::from(*limit) * 8 + 1
    };

    // Blocking reader, dribbled.
    let mut reader = Dribble { data: stream, step };
    let mut blocking = Vec::new();
    let mut offset = 0usize;
    loop {
        let o = Outcome::from(read_frame_bytes(&mut reader, max));
        match &o {
            Outcome::Frame(body) => {
                assert!(!body.is_empty() && body.len() <= max);
                let header: [u8; HEADER_LEN] = stream[offset..offset + HEADER_LEN]
                    .try_into()
                    .expect("a frame was read, so its header is there");
                assert_eq!(u32::from_be_bytes(header) as usize, body.len());
                assert_eq!(
                    &stream[offset + HEADER_LEN..offset + HEADER_LEN + body.len()],
                    &body[..]
                );
                assert!(body.capacity() <= body.len().max(64 * 1024));
                offset += HEADER_LEN + body.len();
            }
            Outcome::Empty => offset += HEADER_LEN,
            Outcome::TooLarge { len, max: m } => assert!(*len > max && *m == max),
            Outcome::Truncated { expected, got } => assert!(got < expected),
            Outcome::Closed => assert_eq!(offset, stream.len()),
            Outcome::Other(e) => panic!("unexpected error from an in-memory stream: {e}"),
        }
        let more = continues(&o);
        blocking.push(o);
        if !more {
            break;
        }
    }

    // The daemon's reader over the same bytes must agree step by step.
    let asynchronous = runtime().block_on(async {
        let mut r = stream;
        let mut out = Vec::new();
        loop {
            let o = Outcome::from(
                read_frame_bytes_async_within(&mut r, max, Duration::from_secs(3600)).await,
            );
            let more = continues(&o);
            out.push(o);
            if !more {
                break out;
            }
        }
    });
    assert_eq!(blocking, asynchronous);

    for o in &blocking {
        let Outcome::Frame(body) = o else { continue };
        // What the daemon does with a body that is not a request must not panic.
        let _ = peek_request_id(body);
        let _ = peek_request_version(body);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Ok(frame) = encode_frame(&value) {
                let again = read_frame_bytes(&mut &frame[..], MAX_FRAME_BYTES)
                    .expect("an encoded frame decodes");
                let back: serde_json::Value =
                    serde_json::from_slice(&again).expect("an encoded frame is JSON");
                assert!(same_json(&back, &value), "{back} != {value}");
            }
        }
    }
});
