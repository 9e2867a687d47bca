//! The `baton-worker` binary: TOML config, PEM files, the demo protocol over real UDP.
mod common;

use std::time::{Duration, Instant};

/// How long to wait for anything the worker does (start, answer, exit): far beyond what it takes
/// even on a loaded machine, so only a worker that never gets there fails the test.
const WAIT: Duration = Duration::from_secs(30);

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
    // Private keys must be 0600 (migration::secret_file).
    migration::secret_file::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    // The client's socket first, so the port picked for the worker cannot be given to it.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let endpoint = common::demo_client_endpoint(roots);
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
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .spawn()
            .unwrap(),
    );

    let server = format!("127.0.0.1:{port}").parse().unwrap();
    // The worker answers once it has bound its socket: until then a handshake gets no answer, so
    // each attempt is cut short and retried, within a deadline a slow start on a loaded machine
    // still meets.
    let deadline = Instant::now() + WAIT;
    let conn = loop {
        match tokio::time::timeout(
            Duration::from_secs(2),
            endpoint.connect(server, "localhost").unwrap(),
        )
        .await
        {
            Ok(Ok(c)) => break c,
            _ => {
                assert!(child.0.try_wait().unwrap().is_none(), "the worker exited");
                assert!(
                    Instant::now() < deadline,
                    "the worker did not answer a handshake within {WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for n in 1..=3u64 {
        common::client::expect_request(&conn, b"hello baton", n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    conn.close(0u32.into(), b"bye");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (up to [`WAIT`]) for the child to exit.
fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit within {WAIT:?} ({what})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn answers_info(path: &std::path::Path) -> bool {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
    let [port, peer_port] = common::free_udp_ports();
    let control = dir.join("w1.sock");
    std::fs::write(
        dir.join("worker.toml"),
        common::migrating_worker_config(&dir, port, peer_port, "", ""),
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
    let deadline = Instant::now() + WAIT;
    while !answers_info(&control) {
        assert!(first.0.try_wait().unwrap().is_none(), "the worker exited");
        assert!(
            Instant::now() < deadline,
            "the worker did not replace the stale socket and answer on it within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A second worker with the same control socket refuses, and leaves the first one's alone.
    let mut second = start();
    let status = wait_exit(&mut second, "a second worker on a live control socket");
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
    let status = wait_exit(&mut first.0, "SIGTERM");
    assert!(
        status.success(),
        "SIGTERM did not stop the worker cleanly: {status:?}"
    );
    assert!(!control.exists(), "the control socket was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A secrets file or private key that group or others can read stops the worker at start, naming
/// the file and the `chmod` that fixes it.
#[test]
fn readable_secrets_and_keys_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("baton-worker-modes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
    let [port, peer_port] = common::free_udp_ports();
    let d = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("worker.toml"),
        common::migrating_worker_config(&dir, port, peer_port, "", ""),
    )
    .unwrap();
    let chmod = |f: &str, mode: u32| {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for file in ["secrets.toml", "service.key", "w1.key"] {
        chmod(file, 0o644);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, file);
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "started with a 0644 {file}");
        assert!(err.contains(&format!("chmod 600 {}", d(file))), "{err}");
        assert!(err.contains("mode 0644"), "{err}");
        assert!(
            !err.contains("PRIVATE KEY") && !err.contains("token_secret ="),
            "{err}"
        );
        chmod(file, 0o600);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGHUP re-reads secrets.toml: new key ids are taken into use without a restart, and a file that
/// does not load (here: mode 0644) is logged with the fix while the worker keeps running.
#[test]
fn sighup_reloads_the_secrets_and_a_bad_file_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("baton-worker-sighup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
    let [port, peer_port] = common::free_udp_ports();
    let control = dir.join("w1.sock");
    let d = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("worker.toml"),
        common::migrating_worker_config(&dir, port, peer_port, "", ""),
    )
    .unwrap();
    let log_path = dir.join("worker.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut worker = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while !answers_info(&control) {
        assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited");
        assert!(Instant::now() < deadline, "the worker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = || std::fs::read_to_string(&log_path).unwrap();
    let wait_log = |what: &str| {
        let deadline = Instant::now() + WAIT;
        while !log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let hup = || {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(worker.0.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
    };
    let token = baton_worker::hex(&[0x5a; 32]);
    let key = baton_worker::hex(&[0xa5; 32]);
    migration::secret_file::write(
        dir.join("secrets.toml"),
        format!(
            "token_secret_id = 2\ntoken_secret = \"{token}\"\nsnapshot_key_id = 2\nsnapshot_key = \"{key}\"\n"
        ),
    )
    .unwrap();
    hup();
    wait_log("secrets reloaded");
    assert!(log().contains("new_snapshot_key=Some(2)"), "{}", log());

    std::fs::set_permissions(
        dir.join("secrets.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    hup();
    wait_log("secrets NOT reloaded");
    assert!(
        log().contains(&format!("chmod 600 {}", d("secrets.toml"))),
        "{}",
        log()
    );
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "a bad reload stopped the worker"
    );
    assert!(answers_info(&control));
    let log = log();
    assert!(
        !log.contains(&token) && !log.contains(&key),
        "a secret was logged"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
