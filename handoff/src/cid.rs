//! CIDs in the QUIC-LB layout of `lb_common::cid`, carrying this worker's server ID.
use lb_common::cid::{CidLayout, LayoutError};
use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

/// Issues routable CIDs for one server ID. `validate` never accepts an unknown CID, so an endpoint
/// using it silently drops packets for connections it does not hold instead of answering them
/// with a stateless reset: during and after a handoff, another worker may own that connection.
#[derive(Clone, Debug)]
pub struct LbCidGenerator {
    layout: CidLayout,
    server_id: u64,
    config_rotation: u8,
    rng: SystemRandom,
}

impl LbCidGenerator {
    pub fn new(layout: CidLayout, server_id: u64) -> Result<Self, LayoutError> {
        if server_id > layout.max_server_id() {
            return Err(LayoutError::ServerIdTooLarge);
        }
        Ok(Self {
            layout,
            server_id,
            config_rotation: 0,
            rng: SystemRandom::new(),
        })
    }

    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    pub fn layout(&self) -> CidLayout {
        self.layout
    }
}

impl ConnectionIdGenerator for LbCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut nonce = [0u8; lb_common::cid::MAX_CID_LEN];
        self.rng
            .fill(&mut nonce[..self.layout.nonce_len()])
            .expect("system randomness");
        let mut out = [0u8; lb_common::cid::MAX_CID_LEN];
        self.layout
            .encode(self.config_rotation, self.server_id, &nonce, &mut out)
            .expect("layout and server id were validated");
        ConnectionId::new(&out[..self.layout.cid_len()])
    }

    fn validate(&self, _cid: &ConnectionId) -> Result<(), InvalidCid> {
        // Known CIDs are routed before validation; an unknown one is never ours to reset.
        Err(InvalidCid)
    }

    fn cid_len(&self) -> usize {
        self.layout.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_carry_the_server_id() {
        let layout = CidLayout::default();
        let mut g = LbCidGenerator::new(layout, 0x0102).unwrap();
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
        assert_eq!(layout.decode_server_id(&a), Some(0x0102));
        assert!(
            g.validate(&a).is_err(),
            "unknown CIDs are dropped, never reset"
        );
        assert!(LbCidGenerator::new(layout, 0x1_0000).is_err());
    }
}
