//! Reading secret files (`secrets.toml`, TLS private keys) only when nobody else can read or
//! change them. One definition for every Baton binary: the worker, `baton-lb` and the `baton` CLI.
//!
//! The rule: the file (after following symlinks) is a regular file, has no group or other
//! permission bits (`chmod 600`), and is owned by the process's effective user or by root. A file
//! owned by another non-root user is refused because that user can rewrite it (plant a key) or
//! chmod it readable at any time. Root-owned files are accepted: root can read everything anyway,
//! and a root-owned 0600 file is unreadable to a non-root service, which fails with a clear error.
//!
//! Symlinks are followed (secret mounts such as Kubernetes' `..data/` links are symlinks) and the
//! checks apply to the file they reach. The check runs on the opened descriptor (`fstat`), and the
//! bytes come from that same descriptor, so a file swapped between the check and the read is not
//! read.
use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Largest secret file read (a PEM key chain or a secrets.toml is a few KiB).
const MAX_LEN: u64 = 1 << 20;

/// Why a secret file was refused. `Display` names the file and the fix, never its contents.
#[derive(Debug)]
pub enum SecretFileError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    NotRegular {
        path: PathBuf,
    },
    TooLarge {
        path: PathBuf,
        len: u64,
    },
    Mode {
        path: PathBuf,
        mode: u32,
    },
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
}

impl fmt::Display for SecretFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            Self::NotRegular { path } => write!(
                f,
                "{} is not a regular file; point the configuration at the secret file itself",
                path.display()
            ),
            Self::TooLarge { path, len } => write!(
                f,
                "{} is {len} bytes, more than a secret file holds ({MAX_LEN} bytes at most); check the path",
                path.display()
            ),
            Self::Mode { path, mode } => write!(
                f,
                "{p} has mode {mode:04o}: a secret must not be readable or writable by group or others; \
                 run `chmod 600 {p}`",
                p = path.display()
            ),
            Self::Owner { path, owner, euid } => write!(
                f,
                "{p} is owned by uid {owner}, but this process runs as uid {euid}: another user could \
                 replace the secret; run `chown {euid} {p}` (or run as its owner)",
                p = path.display()
            ),
        }
    }
}

impl std::error::Error for SecretFileError {}

/// Checks the metadata of an opened secret file against the rule above.
pub fn check(path: &Path, meta: &std::fs::Metadata, euid: u32) -> Result<(), SecretFileError> {
    let path = path.to_path_buf();
    if !meta.file_type().is_file() {
        return Err(SecretFileError::NotRegular { path });
    }
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(SecretFileError::Owner {
            path,
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Mode { path, mode });
    }
    Ok(())
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Opens `path`, checks it (mode, owner, type) and returns its bytes (zeroized on drop).
pub fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let io = |error| SecretFileError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check(path, &meta, euid())?;
    if meta.len() > MAX_LEN {
        return Err(SecretFileError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(MAX_LEN).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path) -> Result<Zeroizing<String>, SecretFileError> {
    let bytes = read(path)?;
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(SecretFileError::Io {
            path: path.to_path_buf(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        }),
    }
}

/// Writes a secret file created with mode 0600 (an existing file is truncated and chmod'ed to 0600).
pub fn write(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path.as_ref())?;
    // `mode` applies only when the file is created; an older file keeps its bits otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_ref())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("baton-secret-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn mode_0600_is_read_and_0644_is_refused_with_the_chmod() {
        let d = dir("mode");
        let p = d.join("secrets.toml");
        write(&p, b"token_secret = \"00\"\n").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(&read(&p).unwrap()[..], b"token_secret = \"00\"\n");
        for bad in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            chmod(&p, bad);
            let e = read(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            assert!(e.contains(&format!("{bad:04o}")), "{e}");
            assert!(!e.contains("token_secret"), "no contents in errors: {e}");
        }
        chmod(&p, 0o400);
        read(&p).unwrap();
        // Rewriting an old 0644 file leaves it 0600.
        chmod(&p, 0o644);
        write(&p, b"x").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlinks_are_judged_by_the_file_they_reach() {
        let d = dir("link");
        let target = d.join("real.key");
        write(&target, b"key").unwrap();
        let link = d.join("w1.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // The link itself is 0777; what counts is the key it points at.
        assert_eq!(&read(&link).unwrap()[..], b"key");
        chmod(&target, 0o644);
        let e = read(&link).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let dangling = d.join("dangling.key");
        std::os::unix::fs::symlink(d.join("missing"), &dangling).unwrap();
        assert!(matches!(read(&dangling), Err(SecretFileError::Io { .. })));
        assert!(matches!(read(&d), Err(SecretFileError::NotRegular { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_users_file_is_refused_root_owned_accepted() {
        let d = dir("owner");
        let p = d.join("s.toml");
        write(&p, b"x").unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let me = meta.uid();
        check(&p, &meta, me).unwrap();
        // Seen from a process running as another uid: refused unless the owner is root.
        let other = if me == 4242 { 4243 } else { 4242 };
        if me == 0 {
            check(&p, &meta, other).unwrap();
        } else {
            let e = check(&p, &meta, other).unwrap_err().to_string();
            assert!(e.contains(&format!("chown {other} {}", p.display())), "{e}");
        }
        if me == 0 {
            // Running as root: a file another (non-root) user owns is refused.
            std::os::unix::fs::chown(&p, Some(4242), None).unwrap();
            let e = read(&p).unwrap_err().to_string();
            assert!(
                e.contains("owned by uid 4242") && e.contains("chown 0 "),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
