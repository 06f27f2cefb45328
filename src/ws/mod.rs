//! The WebSocket layer (RFC 6455): upgrade handshake, frame codec, message decoder.
//!
//! Pure byte-level code with no sockets, so every rule can be tested with plain bytes and reused
//! by any I/O driver (epoll today, io_uring later).

pub mod decoder;
pub mod frame;
pub mod handshake;
