//! HTTP/3 on the worker: h3 over the worker's own connections ([`bridge`]), and the `proxy`
//! service that forwards each request to upstream HTTP servers ([`proxy`], [`upstream`],
//! configured by `[proxy]`: [`config`]). See `docs/HTTP3.md`.
pub mod bridge;
pub mod config;
pub mod proxy;
pub mod upstream;
