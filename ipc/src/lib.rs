//! forkd's wire protocol and client library.
//!
//! The protocol (documented in `PROTOCOL.md` beside this crate) is a stream of
//! length-prefixed `serde_json` frames over a Unix stream socket. [`protocol`]
//! holds the message types, [`frame`] the framing with its hard size limit, and
//! [`client`] blocking and tokio clients that never hang without a typed error.

#![warn(missing_docs)]

pub mod bytes;
pub mod client;
pub mod explain;
pub mod frame;
pub mod protocol;
pub mod session;
mod session_client;
pub mod terms;

pub use client::{AsyncClient, Client, ClientError};
pub use protocol::*;
pub use session::*;
pub use session_client::{Event, RequestStream};
