//! The Connect protocol (connectrpc.com/docs/protocol) as envd serves it:
//! unary calls with a bare JSON or protobuf body, server-streaming calls
//! with enveloped messages (1 flag byte, 4-byte big-endian length) ending in
//! an end-of-stream envelope (flag 0x02) carrying `{}` or `{"error": ...}`.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest request message accepted.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Connect error codes (the ones the gateway answers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error (the protocol's table).
    pub fn http(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    /// The code.
    pub code: Code,
    /// What went wrong and what to do.
    pub message: String,
}

impl RpcError {
    /// An error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl From<crate::error::ApiError> for RpcError {
    fn from(e: crate::error::ApiError) -> Self {
        let code = match e.status.as_u16() {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::FailedPrecondition,
            413 | 429 => Code::ResourceExhausted,
            501 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        RpcError::new(code, e.message)
    }
}

impl From<forkd_ipc::ClientError> for RpcError {
    fn from(e: forkd_ipc::ClientError) -> Self {
        crate::error::ApiError::from(e).into()
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (self.code.http(), axum::Json(self.json())).into_response()
    }
}

/// The message codec a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    /// The codec of a unary (`streaming: false`) or streaming call, from its
    /// Content-Type.
    pub fn of(headers: &HeaderMap, streaming: bool) -> Result<Codec, RpcError> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let ct = ct
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let (json, proto) = if streaming {
            ("application/connect+json", "application/connect+proto")
        } else {
            ("application/json", "application/proto")
        };
        if ct == json {
            Ok(Codec::Json)
        } else if ct == proto {
            Ok(Codec::Proto)
        } else {
            Err(RpcError::new(
                Code::InvalidArgument,
                format!("content type {ct:?} is not {json} or {proto}"),
            ))
        }
    }

    fn content_type(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Codec::Json, false) => "application/json",
            (Codec::Proto, false) => "application/proto",
            (Codec::Json, true) => "application/connect+json",
            (Codec::Proto, true) => "application/connect+proto",
        }
    }

    /// Decodes one message.
    pub fn decode<T: prost::Message + Default + DeserializeOwned>(
        self,
        data: &[u8],
    ) -> Result<T, RpcError> {
        let bad =
            |e: String| RpcError::new(Code::InvalidArgument, format!("malformed request: {e}"));
        match self {
            Codec::Json if data.is_empty() => {
                serde_json::from_slice(b"{}").map_err(|e| bad(e.to_string()))
            }
            Codec::Json => serde_json::from_slice(data).map_err(|e| bad(e.to_string())),
            Codec::Proto => T::decode(data).map_err(|e| bad(e.to_string())),
        }
    }

    /// Encodes one message.
    pub fn encode<T: prost::Message + Serialize>(self, msg: &T) -> Vec<u8> {
        match self {
            // Serializing these plain structs cannot fail.
            Codec::Json => serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
            Codec::Proto => msg.encode_to_vec(),
        }
    }

    /// A unary answer.
    pub fn unary<T: prost::Message + Serialize>(self, msg: &T) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type(false)),
            )],
            self.encode(msg),
        )
            .into_response()
    }

    /// The one message of a server-streaming request body.
    pub fn unenvelope<T: prost::Message + Default + DeserializeOwned>(
        self,
        body: &[u8],
    ) -> Result<T, RpcError> {
        let bad =
            |why: &str| RpcError::new(Code::InvalidArgument, format!("malformed envelope: {why}"));
        let [flags, a, b, c, d, rest @ ..] = body else {
            return Err(bad("shorter than its 5-byte prefix"));
        };
        if flags & 1 != 0 {
            return Err(RpcError::new(
                Code::Unimplemented,
                "compressed messages are not accepted; send identity encoding",
            ));
        }
        let len = usize::try_from(u32::from_be_bytes([*a, *b, *c, *d])).unwrap_or(usize::MAX);
        if len != rest.len() {
            return Err(bad("length prefix does not match the body"));
        }
        self.decode(rest)
    }

    /// One data envelope.
    /// The length of the first envelope of `buf` when it is complete
    /// (`None`: more bytes are needed), for reading a client stream as it
    /// arrives; a message over [`MAX_MESSAGE`] is refused.
    pub fn next_envelope(buf: &[u8]) -> Result<Option<usize>, RpcError> {
        let [_, a, b, c, d, ..] = buf else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes([*a, *b, *c, *d])).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("a message of {len} bytes is over the {MAX_MESSAGE}-byte limit"),
            ));
        }
        Ok((buf.len() >= 5 + len).then_some(5 + len))
    }

    pub fn envelope<T: prost::Message + Serialize>(self, msg: &T) -> Bytes {
        frame(0, &self.encode(msg))
    }

    /// A streaming answer whose body is `frames` (already enveloped, the
    /// last one from [`end_stream`]).
    pub fn stream<S>(self, frames: S) -> Response
    where
        S: Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
    {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type(true)),
            )],
            Body::from_stream(frames),
        )
            .into_response()
    }

    /// A streaming call that failed before its first message.
    pub fn stream_error(self, e: RpcError) -> Response {
        let end = end_stream(Some(&e));
        self.stream(futures_util::stream::iter([Ok(end)]))
    }
}

fn frame(flags: u8, data: &[u8]) -> Bytes {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Bytes::from(out)
}

/// The end-of-stream envelope (always JSON).
pub fn end_stream(error: Option<&RpcError>) -> Bytes {
    let body = match error {
        Some(e) => serde_json::json!({"error": e.json()}),
        None => serde_json::json!({}),
    };
    frame(2, body.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let msg = pb::PathRequest {
            path: "/tmp".into(),
        };
        for codec in [Codec::Json, Codec::Proto] {
            let env = codec.envelope(&msg);
            let back: pb::PathRequest = codec.unenvelope(&env).unwrap();
            assert_eq!(back, msg);
        }
        let env = Codec::Json.envelope(&msg);
        assert!(Codec::Json
            .unenvelope::<pb::PathRequest>(&env[..3])
            .is_err());
        assert!(Codec::Json
            .unenvelope::<pb::PathRequest>(&env[..env.len() - 1])
            .is_err());
        let mut compressed = env.to_vec();
        compressed[0] = 1;
        assert_eq!(
            Codec::Json
                .unenvelope::<pb::PathRequest>(&compressed)
                .unwrap_err()
                .code,
            Code::Unimplemented
        );
        let end = end_stream(Some(&RpcError::new(Code::NotFound, "x")));
        assert_eq!(end[0], 2);
        assert!(std::str::from_utf8(&end[5..])
            .unwrap()
            .contains("not_found"));
    }

    #[test]
    fn a_client_stream_is_read_message_by_message() {
        use pb::{InputEvent, StreamInputRequest};
        let start = StreamInputRequest {
            event: Some(InputEvent::Start(pb::ProcessRef {
                process: Some(pb::ProcessSelector {
                    selector: Some(pb::Selector::Pid(7)),
                }),
            })),
        };
        let data = StreamInputRequest {
            event: Some(InputEvent::Data(pb::InputData {
                input: Some(pb::ProcessInput {
                    input: Some(pb::Input::Stdin(b"ab".to_vec())),
                }),
            })),
        };
        for codec in [Codec::Json, Codec::Proto] {
            let mut body = codec.envelope(&start).to_vec();
            body.extend_from_slice(&codec.envelope(&data));
            // Byte by byte, as a slow client might send it.
            let (mut buf, mut msgs) = (Vec::new(), Vec::<StreamInputRequest>::new());
            for b in &body {
                buf.push(*b);
                if let Some(n) = Codec::next_envelope(&buf).unwrap() {
                    msgs.push(codec.unenvelope(&buf[..n]).unwrap());
                    buf.drain(..n);
                }
            }
            assert!(buf.is_empty());
            assert_eq!(msgs, vec![start.clone(), data.clone()]);
        }
        let huge = [0u8, 0x7f, 0xff, 0xff, 0xff];
        assert_eq!(
            Codec::next_envelope(&huge).unwrap_err().code,
            Code::ResourceExhausted
        );
        // What the E2B Python SDK sends (its own encoder's bytes).
        let sdk = [0x12, 0x06, 0x12, 0x04, 0x0a, 0x02, b'a', b'b'];
        assert_eq!(
            Codec::Proto.decode::<StreamInputRequest>(&sdk).unwrap(),
            data
        );
        let json: StreamInputRequest = Codec::Json
            .decode(br#"{"data":{"input":{"stdin":"YWI="}}}"#)
            .unwrap();
        assert_eq!(json, data);
    }
}
