//! The one-sender rule at the core, sans IO: a quinn-proto client and three `WorkerCore`s joined
//! by in-memory datagram queues. A connection exported from core A and imported *held* into core
//! B emits nothing, whatever it receives, until B commits it; an uncommitted import that core C
//! discards never emits a single datagram. (Two senders for one connection would reuse AEAD
//! nonces.)
mod common;

use baton_worker::core::WorkerCore;
use common::{SansIoClient as Client, VIP, exchange};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn core(server_id: u64, dir: &std::path::Path) -> WorkerCore {
    common::demo_core(
        server_id,
        vec![VIP.parse::<SocketAddr>().unwrap().ip()],
        dir,
    )
}

#[test]
fn a_held_import_sends_nothing_until_committed_and_a_discarded_one_never_does() {
    let dir = std::env::temp_dir().join(format!("baton-held-test-{}", std::process::id()));
    baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
    let mut now = Instant::now();
    let mut client = Client::connect(&dir.join("ca.pem"), now);
    let (mut a, mut b, mut c) = (core(1, &dir), core(2, &dir), core(3, &dir));

    // Handshake and a few requests with A.
    for n in 0..40u8 {
        if n % 4 == 0 && !client.conn.is_handshaking() {
            client.request(n);
        }
        now += Duration::from_millis(1);
        let answer = exchange(&mut client, &mut a, now);
        client.receive(now, answer);
    }
    assert!(!client.conn.is_handshaking(), "handshake with A");
    let id = a.connections()[0].id;

    // Export from A: what is in flight moves with it, so this is settled at the next drive.
    assert!(a.begin_export(id, now + Duration::from_secs(2)));
    let mut exported = None;
    for _ in 0..1000 {
        now += Duration::from_millis(1);
        let answer = exchange(&mut client, &mut a, now);
        client.receive(now, answer);
        if let Some((_, r)) = a.take_export_results().pop() {
            exported = Some(r.expect("export"));
            break;
        }
    }
    let exported = exported.expect("A exported the connection");

    // C imports held and is never committed: nothing comes out of it, then it discards.
    let c_id = c.import(&exported.state, now, true).unwrap();
    client.request(200);
    client.conn.ping();
    for _ in 0..20 {
        now += Duration::from_millis(5);
        let sent = exchange(&mut client, &mut c, now);
        assert!(
            sent.is_empty(),
            "a held import sent {} datagram(s)",
            sent.len()
        );
    }
    assert!(c.discard(c_id));
    assert!(c.connections().is_empty(), "discarded");
    now += Duration::from_millis(5);
    assert!(exchange(&mut client, &mut c, now).is_empty());
    let mut late = Vec::new();
    c.poll(now + Duration::from_secs(60), 1, &mut late);
    assert!(
        late.is_empty(),
        "a discarded import sends nothing, not even on its timers"
    );

    // B imports held: silent until the commit, then it answers (ACKs, the pending request).
    let b_id = b.import(&exported.state, now, true).unwrap();
    for _ in 0..5 {
        now += Duration::from_millis(5);
        let sent = exchange(&mut client, &mut b, now);
        assert!(
            sent.is_empty(),
            "a held import sent {} datagram(s)",
            sent.len()
        );
    }
    assert!(b.commit(b_id));
    let mut answered = 0;
    for n in 0..20u8 {
        client.request(100 + n);
        now += Duration::from_millis(5);
        let sent = exchange(&mut client, &mut b, now);
        answered += sent.len();
        client.receive(now, sent);
    }
    assert!(answered > 0, "the committed import sends");
    assert!(!client.conn.is_closed(), "the client's connection is alive");
    let _ = std::fs::remove_dir_all(&dir);
}
