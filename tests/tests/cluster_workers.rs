//! Workers in a cluster (`[cluster]` in their config) against a real etcd: each registers under
//! a lease and claims its server ID; a second worker asking for a held ID refuses to start,
//! naming the holder; a worker that stops takes its registration with it, and the ID is free.
//! Real `baton-worker` processes on loopback (no namespaces needed).
mod support;

use baton_cluster::testing::Etcd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const PREFIX: &str = "/baton/cluster-test";

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, name: &str, server_id: u64, etcd: &Etcd) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "vips = [\"127.0.0.1\"]\nport = {port}\nserver_id = {server_id}\nname = \"{name}\"\n\
             cert = \"{cert}\"\nkey = \"{key}\"\nservice = \"demo\"\n\
             [cluster]\nendpoints = [\"{endpoint}\"]\nprefix = \"{PREFIX}\"\naddress = \"10.9.0.{server_id}\"\n",
            port = free_udp_port(),
            cert = dir.join("service.pem").display(),
            key = dir.join("service.key").display(),
            endpoint = etcd.endpoint(),
        ),
    )
    .unwrap();
    path
}

fn start(config: &Path, log: &Path) -> Child {
    Command::new(worker_bin())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The value at `key` in etcd, through etcdctl (as an operator would look).
fn etcd_get(etcd: &Etcd, key: &str) -> String {
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "get",
            "--print-value-only",
            key,
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_worker_claiming_a_held_server_id_is_refused_naming_the_holder() {
    let etcd = Etcd::start("workers");
    let dir = std::env::temp_dir().join(format!("baton-cluster-workers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    gen_certs(&dir, "w1,w2", &[]);
    let claim = format!("{PREFIX}/server-ids/1");

    let w1_log = dir.join("w1.log");
    let mut w1 = start(&write_config(&dir, "w1", 1, &etcd), &w1_log);
    wait_for(
        "w1 to register",
        || etcd_get(&etcd, &claim) == r#"{"worker":"w1"}"#,
        || std::fs::read_to_string(&w1_log).unwrap_or_default(),
    );
    let record = etcd_get(&etcd, &format!("{PREFIX}/workers/w1"));
    assert!(
        record.contains(r#""server_id":1"#) && record.contains("10.9.0.1"),
        "{record}"
    );

    // w2 asks for server ID 1 as well: it must not start.
    let w2_log = dir.join("w2.log");
    let w2_config = write_config(&dir, "w2", 1, &etcd);
    let mut w2 = start(&w2_config, &w2_log);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = w2.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "w2 kept running with a held server ID"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&w2_log).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(r#"server ID 1 is held by worker "w1""#),
        "{err}"
    );
    assert_eq!(
        etcd_get(&etcd, &claim),
        r#"{"worker":"w1"}"#,
        "the claim is untouched"
    );
    assert!(w1.try_wait().unwrap().is_none(), "w1 still serves");

    // w1 stops cleanly: its registration goes with it, and w2 can take the ID.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(w1.id() as i32, libc::SIGTERM) };
    assert!(w1.wait().unwrap().success());
    assert_eq!(etcd_get(&etcd, &claim), "", "w1's claim is gone with it");
    assert_eq!(etcd_get(&etcd, &format!("{PREFIX}/workers/w1")), "");
    let mut w2 = start(&w2_config, &w2_log);
    wait_for(
        "w2 to register once the ID is free",
        || etcd_get(&etcd, &claim) == r#"{"worker":"w2"}"#,
        || std::fs::read_to_string(&w2_log).unwrap_or_default(),
    );
    let _ = w2.kill();
    let _ = w2.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_whose_lease_expired_registers_again() {
    let etcd = Etcd::start("reregister");
    let dir = std::env::temp_dir().join(format!("baton-cluster-rereg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    gen_certs(&dir, "w1", &[]);
    let key = format!("{PREFIX}/workers/w1");
    let log = dir.join("w1.log");
    let mut w1 = start(&write_config(&dir, "w1", 1, &etcd), &log);
    let show = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("w1 to register", || !etcd_get(&etcd, &key).is_empty(), show);
    // What etcd does to a lease it could not hear renewed for its TTL: end it (and its keys).
    let lease = Command::new("etcdctl")
        .args(["--endpoints", &etcd.endpoint(), "lease", "list"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    let ids: Vec<String> = String::from_utf8_lossy(&lease.stdout)
        .lines()
        .skip(1)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(ids.len(), 1, "one lease, w1's: {ids:?}");
    let out = Command::new("etcdctl")
        .args(["--endpoints", &etcd.endpoint(), "lease", "revoke", &ids[0]])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        etcd_get(&etcd, &key),
        "",
        "the registration went with the lease"
    );
    wait_for(
        "w1 to register again",
        || etcd_get(&etcd, &key).contains(r#""server_id":1"#),
        show,
    );
    assert_eq!(
        etcd_get(&etcd, &format!("{PREFIX}/server-ids/1")),
        r#"{"worker":"w1"}"#
    );
    let _ = w1.kill();
    let _ = w1.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
