//! The demo service's wire constants (ALPN `baton-demo/1`, `docs/DEMO-PROTOCOL.md`): one
//! definition for the server (`baton_worker::demo`) and the client (`baton_load`).
//!
//! Every client-opened bidirectional stream starts with a kind byte: [`KIND_REQUEST`] (the body
//! follows until FIN; the answer is the request's 8-byte big-endian sequence number within the
//! connection, then the body) or [`KIND_STREAM`] (a long-lived echo).

/// ALPN of the demo service.
pub const ALPN: &[u8] = b"baton-demo/1";
/// First byte of a request stream.
pub const KIND_REQUEST: u8 = 0x01;
/// First byte of the long-lived echo stream.
pub const KIND_STREAM: u8 = 0x02;
/// Largest request body the demo service answers.
pub const MAX_REQUEST: usize = 1 << 20;
