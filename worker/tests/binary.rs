//! The `baton-worker` binary: TOML config, PEM files, the demo protocol over real UDP.
mod common;

use baton_worker::demo::KIND_REQUEST;
use std::time::Duration;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_serves_the_demo_protocol_from_its_config() {
    let dir = std::env::temp_dir().join(format!("baton-worker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("worker.toml"),
        format!(
            "vip = \"127.0.0.1\"\nport = {port}\nserver_id = 5\ncert = \"{}\"\nkey = \"{}\"\nservice = \"demo\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
    )
    .unwrap();
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .spawn()
            .unwrap(),
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let endpoint = common::demo_client_endpoint(roots);
    let server = format!("127.0.0.1:{port}").parse().unwrap();
    let mut conn = None;
    for _ in 0..50 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            endpoint.connect(server, "localhost").unwrap(),
        )
        .await
        {
            Ok(Ok(c)) => {
                conn = Some(c);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let conn = conn.expect("worker answers");
    for n in 1..=3u64 {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(&[KIND_REQUEST]).await.unwrap();
        s.write_all(b"hello baton").await.unwrap();
        s.finish().unwrap();
        let answer = r.read_to_end(1024).await.unwrap();
        assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), n);
        assert_eq!(&answer[8..], b"hello baton");
    }
    conn.close(0u32.into(), b"bye");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (up to 10 s) for the child to exit.
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the worker did not exit within 10 s");
}

fn answers_info(path: &std::path::Path) -> bool {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(b"{\"cmd\":\"info\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).is_ok() && line.contains("\"ok\":true")
}

/// systemd stops services with SIGTERM: the worker must stop as cleanly as on SIGINT and take its
/// control socket with it. On start, a stale socket (owner gone) is replaced, and a socket a live
/// worker answers on makes a second worker refuse to start without touching it.
#[test]
fn sigterm_stops_cleanly_and_the_control_socket_is_claimed_safely() {
    let dir = std::env::temp_dir().join(format!("baton-worker-sigterm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
    let free_udp = || {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, peer_port) = (free_udp(), free_udp());
    let control = dir.join("w1.sock");
    let d = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("worker.toml"),
        format!(
            "vip = \"127.0.0.1\"\nport = {port}\nserver_id = 1\ncert = \"{}\"\nkey = \"{}\"\n\
             name = \"w1\"\ncontrol_socket = \"{}\"\nsecrets = \"{}\"\n\
             [peer]\nlisten = \"127.0.0.1:{peer_port}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            d("service.pem"),
            d("service.key"),
            control.display(),
            d("secrets.toml"),
            d("ca.pem"),
            d("w1.pem"),
            d("w1.key"),
        ),
    )
    .unwrap();
    // A stale socket file: bound once, its owner gone (connecting is refused).
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    assert!(control.exists() && !answers_info(&control));

    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = Child(start());
    let mut up = false;
    for _ in 0..100 {
        if answers_info(&control) {
            up = true;
            break;
        }
        assert!(first.0.try_wait().unwrap().is_none(), "the worker exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        up,
        "the worker did not replace the stale socket and answer on it"
    );

    // A second worker with the same control socket refuses, and leaves the first one's alone.
    let mut second = start();
    let status = wait_exit(&mut second);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "a second worker started on a live control socket"
    );
    assert!(err.contains("another worker answers"), "{err}");
    assert!(
        answers_info(&control),
        "the second worker broke the first one's socket"
    );

    // SIGTERM: a clean exit (status 0, not killed by the signal) and no socket file left behind.
    let pid = first.0.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut first.0);
    assert!(
        status.success(),
        "SIGTERM did not stop the worker cleanly: {status:?}"
    );
    assert!(!control.exists(), "the control socket was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
