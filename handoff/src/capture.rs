//! Capturing a connection's 1-RTT secrets and key-update generation without rustls internals.
//!
//! Each accepted connection gets its own rustls `ServerConfig` whose `KeyLog` records
//! `CLIENT_TRAFFIC_SECRET_0`, `SERVER_TRAFFIC_SECRET_0` and `EXPORTER_SECRET` into a [`KeyState`],
//! and a wrapper around quinn's `crypto::ServerConfig`/`Session` counts `next_1rtt_keys` calls:
//! quinn asks for generation 1 when the handshake completes and for one more at each key update,
//! so the current generation is `calls - 1`.
use crate::schedule::Suite;
use crate::secret::Secret;
use quinn_proto::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError};
use std::any::Any;
use std::sync::{Arc, Mutex};

/// The secrets a connection's keys derive from, and its current key-update generation.
///
/// Besides the generation-0 secrets (header protection always uses them) it keeps the current
/// generation's secrets, stepping them along with every key update, so exporting costs the same
/// after a million key updates as after none.
#[derive(Default)]
pub struct KeyState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    client0: Option<Secret>,
    server0: Option<Secret>,
    exporter: Option<Secret>,
    /// Calls of `next_1rtt_keys` so far: the current generation is `calls - 1`.
    calls: u64,
    /// Secrets of generation `.2`, stepped towards `calls - 1`.
    current: Option<(Secret, Secret, u64)>,
    /// Secrets of the generation before `current` (a key update under way still uses them).
    previous: Option<(Secret, Secret)>,
}

impl Inner {
    /// Brings `current` to generation `calls - 1` (one step per key update, when it happens).
    fn catch_up(&mut self) {
        let Some(target) = self.calls.checked_sub(1) else {
            return;
        };
        if self.current.is_none() {
            if let (Some(c), Some(s)) = (&self.client0, &self.server0) {
                self.current = Some((c.clone(), s.clone(), 0));
            }
        }
        let Some(suite) = self
            .client0
            .as_ref()
            .and_then(|c| Suite::from_secret_len(c.len()))
        else {
            return;
        };
        if let Some((client, server, generation)) = &mut self.current {
            while *generation < target {
                let next_client = crate::schedule::next_secret(suite, client);
                let next_server = crate::schedule::next_secret(suite, server);
                self.previous = Some((
                    std::mem::replace(client, next_client),
                    std::mem::replace(server, next_server),
                ));
                *generation += 1;
            }
        }
    }
}

impl std::fmt::Debug for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.inner.lock().unwrap();
        f.debug_struct("KeyState")
            .field(
                "captured",
                &(c.client0.is_some() && c.server0.is_some() && c.exporter.is_some()),
            )
            .field("next_1rtt_calls", &c.calls)
            .finish()
    }
}

/// Why a connection's secrets cannot be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the handshake has not produced the 1-RTT secrets yet")]
    NotCaptured,
    #[error("the negotiated cipher suite is not one we implement")]
    UnsupportedSuite,
}

impl KeyState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// State for an imported connection at `secrets.generation`: as if quinn had asked for
    /// generations 1..=generation already (the import asks for the next one).
    pub(crate) fn imported(secrets: &SessionSecrets) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                client0: Some(secrets.client_secret_0.clone()),
                server0: Some(secrets.server_secret_0.clone()),
                exporter: Some(secrets.exporter_secret.clone()),
                calls: secrets.generation,
                current: Some((
                    secrets.client_secret.clone(),
                    secrets.server_secret.clone(),
                    secrets.generation,
                )),
                previous: secrets.previous.clone(),
            }),
        })
    }

    /// Current 1-RTT key-update generation (0 before the first update), once the handshake is done.
    pub fn generation(&self) -> Option<u64> {
        self.inner.lock().unwrap().calls.checked_sub(1)
    }

    pub(crate) fn count_next_1rtt(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.calls += 1;
        inner.catch_up();
    }

    fn record(&self, label: &str, secret: &[u8]) {
        let mut c = self.inner.lock().unwrap();
        let slot = match label {
            "CLIENT_TRAFFIC_SECRET_0" => &mut c.client0,
            "SERVER_TRAFFIC_SECRET_0" => &mut c.server0,
            "EXPORTER_SECRET" => &mut c.exporter,
            _ => return,
        };
        *slot = Some(Secret::new(secret));
    }

    /// Everything an importer needs to rebuild this connection's keys. `alpn`/`server_name` come
    /// from the connection's handshake data; `key_update` says whether a key update is under way,
    /// so the previous generation's secrets must travel too (otherwise they stay here).
    pub fn secrets(
        &self,
        alpn: Option<Vec<u8>>,
        server_name: Option<String>,
        key_update: bool,
    ) -> Result<SessionSecrets, KeyError> {
        let mut inner = self.inner.lock().unwrap();
        inner.catch_up();
        let generation = inner.calls.checked_sub(1).ok_or(KeyError::NotCaptured)?;
        let (Some(client0), Some(server0), Some(exporter), Some((client, server, at))) = (
            &inner.client0,
            &inner.server0,
            &inner.exporter,
            &inner.current,
        ) else {
            return Err(KeyError::NotCaptured);
        };
        let suite = Suite::from_secret_len(client0.len()).ok_or(KeyError::UnsupportedSuite)?;
        debug_assert_eq!(*at, generation);
        let previous = match (key_update, &inner.previous) {
            (false, _) => None,
            (true, Some(p)) => Some(p.clone()),
            (true, None) => return Err(KeyError::NotCaptured),
        };
        Ok(SessionSecrets {
            previous,
            suite,
            client_secret_0: client0.clone(),
            server_secret_0: server0.clone(),
            client_secret: client.clone(),
            server_secret: server.clone(),
            exporter_secret: exporter.clone(),
            generation,
            alpn,
            server_name,
        })
    }
}

/// A connection's TLS secrets at export. Zeroized on drop (every secret is a [`Secret`]); `Debug`
/// shows no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSecrets {
    pub suite: Suite,
    /// `CLIENT_TRAFFIC_SECRET_0`
    pub client_secret_0: Secret,
    /// `SERVER_TRAFFIC_SECRET_0`
    pub server_secret_0: Secret,
    /// The client's traffic secret of generation `generation` (packet protection)
    pub client_secret: Secret,
    /// The server's traffic secret of generation `generation` (packet protection)
    pub server_secret: Secret,
    /// `EXPORTER_SECRET`
    pub exporter_secret: Secret,
    /// Current key-update generation (packet keys derive from generation `generation`)
    pub generation: u64,
    /// The client's and server's secrets of generation `generation - 1`, while a key update is
    /// under way (late packets of the old phase still decrypt on the importer)
    pub previous: Option<(Secret, Secret)>,
    /// Negotiated ALPN protocol
    pub alpn: Option<Vec<u8>>,
    /// SNI the client sent
    pub server_name: Option<String>,
}

/// A `rustls::KeyLog` feeding one connection's [`KeyState`].
pub struct ConnectionKeyLog(pub Arc<KeyState>);

impl std::fmt::Debug for ConnectionKeyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionKeyLog")
    }
}

impl rustls::KeyLog for ConnectionKeyLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0.record(label, secret);
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(
            label,
            "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0" | "EXPORTER_SECRET"
        )
    }
}

/// quinn's rustls server config, wrapped to count key updates of the sessions it starts.
pub struct CountingServerConfig {
    inner: Arc<quinn_proto::crypto::rustls::QuicServerConfig>,
    keys: Arc<KeyState>,
}

impl crypto::ServerConfig for CountingServerConfig {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.inner.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.inner.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        Box::new(CountingSession {
            inner: self.inner.clone().start_session(version, params),
            keys: self.keys.clone(),
        })
    }
}

/// A session that forwards to rustls and counts `next_1rtt_keys` calls.
pub struct CountingSession {
    inner: Box<dyn crypto::Session>,
    keys: Arc<KeyState>,
}

impl crypto::Session for CountingSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }
    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        self.inner.handshake_data()
    }
    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }
    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        self.inner.early_crypto()
    }
    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }
    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }
    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        self.inner.read_handshake(buf)
    }
    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }
    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        self.inner.write_handshake(buf)
    }
    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        let keys = self.inner.next_1rtt_keys()?;
        self.keys.count_next_1rtt();
        Some(keys)
    }
    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }
    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

/// Builds TLS configs restricted to the 1-RTT suites we implement, one per accepted connection.
pub struct HandoffTls {
    base: Arc<rustls::ServerConfig>,
}

/// TLS 1.3 with only TLS_AES_128_GCM_SHA256 and TLS_AES_256_GCM_SHA384 (what [`crate::keys`] implements).
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    provider
}

impl HandoffTls {
    /// From a certificate chain and key; `alpn` lists the protocols served.
    pub fn new(
        certs: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        alpn: &[&[u8]],
    ) -> Result<Self, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.max_early_data_size = 0;
        Ok(Self {
            base: Arc::new(config),
        })
    }

    /// The endpoint-wide crypto config (used to answer Initials before a connection is accepted).
    pub fn endpoint_crypto(&self) -> Arc<dyn crypto::ServerConfig> {
        Arc::new(
            quinn_proto::crypto::rustls::QuicServerConfig::try_from(self.base.clone())
                .expect("TLS 1.3 with AES-128-GCM"),
        )
    }

    /// A crypto config for one connection whose secrets and key generation land in the returned state.
    pub fn connection_crypto(&self) -> (Arc<dyn crypto::ServerConfig>, Arc<KeyState>) {
        let keys = KeyState::new();
        let mut config = (*self.base).clone();
        config.key_log = Arc::new(ConnectionKeyLog(keys.clone()));
        let inner = Arc::new(
            quinn_proto::crypto::rustls::QuicServerConfig::try_from(Arc::new(config))
                .expect("TLS 1.3 with AES-128-GCM"),
        );
        (
            Arc::new(CountingServerConfig {
                inner,
                keys: keys.clone(),
            }),
            keys,
        )
    }
}

/// ALPN and SNI of a connection, from its session's handshake data.
pub fn handshake_info(session: &dyn crypto::Session) -> (Option<Vec<u8>>, Option<String>) {
    match session.handshake_data().and_then(|d| {
        d.downcast::<quinn_proto::crypto::rustls::HandshakeData>()
            .ok()
    }) {
        Some(d) => (d.protocol, d.server_name),
        None => (None, None),
    }
}
