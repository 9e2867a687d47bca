//! `baton-worker gen-certs`: a CA, one certificate per worker for the peer channel (SAN = the
//! worker's name, server and client auth: mutual TLS), the controller's client certificate for
//! the control API over TLS (`controller.pem`, SAN `baton-controller`, client auth only), the
//! VIP's service certificate, and a fresh `secrets.toml`. For labs, tests and small deployments; use your own PKI if you have one.
use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// DNS name of the controller's client certificate (what a worker's `control_tls.clients` lists).
pub const CONTROLLER_NAME: &str = "baton-controller";

/// The controller's secrets file: the token secret only (least privilege, docs/DEPLOYMENT.md).
pub const CONTROLLER_SECRETS: &str = "controller-secrets.toml";

fn write(path: &Path, contents: &str, secret: bool) -> Result<()> {
    if secret {
        // 0600 even when an older file exists with wider bits.
        return migration::secret_file::write(path, contents.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()));
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Writes everything into `out` (created if needed); returns the files written.
pub fn generate(out: &Path, workers: &[String], service_name: &str) -> Result<Vec<PathBuf>> {
    anyhow::ensure!(
        !workers.is_empty(),
        "name at least one worker (--workers w1,w2)"
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "Baton worker CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = p.self_signed(&ca_key)?;
    for (name, pem, secret) in [
        ("ca.pem", ca.pem(), false),
        ("ca.key", ca_key.serialize_pem(), true),
    ] {
        let path = out.join(name);
        write(&path, &pem, secret)?;
        written.push(path);
    }
    let leaf = |name: &str, server: bool, client: bool| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![name.to_string()])
            .with_context(|| format!("{name:?} is not usable as a DNS name in a certificate"))?;
        p.distinguished_name.push(DnType::CommonName, name);
        if server {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if client {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    anyhow::ensure!(
        !workers.iter().any(|w| w == CONTROLLER_NAME),
        "{CONTROLLER_NAME:?} is the controller's certificate name: give the worker another name"
    );
    for w in workers {
        let (cert, key) = leaf(w, true, true)?;
        for (file, pem, secret) in [
            (format!("{w}.pem"), cert, false),
            (format!("{w}.key"), key, true),
        ] {
            let path = out.join(file);
            write(&path, &pem, secret)?;
            written.push(path);
        }
    }
    let (cert, key) = leaf(CONTROLLER_NAME, false, true)?;
    for (file, pem, secret) in [
        ("controller.pem", cert, false),
        ("controller.key", key, true),
    ] {
        let path = out.join(file);
        write(&path, &pem, secret)?;
        written.push(path);
    }
    let (cert, key) = leaf(service_name, true, false)?;
    for (file, pem, secret) in [("service.pem", cert, false), ("service.key", key, true)] {
        let path = out.join(file);
        write(&path, &pem, secret)?;
        written.push(path);
    }
    let (workers_toml, controller_toml) = crate::secrets::Secrets::generate_toml_pair();
    for (file, toml) in [
        ("secrets.toml", workers_toml),
        (CONTROLLER_SECRETS, controller_toml),
    ] {
        let path = out.join(file);
        write(&path, &toml, true)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_files_load_as_peer_tls_and_secrets() {
        let dir = std::env::temp_dir().join(format!("baton-gen-certs-{}", std::process::id()));
        let files = super::generate(&dir, &["w1".into(), "w2".into()], "baton.test").unwrap();
        assert_eq!(files.len(), 12);
        assert!(dir.join("controller.pem").exists() && dir.join("controller.key").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("w1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private keys are not world-readable");
        for f in &files {
            let name = f.file_name().unwrap().to_str().unwrap();
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            let secret = name.ends_with(".key") || name.ends_with("secrets.toml");
            assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{name}");
        }
        let controller =
            crate::secrets::Secrets::load(&dir.join(super::CONTROLLER_SECRETS)).unwrap();
        assert!(
            controller.snapshot_key.is_none(),
            "the controller holds no snapshot key"
        );
        let workers = [crate::config::PeerWorker {
            name: "w2".into(),
            server_id: 2,
            peer: "127.0.0.1:4470".parse().unwrap(),
        }];
        crate::migrate::peer_tls(
            &dir.join("ca.pem"),
            &dir.join("w1.pem"),
            &dir.join("w1.key"),
            &workers,
        )
        .unwrap();
        crate::load_tls(&dir.join("service.pem"), &dir.join("service.key")).unwrap();
        assert!(
            crate::secrets::Secrets::load(&dir.join("secrets.toml"))
                .unwrap()
                .snapshot_key
                .is_some()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
