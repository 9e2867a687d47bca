//! `cargo xtask patch-deps`: builds the patched dependency sources that the root `Cargo.toml`'s
//! `[patch.crates-io]` points at.
//!
//! For each folder `patches/<crate>/` (today only `quinn-proto`): take the pristine `.crate` from the
//! cargo cache (or download it), check its sha256 against `patches/<crate>/SOURCE` and, when it is
//! recorded there, against `Cargo.lock`, unpack it into the gitignored `.patched/<crate>` and apply
//! `patches/<crate>/*.patch` in name order. A stamp file records what was applied, so a second run
//! does nothing unless the source or a patch changed. We never commit a dependency's source.
use crate::util::workspace_root;
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates we patch; each has `patches/<name>/SOURCE`.
const PATCHED: &[&str] = &["quinn-proto"];

pub fn prepare() -> Result<()> {
    for name in PATCHED {
        prepare_one(&workspace_root(), name)
            .with_context(|| format!("preparing patched {name}"))?;
    }
    Ok(())
}

/// What `patches/<crate>/SOURCE` says.
struct Source {
    name: String,
    version: String,
    sha256: String,
    url: String,
}

fn read_source(path: &Path) -> Result<Source> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |key: &str| -> Result<String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .with_context(|| format!("{} has no `{key} = ...` line", path.display()))
    };
    let source = Source {
        name: field("name")?,
        version: field("version")?,
        sha256: field("sha256")?,
        url: field("url")?,
    };
    ensure!(
        source.sha256.len() == 64 && source.sha256.chars().all(|c| c.is_ascii_hexdigit()),
        "{}: sha256 must be 64 hex digits",
        path.display()
    );
    Ok(source)
}

fn prepare_one(root: &Path, name: &str) -> Result<()> {
    let patch_dir = root.join("patches").join(name);
    let source = read_source(&patch_dir.join("SOURCE"))?;
    ensure!(
        source.name == name,
        "patches/{name}/SOURCE names crate {}",
        source.name
    );
    let mut patches: Vec<PathBuf> = fs::read_dir(&patch_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    patches.retain(|p| p.extension().is_some_and(|e| e == "patch"));
    patches.sort();

    // The stamp names the source checksum and every patch with its own checksum.
    let mut stamp = format!("{} {} {}\n", source.name, source.version, source.sha256);
    for p in &patches {
        stamp += &format!(
            "{} {}\n",
            p.file_name().unwrap().to_string_lossy(),
            sha256_file(p)?
        );
    }
    let out_root = root.join(".patched");
    let out = out_root.join(name);
    let stamp_path = out_root.join(format!("{name}.stamp"));
    if out.join("Cargo.toml").is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
    {
        return Ok(());
    }

    if let Some(locked) = cargo_lock_checksum(root, &source.name, &source.version)? {
        ensure!(
            locked == source.sha256,
            "Cargo.lock records {} {} with sha256 {locked}, patches/{name}/SOURCE says {}",
            source.name,
            source.version,
            source.sha256
        );
    }
    let file_name = format!("{}-{}.crate", source.name, source.version);
    let crate_file = match find_in_cargo_cache(&file_name) {
        Some(p) => p,
        None => {
            fs::create_dir_all(out_root.join("downloads"))?;
            let dest = out_root.join("downloads").join(&file_name);
            if !dest.is_file() {
                eprintln!("[xtask] downloading {}", source.url);
                let tmp = dest.with_extension("part");
                run(Command::new("curl")
                    .args([
                        "--fail",
                        "--silent",
                        "--show-error",
                        "--location",
                        "--retry",
                        "3",
                        "-o",
                    ])
                    .arg(&tmp)
                    .arg(&source.url))?;
                fs::rename(&tmp, &dest)?;
            }
            dest
        }
    };
    let actual = sha256_file(&crate_file)?;
    if actual != source.sha256 {
        bail!(
            "{} has sha256 {actual}, expected {} (patches/{name}/SOURCE)",
            crate_file.display(),
            source.sha256
        );
    }

    eprintln!(
        "[xtask] unpacking {} into {} and applying {} patch(es)",
        file_name,
        out.display(),
        patches.len()
    );
    let _ = fs::remove_file(&stamp_path);
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    let unpack = out_root.join(format!("{name}.unpack"));
    if unpack.exists() {
        fs::remove_dir_all(&unpack)?;
    }
    fs::create_dir_all(&unpack)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&crate_file)
        .arg("-C")
        .arg(&unpack))?;
    let unpacked = unpack.join(format!("{}-{}", source.name, source.version));
    ensure!(
        unpacked.join("Cargo.toml").is_file(),
        "{} does not contain {}",
        file_name,
        unpacked.display()
    );
    for p in &patches {
        apply(&unpacked, p).with_context(|| format!("applying {}", p.display()))?;
    }
    fs::rename(&unpacked, &out)?;
    fs::remove_dir_all(&unpack)?;
    fs::write(&stamp_path, stamp)?;
    Ok(())
}

/// Applies one `-p1` patch inside `dir`, with `patch` or else `git apply` (kept from discovering
/// the enclosing repository, whose paths it would otherwise use).
fn apply(dir: &Path, patch: &Path) -> Result<()> {
    if Command::new("patch")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(Command::new("patch")
            .args(["-p1", "--batch", "--forward", "--silent", "-i"])
            .arg(patch)
            .current_dir(dir))
    } else {
        run(Command::new("git")
            .args(["apply", "-p1", "--whitespace=nowarn"])
            .arg(patch)
            .env("GIT_CEILING_DIRECTORIES", dir.parent().unwrap())
            .current_dir(dir))
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn find_in_cargo_cache(file_name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    fs::read_dir(home.join("registry").join("cache"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(file_name))
        .find(|p| p.is_file())
}

/// The checksum `Cargo.lock` records for a registry package, if it records one (with
/// `[patch.crates-io]` in force it lists the patched path source without a checksum).
fn cargo_lock_checksum(root: &Path, name: &str, version: &str) -> Result<Option<String>> {
    let Ok(lock) = fs::read_to_string(root.join("Cargo.lock")) else {
        return Ok(None);
    };
    for block in lock.split("[[package]]") {
        let get = |key: &str| {
            block.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        if get("name").as_deref() == Some(name) && get("version").as_deref() == Some(version) {
            if let Some(sum) = get("checksum") {
                return Ok(Some(sum));
            }
        }
    }
    Ok(None)
}
