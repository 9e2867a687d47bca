//! End-to-end tests: real namespaces, real veths, the real `baton-lb` attaching real XDP, real
//! UDP datagrams shaped like QUIC. Need root. Run one at a time (`--test-threads=1`): each test
//! has its own namespaces and pin directory, but XDP setup on 2 cores is slow enough as it is.
mod support;

use std::time::{Duration, Instant};
use support::*;

fn seq_of(pkt: &[u8]) -> Option<u32> {
    let i = pkt.windows(4).position(|w| w == b"BTST")?;
    Some(u32::from_be_bytes(pkt.get(i + 4..i + 8)?.try_into().ok()?))
}

/// Sends `packets` to the VIP from the client namespace and returns what each worker received,
/// once every one of them has arrived somewhere (or [`PATIENCE`] ran out: the caller's checks
/// then say what is missing). The receivers then wait a little longer, for duplicates.
fn send_and_collect(lab: &Lab, packets: &[(bool, Vec<u8>)]) -> [Vec<Vec<u8>>; 2] {
    send(lab, packets, packets.len())
}

/// Sends `packets` that must reach no worker; what arrived within the receivers' grace period
/// (a slow machine can only make this see less, never fail it by chance).
fn send_expecting_nothing(lab: &Lab, packets: &[(bool, Vec<u8>)]) -> [Vec<Vec<u8>>; 2] {
    send(lab, packets, 0)
}

fn send(lab: &Lab, packets: &[(bool, Vec<u8>)], expected: usize) -> [Vec<Vec<u8>>; 2] {
    let rx = lab.receivers();
    let (s4, s6) = (lab.client_socket(false), lab.client_socket(true));
    for (v6, p) in packets {
        let s = if *v6 { &s6 } else { &s4 };
        s.send_to(p, vip(*v6)).unwrap();
    }
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        let [a, b] = rx.snapshot();
        if a.len() + b.len() >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rx.finish()
}

fn worker_of(got: &[Vec<Vec<u8>>; 2], pkt: &[u8]) -> Vec<usize> {
    (0..2)
        .filter(|&w| got[w].iter().any(|p| p == pkt))
        .collect()
}

fn routes_by_server_id(mode: &'static str) {
    let mut lab = Lab::new(LabOptions {
        xdp_mode: mode,
        ..Default::default()
    });
    lab.start_lb();

    // Short headers: the server ID in the CID names the worker, for IPv4 and IPv6.
    let mut packets = Vec::new();
    for (sid, nonce) in [(1u16, 7u32), (2, 8), (1, 9), (2, 10)] {
        for v6 in [false, true] {
            packets.push((v6, short_packet(&server_cid(sid, nonce), nonce)));
        }
    }
    // Initials with client-chosen 16-byte DCIDs (config rotation 0b111: unroutable) are hashed.
    let dcids: Vec<Vec<u8>> = (0..40u32)
        .map(|i| {
            [
                &[0xe0 | (i as u8 & 0x1f)][..],
                &(i * 7919).to_be_bytes(),
                &[0x42; 11],
            ]
            .concat()
        })
        .collect();
    for (i, d) in dcids.iter().enumerate() {
        packets.push((i % 2 == 1, initial_packet(d, 100 + i as u32)));
    }
    // The same Initial DCID twice must land on the same worker.
    packets.push((false, initial_packet(&dcids[0], 999)));

    let got = send_and_collect(&lab, &packets);
    for (_, p) in &packets {
        if p[0] & 0x80 == 0 {
            let cid = dcid_of(p);
            let want = cid[2] as usize - 1;
            assert_eq!(
                worker_of(&got, p),
                vec![want],
                "short header {} should reach w{}",
                hex(&cid),
                want + 1
            );
        }
    }
    let mut per_worker = [0; 2];
    for (i, d) in dcids.iter().enumerate() {
        let p = initial_packet(d, 100 + i as u32);
        let at = worker_of(&got, &p);
        assert_eq!(
            at.len(),
            1,
            "Initial {} arrived {} times (w1 got {}, w2 got {}); status: {}",
            hex(d),
            at.len(),
            got[0].len(),
            got[1].len(),
            lab.baton(&["status"])
        );
        per_worker[at[0]] += 1;
        // `baton route` must explain the same decision the data plane made.
        let r = lab.baton_json(&["route", &hex(d)]);
        assert_eq!(r["reason"], "hash", "{r}");
        assert_eq!(
            r["worker"],
            format!("w{}", at[0] + 1),
            "baton route disagrees with the data plane for {}",
            hex(d)
        );
    }
    assert!(
        per_worker[0] > 0 && per_worker[1] > 0,
        "Maglev should spread 40 DCIDs over both workers: {per_worker:?}"
    );
    let again = worker_of(&got, &initial_packet(&dcids[0], 999));
    assert_eq!(
        again,
        worker_of(&got, &initial_packet(&dcids[0], 100)),
        "same DCID, different worker"
    );

    let st = lab.baton_json(&["status"]);
    assert_eq!(st["attached"], true);
    assert_eq!(st["interface"], "t-lb-cl");
    // The controller rebuilt the data plane's fast-path mirrors, so routing above went through them.
    assert_eq!(
        st["fastpath"],
        serde_json::json!({"vip_table": true, "server_id_table": true, "override_counts": true})
    );
    assert_eq!(st["counters"]["routed_server_id"], 8, "{st}");
    assert_eq!(st["counters"]["routed_hash"], 41, "{st}");
    assert_eq!(st["counters"]["ipv6"], 24, "{st}");
    let expected_mode = if mode == "native" {
        "native"
    } else {
        "skb (generic)"
    };
    assert_eq!(st["mode"], expected_mode);
}

#[test]
fn short_header_cids_reach_their_worker_native() {
    routes_by_server_id("native");
}

#[test]
fn short_header_cids_reach_their_worker_skb() {
    routes_by_server_id("skb");
}

#[test]
fn override_moves_a_cid_and_del_moves_it_back() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let cid = server_cid(2, 0x1234);
    let send = |lab: &Lab, seq| {
        let p = short_packet(&cid, seq);
        let got = send_and_collect(lab, &[(false, p.clone())]);
        worker_of(&got, &p)
    };
    assert_eq!(send(&lab, 1), vec![1], "server ID 2 goes to w2");

    lab.baton(&["override", "set", &hex(&cid), "w1"]);
    let r = lab.baton_json(&["route", &hex(&cid)]);
    assert_eq!(
        (r["reason"].as_str(), r["worker"].as_str()),
        (Some("override"), Some("w1")),
        "{r}"
    );
    assert_eq!(send(&lab, 2), vec![0], "the override sends it to w1");
    assert!(
        lab.log_text().contains("override set"),
        "with a daemon running, it writes the override"
    );
    let list = lab.baton_json(&["override", "list"]);
    assert_eq!(list[0]["cid"], hex(&cid));
    assert_eq!(list[0]["worker"], "w1");

    lab.baton(&["override", "del", &hex(&cid)]);
    assert_eq!(
        send(&lab, 3),
        vec![1],
        "without the override it is back on w2"
    );
    assert_eq!(lab.baton_json(&["override", "list"]), serde_json::json!([]));

    // Operator mistakes get a clear error.
    let out = lab.baton_raw(&["override", "set", "0102", "w1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("8 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab.baton_raw(&["override", "set", &hex(&cid), "w9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no worker \"w9\""));
}

/// The UDP counters of namespace `ns` (`/proc/net/snmp`): names to values.
fn udp_stats(ns: &str) -> std::collections::BTreeMap<String, u64> {
    let out = sh(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
    names
        .zip(values)
        .skip(1)
        .map(|(n, v)| (n.to_string(), v.parse().unwrap_or(0)))
        .collect()
}

#[test]
fn controller_restart_loses_no_datagram() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let udp_before = [udp_stats(&lab.workers[0]), udp_stats(&lab.workers[1])];
    let rx = lab.receivers();
    let sock = lab.client_socket(false);
    let cids = [server_cid(1, 1), server_cid(2, 2)];
    let stop = Arc::new(AtomicBool::new(false));
    // How many datagrams the sender has sent so far: each phase below waits for its share of the
    // stream instead of sleeping, so a slow sender still covers every phase.
    let progress = Arc::new(AtomicU32::new(0));
    let sender = {
        let (stop, progress) = (stop.clone(), progress.clone());
        let cids = cids.clone();
        std::thread::spawn(move || {
            let mut seq = 0u32;
            while !stop.load(Ordering::Relaxed) {
                sock.send_to(&short_packet(&cids[seq as usize % 2], seq), vip(false))
                    .unwrap();
                seq += 1;
                progress.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
            seq
        })
    };
    // Lets the stream run on for `n` more datagrams.
    let stream_on = |phase: &str, n: u32| {
        let from = progress.load(Ordering::Relaxed);
        wait_for(
            &format!("{n} datagrams sent {phase}"),
            || progress.load(Ordering::Relaxed) >= from + n,
            || format!("{} sent", progress.load(Ordering::Relaxed)),
        );
    };
    let mut phases = Vec::new();
    stream_on("before the first stop", 300);
    let before = lab.baton_json(&["status"]);
    // Graceful stop and start, then a crash and start, all while the stream runs; each phase
    // carries part of the stream (the daemon down, and each new one up).
    lab.stop_lb(libc::SIGTERM);
    stream_on("with the daemon stopped", 200);
    phases.push(("after_sigterm", progress.load(Ordering::Relaxed)));
    lab.start_lb();
    let st = lab.status_via_socket().unwrap();
    assert_eq!(
        st["readopted"], true,
        "the restarted controller should re-adopt the pinned link"
    );
    stream_on("after the restart", 200);
    phases.push(("after_restart", progress.load(Ordering::Relaxed)));
    lab.stop_lb(libc::SIGKILL);
    stream_on("with the daemon killed", 200);
    phases.push(("after_sigkill", progress.load(Ordering::Relaxed)));
    lab.start_lb();
    stream_on("after the second restart", 300);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    phases.push(("end", sent));
    // Every datagram lands before the receivers stop (a lost one shows below, after PATIENCE).
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        let [a, b] = rx.snapshot();
        if a.len() + b.len() >= sent as usize {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = rx.finish();
    let udp_after = [udp_stats(&lab.workers[0]), udp_stats(&lab.workers[1])];

    let after = lab.baton_json(&["status"]);
    assert_eq!(
        after["link_id"], before["link_id"],
        "the same link must stay attached throughout"
    );
    assert_ne!(
        after["prog_id"], before["prog_id"],
        "each start swaps a freshly loaded program into the link"
    );
    let mut seen = vec![0u8; sent as usize];
    for (w, pkts) in got.iter().enumerate() {
        for p in pkts {
            let seq = seq_of(p).unwrap();
            assert_eq!(seq as usize % 2, w, "seq {seq} reached the wrong worker");
            seen[seq as usize] += 1;
        }
    }
    let lost: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, n)| **n == 0)
        .map(|(i, _)| i)
        .collect();
    let dup = seen.iter().filter(|n| **n > 1).count();
    // Drops by the receiving sockets (a starved receiver thread) are the test's own, not the
    // data plane's: name them apart.
    let rcvbuf_errors: Vec<u64> = (0..2)
        .map(|w| udp_after[w]["RcvbufErrors"] - udp_before[w]["RcvbufErrors"])
        .collect();
    assert!(
        lost.is_empty() && dup == 0,
        "sent {sent}: lost {} (first {:?}), duplicated {dup}; phases (datagrams sent by then): \
         {phases:?}; receive-buffer drops at the workers' sockets (the test's receivers were too \
         slow, not the data plane): {rcvbuf_errors:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "RESULT restart_stream datagrams={sent} lost=0 phases={phases:?} receiver_rcvbuf_errors={rcvbuf_errors:?}"
    );
}

#[test]
fn bpftool_and_metrics_show_the_state() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let path = lab.pin_dir.join("BATON_WORKERS");
    let out = sh(&["bpftool", "map", "dump", "pinned", path.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bpftool prints BTF-typed JSON");
    let entries = v.as_array().unwrap();
    let sids: Vec<u64> = entries
        .iter()
        .filter(|e| e["value"]["flags"].as_u64().unwrap_or(0) & 1 != 0)
        .map(|e| {
            e["value"]["server_id"]
                .as_u64()
                .expect("named field server_id")
        })
        .collect();
    assert_eq!(sids, vec![1, 2], "{v}");
    assert!(entries[0]["value"]["mac"].is_array());

    let path = lab.pin_dir.join("BATON_CONFIG");
    let out = sh(&["bpftool", "map", "dump", "pinned", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["value"]["cid_len"], CID_LEN as u64, "{v}");
    assert_eq!(v[0]["value"]["ready"], 1);
    let link = lab.pin_dir.join("baton_xdp_link");
    let out = sh(&["bpftool", "link", "show", "pinned", link.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("xdp"));

    // The same state through Prometheus, after one routed packet.
    let p = short_packet(&server_cid(1, 3), 3);
    send_and_collect(&lab, &[(false, p)]);
    let m = lab.metrics();
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    assert!(
        m.contains("baton_packets_total{verdict=\"routed_server_id\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("baton_worker_healthy{worker=\"w2\",server_id=\"2\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("baton_xdp_attached{interface=\"t-lb-cl\",mode=\"native\""),
        "{m}"
    );

    // Without the daemon the CLI still reads the pinned state, and does not mistake the LB
    // namespace's ifindex for an interface of this (host) namespace.
    lab.stop_lb(libc::SIGTERM);
    let st = lab.baton_json(&["status"]);
    assert_eq!(st["attached"], true);
    assert!(st["daemon"].is_null());
    assert!(
        st["interface"]
            .as_str()
            .unwrap()
            .contains("another network namespace"),
        "{st}"
    );
    assert_eq!(st["counters"]["routed_server_id"], 1);
    let w = lab.baton_json(&["workers"]);
    assert_eq!(w.as_array().unwrap().len(), 2);
    assert!(
        w[0]["name"].is_null() && w[0]["tx"].as_str().unwrap().contains("ifindex"),
        "{w}"
    );
    // Overrides work without the daemon too (worker by server ID), and the data plane obeys.
    let cid = server_cid(1, 44);
    lab.baton(&["override", "set", &hex(&cid), "2"]);
    let p = short_packet(&cid, 44);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![1]
    );
    lab.baton(&["override", "del", &hex(&cid)]);
    let p = short_packet(&cid, 45);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![0]
    );
}

#[test]
fn unhealthy_worker_leaves_the_maglev_table() {
    // UDP health checks to each worker's own address; only w1 answers at first.
    let mut lab = Lab::new(LabOptions {
        // Generous timeout: an echo thread that answers late on a loaded machine must not make w1
        // fail its checks (w2 has no echo at all and fails them whatever the timeout).
        health:
            "kind = \"udp\"\nport = 7001\ninterval_ms = 1000\ntimeout_ms = 1000\nrise = 1\nfall = 3"
                .into(),
        ..Default::default()
    });
    let echo = |ns: &str, addr: &'static str| {
        let s = in_netns(ns, move || std::net::UdpSocket::bind((addr, 7001)).unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        });
    };
    echo(&lab.workers[0], "10.201.11.2");
    lab.start_lb();
    let workers = lab.baton_json(&["workers"]);
    let health: Vec<bool> = workers
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["healthy"].as_bool().unwrap())
        .collect();
    assert_eq!(health, vec![true, false], "{workers}");
    assert_eq!(workers[1]["maglev_slots"], 0);

    let dcids: Vec<Vec<u8>> = (0..20u32)
        .map(|i| [&[0xe0u8][..], &i.to_be_bytes(), &[7; 11]].concat())
        .collect();
    let pkts: Vec<(bool, Vec<u8>)> = dcids
        .iter()
        .enumerate()
        .map(|(i, d)| (false, initial_packet(d, i as u32)))
        .collect();
    let got = send_and_collect(&lab, &pkts);
    assert_eq!(
        (got[0].len(), got[1].len()),
        (20, 0),
        "all new connections go to the healthy worker"
    );
    // Existing connections of the unhealthy worker still route by server ID.
    let p = short_packet(&server_cid(2, 5), 5);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![1]
    );

    // w2 recovers: it re-enters the table.
    echo(&lab.workers[1], "10.201.12.2");
    wait_for(
        "w2 to become healthy",
        || lab.baton_json(&["workers"])[1]["healthy"] == true,
        || format!("{}\n{}", lab.baton_json(&["workers"]), lab.log_text()),
    );
    let got = send_and_collect(&lab, &pkts);
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "after recovery both get new connections: {} / {}",
        got[0].len(),
        got[1].len()
    );
}

#[test]
fn restart_with_a_worker_removed_and_readded() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let (cid1, cid2) = (server_cid(1, 77), server_cid(2, 78));
    lab.baton(&["override", "set", &hex(&cid1), "w2"]);
    let original = std::fs::read_to_string(&lab.config).unwrap();

    // Take w2 out of the config and restart: its traffic and its override must go.
    lab.stop_lb(libc::SIGTERM);
    lab.edit_config(|c| {
        let start = c.find("[[workers]]\nname = \"w2\"").unwrap();
        let end = c.find("[health]").unwrap();
        format!("{}{}", &c[..start], &c[end..])
    });
    lab.start_lb();
    let workers = lab.baton_json(&["workers"]);
    assert_eq!(workers.as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(
        lab.baton_json(&["override", "list"]),
        serde_json::json!([]),
        "the override to w2 must be gone"
    );
    let r = lab.baton_json(&["route", &hex(&cid2)]);
    assert_eq!(
        (r["reason"].as_str(), r["worker"].as_str()),
        (Some("hash"), Some("w1")),
        "{r}"
    );
    let pkts: Vec<(bool, Vec<u8>)> = vec![
        (false, short_packet(&cid1, 1)),
        (false, short_packet(&cid2, 2)),
        (true, initial_packet(&[0xe5; 12], 3)),
        (false, initial_packet(&[0xe6; 12], 4)),
    ];
    let got = send_and_collect(&lab, &pkts);
    assert_eq!(
        (got[0].len(), got[1].len()),
        (4, 0),
        "everything goes to w1 now"
    );

    // Put it back: server ID 2 routes to w2 again.
    lab.stop_lb(libc::SIGTERM);
    std::fs::write(&lab.config, original).unwrap();
    lab.start_lb();
    let p = short_packet(&cid2, 5);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![1]
    );
    let workers = lab.baton_json(&["workers"]);
    assert_eq!(workers.as_array().unwrap().len(), 2, "{workers}");
}

#[test]
fn a_second_instance_on_the_same_pin_dir_is_refused_before_it_writes() {
    let mut a = Lab::new(LabOptions::default());
    a.start_lb();
    let dump = |lab: &Lab| {
        sh(&[
            "bpftool",
            "map",
            "dump",
            "pinned",
            lab.pin_dir.join("BATON_TX_PORTS").to_str().unwrap(),
        ])
        .stdout
    };
    let tx_before = dump(&a);
    // Same interface names and ifindexes, other namespaces, same pin directory.
    let b = Lab::new(LabOptions::default());
    let out = b.run_lb_with_pin_dir(&a.pin_dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("another baton-lb is running") && err.contains("lock"),
        "{err}"
    );
    assert!(
        !b.socket.exists(),
        "a start that failed must not leave its control socket behind"
    );

    // With A's daemon gone (its data plane keeps running), B still must not take A's link or maps.
    a.stop_lb(libc::SIGTERM);
    let out = b.run_lb_with_pin_dir(&a.pin_dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("its own --pin-dir"), "{err}");
    assert_eq!(
        tx_before,
        dump(&a),
        "the refused instance must not have touched the maps"
    );
    let p = short_packet(&server_cid(2, 1), 1);
    assert_eq!(
        worker_of(&send_and_collect(&a, &[(false, p.clone())]), &p),
        vec![1],
        "A's data plane still routes"
    );
}

#[test]
fn xdp_program_log_lines_reach_the_daemon_log() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    // Break w2's entry on purpose (tx port 7: an empty devmap slot) so the program logs a warning.
    let workers = lab.baton_json(&["workers"]);
    let mac: Vec<String> = workers[1]["mac"]
        .as_str()
        .unwrap()
        .split(':')
        .map(str::to_string)
        .collect();
    let mut args: Vec<String> = ["bpftool", "map", "update", "pinned"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(
        lab.pin_dir
            .join("BATON_WORKERS")
            .to_str()
            .unwrap()
            .to_string(),
    );
    args.extend(
        ["key", "1", "0", "0", "0", "value"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(mac.iter().map(|b| format!("0x{b}")));
    // flags 3 (in use, healthy), tx_port 7, pad 0, server_id 2 (little endian)
    args.extend(
        [
            "3", "0", "7", "0", "0", "0", "0", "0", "0", "0", "2", "0", "0", "0", "0", "0", "0",
            "0",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sh(&refs);
    let p = short_packet(&server_cid(2, 9), 9);
    let got = send_expecting_nothing(&lab, &[(false, p)]);
    assert!(got[1].is_empty());
    let redirect_errors = || lab.baton_json(&["status"])["counters"]["redirect_error"].clone();
    wait_for(
        "the data plane to count the redirect error",
        || redirect_errors() != 0,
        || lab.baton(&["status"]),
    );
    assert_eq!(redirect_errors(), 1);
    wait_for(
        "the aya-log line in the daemon log",
        || lab.log_text().contains("names tx port 7"),
        || lab.log_text(),
    );
}

#[test]
fn sighup_reloads_workers_without_a_restart() {
    let mut lab = Lab::new(LabOptions::default());
    let original = std::fs::read_to_string(&lab.config).unwrap();
    lab.edit_config(|c| {
        let start = c.find("[[workers]]\nname = \"w2\"").unwrap();
        let end = c.find("[health]").unwrap();
        format!("{}{}", &c[..start], &c[end..])
    });
    lab.start_lb();
    let pid = lab.status_via_socket().unwrap()["pid"].clone();
    let cid2 = server_cid(2, 31);
    let p = short_packet(&cid2, 1);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![0],
        "no w2 yet: hashed to w1"
    );

    std::fs::write(&lab.config, original).unwrap();
    lab.signal_lb(libc::SIGHUP);
    // The daemon logs this once the reload has written every map (`baton workers` can list w2
    // while the reload is still writing the server IDs).
    wait_for(
        "the reload to finish",
        || lab.log_text().contains("SIGHUP: config reloaded"),
        || lab.log_text(),
    );
    let workers = lab.baton_json(&["workers"]);
    assert_eq!(
        workers.as_array().unwrap().len(),
        2,
        "reload did not add w2: {workers}"
    );
    let p = short_packet(&cid2, 2);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![1],
        "server ID 2 now reaches w2"
    );
    assert_eq!(
        lab.status_via_socket().unwrap()["pid"],
        pid,
        "same daemon: a reload, not a restart"
    );

    // A broken config is refused and the running state stays.
    lab.edit_config(|c| c.replace("server_id = 2", "server_id = 1"));
    lab.signal_lb(libc::SIGHUP);
    wait_for(
        "the reload error in the log",
        || lab.log_text().contains("reload failed"),
        || lab.log_text(),
    );
    assert!(
        lab.log_text().contains("workers[1].server_id"),
        "{}",
        lab.log_text()
    );
    let p = short_packet(&cid2, 3);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![1]
    );
}

#[test]
fn detach_stops_the_daemon_and_removes_every_pin() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let out = lab.detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lab.pin_dir.exists(), "the pin directory must be gone");
    let link = sh(&["ip", "-n", &lab.lb, "-d", "link", "show", "dev", "t-lb-cl"]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "XDP must be off the interface"
    );
    // Traffic to the VIP is no longer steered: the workers get nothing.
    let p = short_packet(&server_cid(1, 1), 1);
    assert!(worker_of(&send_expecting_nothing(&lab, &[(false, p.clone())]), &p).is_empty());
    // And the CLI says so.
    let out = lab.baton_raw(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is attached"));
}

#[test]
fn incompatible_pins_are_refused_and_derived_ones_recreated() {
    let mut lab = Lab::new(LabOptions::default());
    std::fs::create_dir_all(&lab.pin_dir).unwrap();
    let pin = |name: &str| lab.pin_dir.join(name).to_str().unwrap().to_string();
    // An authoritative map from an "older Baton" with another value size: refused, nothing touched.
    let workers = pin("BATON_WORKERS");
    sh(&[
        "bpftool",
        "map",
        "create",
        &workers,
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "256",
        "name",
        "BATON_WORKERS",
    ]);
    let out = lab.run_lb_with_pin_dir(&lab.pin_dir.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("BATON_WORKERS") && err.contains("incompatible Baton"),
        "{err}"
    );
    std::fs::remove_file(&workers).unwrap();
    // A derived fast-path map with another layout is simply recreated, and routing works.
    let vip_table = pin("BATON_VIP_TABLE");
    sh(&[
        "bpftool",
        "map",
        "create",
        &vip_table,
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "1",
        "name",
        "BATON_VIP_TABLE",
    ]);
    lab.start_lb();
    assert!(
        lab.log_text().contains("recreating it"),
        "{}",
        lab.log_text()
    );
    let p = short_packet(&server_cid(2, 3), 3);
    assert_eq!(
        worker_of(&send_and_collect(&lab, &[(false, p.clone())]), &p),
        vec![1]
    );
    assert_eq!(lab.baton_json(&["status"])["fastpath"]["vip_table"], true);
}

#[test]
fn bad_config_names_the_field() {
    let dir = std::env::temp_dir().join(format!("baton-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        "interface = \"eth0\"\n[[vips]]\naddress = \"10.0.0.1\"\nports = [443]\n[[workers]]\nname = \"a\"\nserver_id = 70000\naddress = \"10.0.0.2\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin_dir().join("baton-lb"))
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("workers[0].server_id") && err.contains("65535"),
        "{err}"
    );
}
