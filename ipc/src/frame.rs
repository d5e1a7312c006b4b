//! Length-prefixed JSON framing.
//!
//! A frame is a 4-byte big-endian unsigned length `N` followed by exactly `N`
//! bytes of UTF-8 JSON. `N == 0` and `N > max` are errors. Both directions use
//! the same framing and the same limit ([`MAX_FRAME_BYTES`] by default).
//!
//! Readers are written for hostile peers: the length prefix is checked against
//! `max` before anything is allocated, and the body buffer then grows only as
//! bytes arrive (to at most `max(64 KiB, 2 × received)`), so a peer that
//! announces a large frame and sends a few bytes costs us about what it sent
//! (it gets [`FrameError::Truncated`] at EOF), never an up-front allocation of
//! the announced size.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::MAX_FRAME_BYTES;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// Largest amount by which a body buffer grows per read. Bounds what a peer
/// can make us allocate beyond the bytes it has really sent.
const CHUNK: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed (including read/write timeouts, which
    /// surface as `WouldBlock` or `TimedOut`).
    #[error("I/O error on the frame stream: {0}")]
    Io(#[from] io::Error),
    /// The frame's length (announced by a peer, or of a message we were about
    /// to send) is above the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Length of the offending frame body.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The length prefix was zero; a frame must carry a JSON value.
    #[error("zero-length frame (every frame must carry a JSON object)")]
    Empty,
    /// The stream ended in the middle of a frame: inside the 4-byte header
    /// (`expected == 4`) or inside the body (`expected == N`).
    #[error("stream ended mid-frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the header or body should have had.
        expected: usize,
        /// Bytes that arrived before EOF.
        got: usize,
    },
    /// The stream ended cleanly exactly at a frame boundary.
    #[error("connection closed")]
    Closed,
    /// A frame began but did not complete within the allowed time (see
    /// [`read_frame_bytes_async_within`]).
    #[error("a frame began but was not completed within {after:?}")]
    Stalled {
        /// The time allowed.
        after: std::time::Duration,
    },
    /// The frame body was not valid JSON for the expected type, or a message
    /// could not be serialized.
    #[error("frame is not valid JSON for the expected message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Serializes `msg` into a complete frame (header and body) ready to be
/// written with one `write_all`.
///
/// Refuses bodies above [`MAX_FRAME_BYTES`] with [`FrameError::TooLarge`]:
/// the peer would refuse them anyway, and failing here keeps the connection
/// usable.
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Reserve the header up front so header and body end up in one buffer
    // without a copy; the placeholder is patched once the length is known.
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0; HEADER_LEN]);
    serde_json::to_writer(&mut buf, msg)?;
    let len = buf.len() - HEADER_LEN;
    if len == 0 {
        // Unreachable with serde_json (the shortest JSON text is one byte),
        // but a zero-length frame must never reach the wire.
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: MAX_FRAME_BYTES,
    })?;
    buf[..HEADER_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// Serializes `msg` and writes it as one frame.
///
/// The whole frame goes out in a single `write_all` so that concurrent
/// writers that each hold the stream for one call cannot interleave a header
/// with someone else's body.
pub fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: Write + ?Sized,
    T: Serialize + ?Sized,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Async counterpart of [`write_frame`].
///
/// Not cancellation-safe: dropping the future mid-write leaves a partial
/// frame on the stream. Callers that need timeouts should run writes on a
/// task of their own (as [`AsyncClient`](crate::AsyncClient) does).
pub async fn write_frame_async<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
    T: Serialize + ?Sized,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Validates a length prefix against `max`.
fn check_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    // u32 always fits in usize on the 32/64-bit targets forkd runs on; saturate
    // rather than truncate anywhere else so the limit check still holds.
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Grows `buf` once every byte of it has been filled: to at least [`CHUNK`],
/// otherwise by doubling, and never past the frame's `len`. So memory stays
/// within `max(CHUNK, 2 × bytes received)` whatever the peer announced, and
/// each byte is zeroed once (the buffer is never shrunk between reads).
fn grow(buf: &mut Vec<u8>, len: usize) {
    let target = buf.len().saturating_mul(2).max(CHUNK).min(len);
    // reserve_exact: plain `resize` could over-allocate past `len`.
    buf.reserve_exact(target - buf.len());
    buf.resize(target, 0);
}

/// The frame reader's state, without I/O: the one implementation behind
/// the blocking and the async readers. Each step, the reader reads into
/// [`Self::space`] and reports the count with [`Self::advance`], which says
/// when the frame is complete (or why it cannot be).
#[derive(Debug)]
struct FrameDecoder {
    max: usize,
    header: [u8; HEADER_LEN],
    got_header: usize,
    /// The body's announced length, once the header is complete and checked.
    len: Option<usize>,
    body: Vec<u8>,
    filled: usize,
}

impl FrameDecoder {
    fn new(max: usize) -> Self {
        FrameDecoder {
            max,
            header: [0; HEADER_LEN],
            got_header: 0,
            len: None,
            body: Vec::new(),
            filled: 0,
        }
    }

    /// Whether any byte of the frame has arrived.
    fn begun(&self) -> bool {
        self.got_header > 0
    }

    /// Where the next read goes: the rest of the header, or the body's
    /// buffer (grown as bytes arrive, never to the announced size at once).
    fn space(&mut self) -> &mut [u8] {
        match self.len {
            None => &mut self.header[self.got_header..],
            Some(len) => {
                if self.filled == self.body.len() {
                    grow(&mut self.body, len);
                }
                &mut self.body[self.filled..]
            }
        }
    }

    /// Accounts `n` bytes read into [`Self::space`] (0: end of stream).
    /// `Ok(Some(body))` once the frame is complete.
    fn advance(&mut self, n: usize) -> Result<Option<Vec<u8>>, FrameError> {
        match self.len {
            None if n == 0 && self.got_header == 0 => Err(FrameError::Closed),
            None if n == 0 => Err(FrameError::Truncated {
                expected: HEADER_LEN,
                got: self.got_header,
            }),
            None => {
                self.got_header += n;
                if self.got_header < HEADER_LEN {
                    return Ok(None);
                }
                let len = check_len(self.header, self.max)?;
                self.len = Some(len);
                Ok(None)
            }
            Some(len) if n == 0 => Err(FrameError::Truncated {
                expected: len,
                got: self.filled,
            }),
            Some(len) => {
                self.filled += n;
                if self.filled < len {
                    return Ok(None);
                }
                let mut body = std::mem::take(&mut self.body);
                body.truncate(len);
                Ok(Some(body))
            }
        }
    }
}

/// Reads one frame's body (without parsing it).
///
/// Errors: [`FrameError::Closed`] on EOF before the first header byte,
/// [`FrameError::Truncated`] on EOF anywhere later in the frame,
/// [`FrameError::Empty`] for a zero length prefix (the stream is still in
/// sync; the next frame can be read) and [`FrameError::TooLarge`] for one
/// over `max` (checked before allocating; the body is left unread, so the
/// stream is out of sync and the connection must be closed).
pub fn read_frame_bytes<R: Read + ?Sized>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut frame = FrameDecoder::new(max);
    loop {
        match r.read(frame.space()) {
            Ok(n) => {
                if let Some(body) = frame.advance(n)? {
                    return Ok(body);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads one frame (limit [`MAX_FRAME_BYTES`]) and parses it as `T`.
pub fn read_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: Read + ?Sized,
    T: DeserializeOwned,
{
    let bytes = read_frame_bytes(r, MAX_FRAME_BYTES)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Drives `frame` to completion from an async reader; `stop_when_begun`
/// returns `Ok(None)` as soon as the first byte has arrived.
async fn read_async<R>(
    r: &mut R,
    frame: &mut FrameDecoder,
    stop_when_begun: bool,
) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    loop {
        if stop_when_begun && frame.begun() {
            return Ok(None);
        }
        match r.read(frame.space()).await {
            Ok(n) => {
                if let Some(body) = frame.advance(n)? {
                    return Ok(Some(body));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Async counterpart of [`read_frame_bytes`], with the same errors and the
/// same allocation bound.
///
/// Not cancellation-safe: dropping the future mid-frame loses the bytes read
/// so far. Keep one long-lived reader loop per connection rather than racing
/// this against a timer.
pub async fn read_frame_bytes_async<R>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut frame = FrameDecoder::new(max);
    match read_async(r, &mut frame, false).await? {
        Some(body) => Ok(body),
        None => Err(FrameError::Closed), // unreachable: only a stop returns None
    }
}

/// Like [`read_frame_bytes_async`], but once a frame has begun (its first
/// byte arrived) the rest must arrive within `rest`: a peer that sends half a
/// frame and stalls gets [`FrameError::Stalled`] rather than holding the
/// reader forever. Waiting for a frame to begin is not limited (an idle
/// connection is not a slow one).
pub async fn read_frame_bytes_async_within<R>(
    r: &mut R,
    max: usize,
    rest: std::time::Duration,
) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut frame = FrameDecoder::new(max);
    if let Some(body) = read_async(r, &mut frame, true).await? {
        return Ok(body);
    }
    match tokio::time::timeout(rest, read_async(r, &mut frame, false)).await {
        Ok(Ok(Some(body))) => Ok(body),
        Ok(Ok(None)) => Err(FrameError::Closed), // unreachable: no stop asked
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Stalled { after: rest }),
    }
}

/// Async counterpart of [`read_frame`].
pub async fn read_frame_async<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    let bytes = read_frame_bytes_async(r, MAX_FRAME_BYTES).await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Best-effort `"id"` of a frame that did not parse as a
/// [`Request`](crate::Request), so the error reply can still carry it.
///
/// Returns 0 (the "unroutable" id) when the body is not JSON, not an object,
/// or has no non-negative integer `id`.
pub fn peek_request_id(bytes: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

/// Best-effort `"v"` of a frame that did not parse as a
/// [`Request`](crate::Request). A daemon uses it to answer
/// `unsupported_version` rather than `malformed_frame` when a client of
/// another version sends shapes this version does not know.
///
/// Returns `None` when the body is not a JSON object with a non-negative
/// integer `v`. Kept as `u64` so that e.g. `2^32 + 1` is not mistaken for 1.
pub fn peek_request_version(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("v").and_then(serde_json::Value::as_u64))
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test values are small constants"
)]
mod tests {
    use super::*;
    use crate::protocol::{Request, RequestBody, PROTOCOL_VERSION};

    fn ping(id: u64) -> Request {
        Request {
            v: PROTOCOL_VERSION,
            id,
            body: RequestBody::Ping,
        }
    }

    /// A frame header announcing `len`.
    fn header(len: u32) -> Vec<u8> {
        len.to_be_bytes().to_vec()
    }

    /// A reader that hands out at most `step` bytes per call, to exercise the
    /// incremental paths.
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

    /// Raw JSON string body whose frame is exactly `len` bytes long.
    fn json_string_of_len(len: usize) -> String {
        assert!(len >= 2);
        "x".repeat(len - 2)
    }

    #[test]
    fn blocking_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &ping(7)).unwrap();
        write_frame(&mut wire, &ping(8)).unwrap();
        let body = br#"{"v":2,"id":7,"op":"ping"}"#;
        assert_eq!(&wire[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&wire[4..4 + body.len()], body);

        let mut r = &wire[..];
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), ping(7));
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), ping(8));
        assert!(matches!(
            read_frame::<_, Request>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn dribbled_reads_reassemble() {
        let big = "y".repeat(3 * CHUNK + 17);
        let frame = encode_frame(&big).unwrap();
        let mut r = Dribble {
            data: &frame,
            step: 1000,
        };
        let got: String = read_frame(&mut r).unwrap();
        assert_eq!(got, big);
        // One byte at a time through the header too.
        let mut r = Dribble {
            data: &frame,
            step: 1,
        };
        let bytes = read_frame_bytes(&mut r, MAX_FRAME_BYTES).unwrap();
        assert_eq!(bytes.len(), frame.len() - HEADER_LEN);
        assert!(
            bytes.capacity() <= bytes.len(),
            "capacity never exceeds the frame"
        );
    }

    #[tokio::test]
    async fn async_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for id in 1..=20 {
                write_frame_async(&mut a, &ping(id)).await.unwrap();
            }
        });
        for id in 1..=20 {
            let req: Request = read_frame_async(&mut b).await.unwrap();
            assert_eq!(req, ping(id));
        }
        writer.await.unwrap();
        assert!(matches!(
            read_frame_bytes_async(&mut b, MAX_FRAME_BYTES).await,
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn exactly_max_accepted_and_max_plus_one_refused_on_write() {
        let ok = json_string_of_len(MAX_FRAME_BYTES);
        let frame = encode_frame(&ok).unwrap();
        assert_eq!(frame.len(), HEADER_LEN + MAX_FRAME_BYTES);
        let mut r = &frame[..];
        assert_eq!(read_frame::<_, String>(&mut r).unwrap(), ok);

        let too_big = json_string_of_len(MAX_FRAME_BYTES + 1);
        let mut sink = Vec::new();
        match write_frame(&mut sink, &too_big) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, MAX_FRAME_BYTES + 1);
                assert_eq!(max, MAX_FRAME_BYTES);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(
            sink.is_empty(),
            "nothing may be written for a refused frame"
        );
    }

    #[test]
    fn max_plus_one_refused_on_read() {
        // A body of max bytes is read; a prefix of max+1 is refused before the
        // body is touched.
        let max = 1000;
        let mut wire = header(max as u32);
        wire.extend(vec![b' '; max]);
        assert_eq!(read_frame_bytes(&mut &wire[..], max).unwrap().len(), max);

        let mut wire = header(max as u32 + 1);
        wire.extend(vec![b' '; max + 1]);
        assert!(matches!(
            read_frame_bytes(&mut &wire[..], max),
            Err(FrameError::TooLarge {
                len: 1001,
                max: 1000
            })
        ));
    }

    #[tokio::test]
    async fn max_plus_one_refused_on_async_read() {
        let mut wire = header(MAX_FRAME_BYTES as u32 + 1);
        wire.extend_from_slice(b"{}");
        match read_frame_bytes_async(&mut &wire[..], MAX_FRAME_BYTES).await {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, MAX_FRAME_BYTES + 1);
                assert_eq!(max, MAX_FRAME_BYTES);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn zero_length_refused() {
        let wire = header(0);
        assert!(matches!(
            read_frame_bytes(&mut &wire[..], MAX_FRAME_BYTES),
            Err(FrameError::Empty)
        ));
    }

    #[tokio::test]
    async fn zero_length_refused_async() {
        let wire = header(0);
        assert!(matches!(
            read_frame_bytes_async(&mut &wire[..], MAX_FRAME_BYTES).await,
            Err(FrameError::Empty)
        ));
    }

    #[test]
    fn truncated_header() {
        for cut in 1..HEADER_LEN {
            let wire = header(10);
            match read_frame_bytes(&mut &wire[..cut], MAX_FRAME_BYTES) {
                Err(FrameError::Truncated { expected, got }) => {
                    assert_eq!((expected, got), (HEADER_LEN, cut));
                }
                other => panic!("expected Truncated, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn truncated_header_async() {
        let wire = header(10);
        assert!(matches!(
            read_frame_bytes_async(&mut &wire[..2], MAX_FRAME_BYTES).await,
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
    }

    #[test]
    fn truncated_body() {
        let mut wire = header(10);
        wire.extend_from_slice(b"{\"a\":");
        assert!(matches!(
            read_frame_bytes(&mut &wire[..], MAX_FRAME_BYTES),
            Err(FrameError::Truncated {
                expected: 10,
                got: 5
            })
        ));
    }

    #[tokio::test]
    async fn truncated_body_async() {
        let mut wire = header(10);
        wire.extend_from_slice(b"{\"a\":");
        assert!(matches!(
            read_frame_bytes_async(&mut &wire[..], MAX_FRAME_BYTES).await,
            Err(FrameError::Truncated {
                expected: 10,
                got: 5
            })
        ));
    }

    #[test]
    fn clean_eof_is_closed() {
        let empty: &[u8] = &[];
        assert!(matches!(
            read_frame_bytes(&mut &empty[..], MAX_FRAME_BYTES),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn hostile_length_prefix_is_refused_before_allocating() {
        // 0xFFFFFFFF with no body: refused from the header alone. If this
        // allocated 4 GiB first the test would abort or crawl.
        let wire = header(u32::MAX);
        match read_frame_bytes(&mut &wire[..], MAX_FRAME_BYTES) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, MAX_FRAME_BYTES);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn lying_prefix_allocates_only_what_arrived() {
        // Announces the maximum, sends ten bytes, then EOF: Truncated, and
        // the body buffer never grew beyond one read window.
        let body = b"0123456789";
        let mut frame = FrameDecoder::new(MAX_FRAME_BYTES);
        let mut stream = [&header(MAX_FRAME_BYTES as u32)[..], &body[..]].concat();
        let err = loop {
            let n = Read::read(&mut &stream[..], frame.space()).expect("read");
            stream.drain(..n);
            match frame.advance(n) {
                Ok(None) => continue,
                Ok(Some(_)) => panic!("a frame from ten bytes"),
                Err(e) => break e,
            }
        };
        assert!(matches!(
            err,
            FrameError::Truncated { expected, got: 10 } if expected == MAX_FRAME_BYTES
        ));
        assert!(
            frame.body.capacity() <= CHUNK,
            "capacity {}",
            frame.body.capacity()
        );

        // Same through the public entry point.
        let mut wire = header(MAX_FRAME_BYTES as u32);
        wire.extend_from_slice(body);
        assert!(matches!(
            read_frame_bytes(&mut &wire[..], MAX_FRAME_BYTES),
            Err(FrameError::Truncated { got: 10, .. })
        ));
    }

    #[test]
    fn json_error_is_reported() {
        let mut wire = header(3);
        wire.extend_from_slice(b"{x}");
        assert!(matches!(
            read_frame::<_, Request>(&mut &wire[..]),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn peek_request_id_best_effort() {
        assert_eq!(peek_request_id(br#"{"v":1,"id":42,"op":"nope"}"#), 42);
        assert_eq!(peek_request_id(br#"{"v":9,"id":7}"#), 7);
        assert_eq!(peek_request_id(br#"{"v":1,"op":"ping"}"#), 0);
        assert_eq!(peek_request_id(br#"{"id":"7"}"#), 0);
        assert_eq!(peek_request_id(br#"{"id":-1}"#), 0);
        assert_eq!(peek_request_id(br#"[1,2]"#), 0);
        assert_eq!(peek_request_id(b"not json"), 0);
        assert_eq!(peek_request_id(b"\xff\xfe"), 0);
    }

    #[test]
    fn peek_request_version_best_effort() {
        assert_eq!(
            peek_request_version(br#"{"v":2,"id":1,"op":"new_op"}"#),
            Some(2)
        );
        assert_eq!(
            peek_request_version(br#"{"v":4294967297}"#),
            Some(4_294_967_297)
        );
        assert_eq!(peek_request_version(br#"{"v":"1"}"#), None);
        assert_eq!(peek_request_version(br#"{"id":1}"#), None);
        assert_eq!(peek_request_version(b"{"), None);
    }
}
