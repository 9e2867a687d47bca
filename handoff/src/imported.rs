//! The `crypto::Session` serving an imported connection: keys from the carried secrets through
//! our own key schedule, no TLS state machine.
use crate::capture::{KeyState, SessionSecrets};
use crate::keys::{AesHeaderKey, GcmPacketKey, server_keys, server_packet_keys};
use crate::schedule::{self, Suite};
use crate::secret::Secret;
use quinn_proto::crypto::{self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use std::any::Any;
use std::sync::Arc;

/// Serves an imported connection. `write_handshake` yields the current generation's keys once
/// (header protection from generation 0); each `next_1rtt_keys` steps one generation on.
pub struct ImportedSession {
    suite: Suite,
    /// Secrets of the generation `next_1rtt_keys` hands out next
    client_next: Secret,
    server_next: Secret,
    current_keys: Option<Keys>,
    /// The previous generation's packet keys, when a key update was under way at export
    previous_keys: Option<KeyPair<Box<dyn PacketKey>>>,
    exporter: Secret,
    alpn: Option<Vec<u8>>,
    server_name: Option<String>,
    peer_params: TransportParameters,
    keys: Arc<KeyState>,
}

impl std::fmt::Debug for ImportedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportedSession")
            .field("suite", &self.suite)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl ImportedSession {
    /// A session at `secrets.generation`, and the key state to export it again later.
    pub fn new(
        secrets: &SessionSecrets,
        peer_params: TransportParameters,
    ) -> (Self, Arc<KeyState>) {
        let suite = secrets.suite;
        let (client, server) = (&secrets.client_secret, &secrets.server_secret);
        let current = server_keys(
            suite,
            &secrets.client_secret_0,
            &secrets.server_secret_0,
            client,
            server,
        );
        let keys = KeyState::imported(secrets);
        let session = Self {
            suite,
            client_next: schedule::next_secret(suite, client),
            server_next: schedule::next_secret(suite, server),
            current_keys: Some(current),
            previous_keys: secrets
                .previous
                .as_ref()
                .map(|(client, server)| server_packet_keys(suite, client, server)),
            exporter: secrets.exporter_secret.clone(),
            alpn: secrets.alpn.clone(),
            server_name: secrets.server_name.clone(),
            peer_params,
            keys: keys.clone(),
        };
        (session, keys)
    }
}

impl crypto::Session for ImportedSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        // Only needed by quinn's constructor; the Initial space is discarded right away.
        let (client, server) = schedule::initial_secrets(dst_cid);
        let suite = Suite::Aes128GcmSha256;
        let (local, remote) = if side.is_server() {
            (&server, &client)
        } else {
            (&client, &server)
        };
        Keys {
            header: KeyPair {
                local: Box::new(AesHeaderKey::from_secret(suite, local)),
                remote: Box::new(AesHeaderKey::from_secret(suite, remote)),
            },
            packet: KeyPair {
                local: Box::new(GcmPacketKey::from_secret(suite, local)),
                remote: Box::new(GcmPacketKey::from_secret(suite, remote)),
            },
        }
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        Some(Box::new(quinn_proto::crypto::rustls::HandshakeData {
            protocol: self.alpn.clone(),
            server_name: self.server_name.clone(),
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        None
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        None
    }

    fn early_data_accepted(&self) -> Option<bool> {
        Some(false)
    }

    fn is_handshaking(&self) -> bool {
        false
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        // After the handshake a client sends no TLS messages in QUIC (no KeyUpdate, no tickets).
        if buf.is_empty() {
            Ok(false)
        } else {
            Err(TransportError {
                code: TransportErrorCode::crypto(10), // unexpected_message
                frame: None,
                reason: "unexpected post-handshake TLS message".into(),
            })
        }
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        Ok(Some(self.peer_params))
    }

    fn write_handshake(&mut self, _buf: &mut Vec<u8>) -> Option<Keys> {
        self.current_keys.take()
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        let keys = server_packet_keys(self.suite, &self.client_next, &self.server_next);
        self.client_next = schedule::next_secret(self.suite, &self.client_next);
        self.server_next = schedule::next_secret(self.suite, &self.server_next);
        self.keys.count_next_1rtt();
        Some(keys)
    }

    fn handoff_previous_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.previous_keys.take()
    }

    fn is_valid_retry(
        &self,
        _orig_dst_cid: &ConnectionId,
        _header: &[u8],
        _payload: &[u8],
    ) -> bool {
        false
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        schedule::export_keying_material(self.suite, &self.exporter, label, context, output);
        Ok(())
    }
}
