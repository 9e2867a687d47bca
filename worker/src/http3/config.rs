//! The `[proxy]` section of `worker.toml` (service `proxy`): upstream pools, routes, timeouts,
//! size limits and forwarding headers. Checked whole at start-up; every error names the key.
use serde::Deserialize;
use std::time::Duration;

/// Example:
/// ```toml
/// service = "proxy"
///
/// [proxy]
/// via = "baton"                 # the pseudonym in `via: 3 baton`
/// forwarded = "x-forwarded"     # "x-forwarded" (x-forwarded-for/-proto/-host), "forwarded", "both", "none"
/// max_header_bytes = 16384      # HTTP/3 SETTINGS_MAX_FIELD_SECTION_SIZE: larger requests get 431
/// max_body_bytes = 67108864     # request bodies beyond this get 413
/// connect_timeout_ms = 2000     # TCP connect to an upstream server: 502 after this
/// response_timeout_ms = 30000   # until the upstream's response head: 504 after this
/// idle_timeout_ms = 90000       # an idle pooled upstream connection is closed after this
///
/// [[proxy.upstreams]]
/// name = "app"
/// servers = ["10.0.3.10:8080", "10.0.3.11:8080"]   # round robin
/// protocol = "http1"            # or "h2c" (HTTP/2 with prior knowledge)
///
/// [[proxy.routes]]
/// authority = "www.example.com" # optional: any authority
/// path_prefix = "/"             # the longest matching prefix wins
/// upstream = "app"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_via")]
    pub via: String,
    #[serde(default)]
    pub forwarded: Forwarded,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u64,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
}

/// Which forwarding headers the proxy adds (it always adds `via`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarded {
    /// `x-forwarded-for` (appended), `x-forwarded-proto`, `x-forwarded-host`.
    #[default]
    XForwarded,
    /// RFC 7239 `forwarded: for=...;proto=https;host=...` (appended).
    Forwarded,
    Both,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` of each server (an IP address or a name the worker's resolver knows).
    pub servers: Vec<String>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a keep-alive pool.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge.
    H2c,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Matches the request's `:authority` (port ignored, case-insensitive); unset: any.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    pub upstream: String,
}

fn default_via() -> String {
    "baton".into()
}
fn default_max_header_bytes() -> u64 {
    16 * 1024
}
fn default_max_body_bytes() -> u64 {
    64 << 20
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_response_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    90_000
}
fn default_path_prefix() -> String {
    "/".into()
}

impl ProxyConfig {
    /// Checks that routes name upstreams that exist, servers are `host:port`, values are sane.
    pub fn validate(&self) -> Result<(), String> {
        if self.upstreams.is_empty() {
            return Err(
                "proxy.upstreams is empty: add an [[proxy.upstreams]] with name and servers".into(),
            );
        }
        if self.routes.is_empty() {
            return Err(
                "proxy.routes is empty: add a [[proxy.routes]] with path_prefix and upstream"
                    .into(),
            );
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.name.is_empty() {
                return Err(format!("proxy.upstreams[{i}].name is empty"));
            }
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(format!(
                    "proxy.upstreams[{i}]: a second upstream named {:?}",
                    u.name
                ));
            }
            if u.servers.is_empty() {
                return Err(format!(
                    "proxy.upstreams[{i}] ({}) lists no servers",
                    u.name
                ));
            }
            for s in &u.servers {
                let ok = s.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    return Err(format!(
                        "proxy.upstreams[{i}] ({}): server {s:?} is not host:port",
                        u.name
                    ));
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !r.path_prefix.starts_with('/') {
                return Err(format!(
                    "proxy.routes[{i}].path_prefix {:?} does not start with /",
                    r.path_prefix
                ));
            }
            if !self.upstreams.iter().any(|u| u.name == r.upstream) {
                let known: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(format!(
                    "proxy.routes[{i}] names upstream {:?}, which is not defined (upstreams: {})",
                    r.upstream,
                    known.join(", ")
                ));
            }
        }
        for (key, v) in [
            ("max_header_bytes", self.max_header_bytes),
            ("max_body_bytes", self.max_body_bytes),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("proxy.{key} is 0: give it a positive value"));
            }
        }
        if self.via.is_empty() || !self.via.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "proxy.via {:?} must be a non-empty token without spaces",
                self.via
            ));
        }
        Ok(())
    }

    /// The route for a request, by authority and path: the longest matching prefix, routes
    /// with an authority before those without.
    pub fn route(&self, authority: Option<&str>, path: &str) -> Option<&RouteConfig> {
        let host = authority.map(|a| strip_port(a).to_ascii_lowercase());
        self.routes
            .iter()
            .filter(|r| match (&r.authority, &host) {
                (None, _) => true,
                (Some(want), Some(host)) => want.eq_ignore_ascii_case(host),
                (Some(_), None) => false,
            })
            .filter(|r| path.starts_with(&r.path_prefix))
            .max_by_key(|r| (r.authority.is_some(), r.path_prefix.len()))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// `host` of `host:port`, `[v6]:port`, `[v6]` or `host`.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ProxyConfig {
        toml::from_str(text).unwrap()
    }

    const BASE: &str = r#"
        [[upstreams]]
        name = "app"
        servers = ["10.0.0.1:8080"]
        [[upstreams]]
        name = "static"
        servers = ["files.internal:80"]
        protocol = "h2c"
        [[routes]]
        upstream = "app"
        [[routes]]
        path_prefix = "/static/"
        upstream = "static"
        [[routes]]
        authority = "Admin.Example"
        path_prefix = "/"
        upstream = "static"
    "#;

    #[test]
    fn routes_by_authority_then_longest_prefix() {
        let c = parse(BASE);
        c.validate().unwrap();
        assert_eq!(c.upstreams[1].protocol, UpstreamProtocol::H2c);
        assert_eq!(
            c.route(Some("www.example:443"), "/x").unwrap().upstream,
            "app"
        );
        assert_eq!(
            c.route(Some("www.example"), "/static/a.css")
                .unwrap()
                .upstream,
            "static"
        );
        assert_eq!(
            c.route(Some("admin.example:443"), "/x").unwrap().upstream,
            "static"
        );
        assert_eq!(c.route(None, "/x").unwrap().upstream, "app");
        assert_eq!(strip_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(strip_port("example"), "example");
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = parse(BASE);
        c.routes[0].upstream = "nope".into();
        assert!(
            c.validate()
                .unwrap_err()
                .contains("proxy.routes[0] names upstream \"nope\"")
        );
        let mut c = parse(BASE);
        c.upstreams[0].servers = vec!["10.0.0.1".into()];
        assert!(c.validate().unwrap_err().contains("not host:port"));
        let mut c = parse(BASE);
        c.response_timeout_ms = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .contains("proxy.response_timeout_ms")
        );
        assert!(toml::from_str::<ProxyConfig>("upstreams = []\nroutes = []\nbogus = 1").is_err());
    }
}
