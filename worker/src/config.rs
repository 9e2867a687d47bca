//! `baton-worker` TOML configuration.
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;

/// Example:
/// ```toml
/// vip = "192.0.2.10"      # the service address, on the worker's loopback (direct server return)
/// port = 4433
/// server_id = 1           # carried in every CID this worker issues (QUIC-LB layout)
/// cid_len = 8
/// server_id_len = 2
/// cert = "/etc/baton/cert.pem"
/// key = "/etc/baton/key.pem"
/// service = "demo"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub vip: IpAddr,
    #[serde(default = "default_port")]
    pub port: u16,
    pub server_id: u64,
    #[serde(default = "default_cid_len")]
    pub cid_len: u8,
    #[serde(default = "default_server_id_len")]
    pub server_id_len: u8,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_service")]
    pub service: String,
}

fn default_port() -> u16 {
    4433
}
fn default_cid_len() -> u8 {
    8
}
fn default_server_id_len() -> u8 {
    2
}
fn default_service() -> String {
    "demo".into()
}

impl WorkerConfig {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = WorkerConfig::parse(
            "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.port, 4433);
        assert_eq!(c.server_id, 3);
        assert_eq!(c.service, "demo");
        assert!(WorkerConfig::parse("vip = \"x\"").is_err());
        assert!(
            WorkerConfig::parse(
                "vip = \"192.0.2.1\"\nserver_id = 1\ncert = \"a\"\nkey = \"b\"\nbogus = 1"
            )
            .is_err()
        );
    }
}
