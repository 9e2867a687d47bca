//! Shared code of the two stock HTTP/3 binaries: `h3-load` (load client) and `h3-stock-proxy`
//! (stock HTTP/3 reverse proxy). See README.md.

pub mod load;
pub mod pattern;
pub mod tls;
pub mod upstream;
