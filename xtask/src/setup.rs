//! `cargo xtask setup`, and the first step of `demo`, `test`, `build-ebpf`, `lab` and `bench`:
//! this module owns the machine's prerequisites, i.e. what a fresh Debian 12 machine lacks to build
//! and run Baton:
//!
//! - the commands the build, the lab and the tests run (bpftool, ethtool, ip, tcpdump, openssl, curl,
//!   patch, git, tar, sha256sum, python3, protoc, etcd, etcdctl), from apt;
//! - the Python module aioquic (the HTTP/3 test client tests/support/h3_aioquic_client.py), pinned,
//!   with pip (and Debian's python3-pip from apt when python3 has no pip);
//! - the nightly toolchain's `rust-src` (the XDP object is built with `-Z build-std=core`);
//! - bpf-linker, built from crates.io against the nightly's own libLLVM (docs/ENVIRONMENT.md);
//! - bpffs mounted on /sys/fs/bpf (baton-lb pins its maps and link there).
//!
//! Each item is checked first and only what is missing is installed, so a second run does nothing.
//! It installs only as root on a Debian-like system; anywhere else it fails, naming each missing item
//! and the command that installs it. The nightly toolchain itself is never installed (it pins the
//! LLVM bpf-linker is built against): if it is missing, setup says so and fails.
//! After the prerequisites it prepares the patched dependency sources (`patch::prepare`), which every
//! workspace build needs and which use curl, tar and patch from the list above.
use crate::util::is_root;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Commands we need from apt: (command, Debian package, why we need it).
const APT: &[(&str, &str, &str)] = &[
    (
        "bpftool",
        "bpftool",
        "the tests and the demo inspect the pinned BPF maps and link",
    ),
    (
        "ethtool",
        "ethtool",
        "the lab sets veth offloads (tx checksums, GRO) for XDP redirects",
    ),
    (
        "ip",
        "iproute2",
        "creates the network-namespace lab (namespaces, veths, addresses)",
    ),
    (
        "tcpdump",
        "tcpdump",
        "watches the lab's traffic when debugging",
    ),
    (
        "openssl",
        "openssl",
        "the demo's service certificate and the AES-GCM bench ceiling",
    ),
    (
        "curl",
        "curl",
        "downloads the pinned quinn-proto crate we patch; reads metrics in the lab",
    ),
    ("patch", "patch", "applies patches/quinn-proto/*.patch"),
    (
        "git",
        "git",
        "applies the patches when `patch` is absent; the checkout itself",
    ),
    ("tar", "tar", "unpacks the pinned quinn-proto crate"),
    (
        "sha256sum",
        "coreutils",
        "checks the pinned crate's checksum",
    ),
    (
        "python3",
        "python3",
        "runs tests/support/h3_aioquic_client.py, the HTTP/3 test client on aioquic",
    ),
    (
        "protoc",
        "protobuf-compiler",
        "etcd-client (the cluster's etcd API) compiles etcd's protobuf definitions when it builds",
    ),
    (
        "etcd",
        "etcd-server",
        "the cluster tests run a real etcd (the state of a Baton cluster)",
    ),
    (
        "etcdctl",
        "etcd-client",
        "inspecting a cluster's keys in etcd (docs, debugging)",
    ),
];

/// The aioquic release the HTTP/3 test client is tested with; `pip install`ed when missing. (A
/// macro, so ABOUT can name it too.)
macro_rules! aioquic_pin {
    () => {
        "1.7.2"
    };
}
const AIOQUIC: &str = aioquic_pin!();

const BPFFS: &str = "/sys/fs/bpf";

/// Long help of `cargo xtask setup`.
pub const ABOUT: &str = concat!(
    "\
Install what this machine lacks to build and run Baton, then prepare the patched dependency sources.

Checks each item and installs only what is missing (as root on Debian 12 or another Debian-like \
system; elsewhere it fails and prints the command for each missing item):
  - apt packages for the commands bpftool, ethtool, ip (iproute2), tcpdump, openssl, curl, patch, \
git, tar, sha256sum (coreutils), python3, protoc (protobuf-compiler), etcd (etcd-server), etcdctl \
(etcd-client)
  - the Python module aioquic (the HTTP/3 test client), with `python3 -m pip install aioquic==",
    aioquic_pin!(),
    "` (plus --break-system-packages where the interpreter is marked externally managed, as \
Debian's is); python3-pip from apt first if python3 has no pip
  - the nightly toolchain's rust-src component (`-Z build-std=core` for the XDP object)
  - bpf-linker, built with `cargo +stable install` against the nightly's own libLLVM (symlinked \
under ~/.cache/bpf-llvm/lib), into $CARGO_HOME/bin; about a minute
  - bpffs mounted on /sys/fs/bpf

The nightly toolchain itself is not installed: if it is missing, install it with \
`rustup toolchain install nightly --component rust-src`. `cargo xtask demo`, `test`, `build-ebpf`, \
`lab` and `bench` run this step first."
);

fn log(msg: impl AsRef<str>) {
    eprintln!("[setup] {}", msg.as_ref());
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`): where rustup's proxies are and bpf-linker goes.
fn cargo_bin() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home).join("bin"));
    }
    Ok(home()?.join(".cargo").join("bin"))
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// Puts `$CARGO_HOME/bin` on this process's PATH (first), unless it is there already: cargo may be
/// run without it on PATH, and the builds we start (lb-user's build.rs through aya-build) run
/// bpf-linker by name. Call it before any thread starts.
pub fn put_cargo_bin_on_path() {
    let Ok(bin) = cargo_bin() else { return };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .unwrap_or(path);
    // SAFETY: called at the start of main, before any other thread exists.
    unsafe { std::env::set_var("PATH", joined) };
}

/// Where `program` is: on PATH, or in the sbin folders a non-root PATH often lacks (Debian puts
/// bpftool and ethtool in /usr/sbin; the root commands that run them have it on PATH).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs a command and returns its stdout if it succeeded.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The apt packages among the missing items, for one apt-get command line.
fn apt_packages(missing: &[Missing]) -> Vec<&'static str> {
    missing
        .iter()
        .filter_map(|m| match m {
            Missing::Apt { package, .. } => Some(*package),
            _ => None,
        })
        .collect()
}

/// Runs a command, echoing it, and fails with its exit status.
fn run(cmd: &mut Command) -> Result<()> {
    log(format!("$ {cmd:?}"));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// What bpf-linker is built against: the nightly's libLLVM, linked under ~/.cache/bpf-llvm/lib.
struct Llvm {
    /// The nightly's `libLLVM.so.*` files (the SONAME bpf-linker loads at run time).
    libs: Vec<PathBuf>,
    /// `~/.cache/bpf-llvm`, bpf-linker's LLVM_PREFIX; its lib/ becomes bpf-linker's RUNPATH.
    prefix: PathBuf,
    major: String,
}

impl Llvm {
    fn find() -> Result<Llvm> {
        let sysroot = output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
            .context("`rustup run nightly rustc --print sysroot` failed")?;
        let lib = PathBuf::from(sysroot.trim()).join("lib");
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&lib)
            .with_context(|| format!("reading {}", lib.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so."))
            })
            .collect();
        libs.sort();
        let Some(first) = libs.first() else {
            bail!(
                "the nightly toolchain has no {}/libLLVM.so.*: bpf-linker cannot be built against it",
                lib.display()
            );
        };
        let name = first.file_name().unwrap().to_string_lossy();
        let major: String = name["libLLVM.so.".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if major.is_empty() {
            bail!("cannot read the LLVM major version from {name}");
        }
        let prefix = home()?.join(".cache").join("bpf-llvm");
        Ok(Llvm {
            libs,
            prefix,
            major,
        })
    }

    fn lib_dir(&self) -> PathBuf {
        self.prefix.join("lib")
    }

    /// `lib/<each libLLVM.so.*>` and `lib/libLLVM.so` (the name the build links) -> the nightly's.
    fn links(&self) -> Vec<(PathBuf, &Path)> {
        let dir = self.lib_dir();
        let mut links: Vec<(PathBuf, &Path)> = self
            .libs
            .iter()
            .map(|so| (dir.join(so.file_name().unwrap()), so.as_path()))
            .collect();
        links.push((dir.join("libLLVM.so"), &self.libs[0]));
        links
    }

    /// Creates the symlinks. One that already points right is left alone, and one that must change
    /// is replaced by a rename, so a bpf-linker running meanwhile never finds its library missing.
    fn link(&self) -> Result<()> {
        std::fs::create_dir_all(self.lib_dir())
            .with_context(|| format!("creating {}", self.lib_dir().display()))?;
        for (link, target) in self.links() {
            if std::fs::read_link(&link).is_ok_and(|t| t == target) {
                continue;
            }
            log(format!(
                "linking {} -> {}",
                link.display(),
                target.display()
            ));
            let tmp = link.with_extension("setup-tmp");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            std::fs::rename(&tmp, &link).with_context(|| format!("creating {}", link.display()))?;
        }
        Ok(())
    }

    /// `cargo +stable install bpf-linker ...` with the environment docs/ENVIRONMENT.md gives.
    fn install_command(&self, force: bool) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.args(["+stable", "install", "bpf-linker", "--locked"])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", self.major))
            .env("LLVM_PREFIX", &self.prefix)
            .env("RUSTFLAGS", format!("-L {}", self.lib_dir().display()))
            // Flags or a compiler inherited from the cargo that runs xtask would override these.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        if force {
            cmd.arg("--force");
        }
        cmd
    }

    /// The same, as shell lines a user can paste.
    fn shell_lines(&self, force: bool) -> Vec<String> {
        let mut lines = vec![format!("mkdir -p {}", self.lib_dir().display())];
        for (link, target) in self.links() {
            lines.push(format!("ln -sf {} {}", target.display(), link.display()));
        }
        lines.push(format!(
            "LLVM_PREFIX={} RUSTFLAGS=\"-L {}\" cargo +stable install bpf-linker --locked \
             --no-default-features --features llvm-{}{}",
            self.prefix.display(),
            self.lib_dir().display(),
            self.major,
            if force { " --force" } else { "" }
        ));
        lines
    }
}

/// One missing prerequisite.
enum Missing {
    Apt {
        command: &'static str,
        package: &'static str,
        why: &'static str,
    },
    RustSrc,
    /// The Python module aioquic (`python3 -c "import aioquic"` fails).
    Aioquic,
    /// `force`: a bpf-linker binary is there but does not run (e.g. its libLLVM link is gone).
    BpfLinker {
        llvm: Llvm,
        force: bool,
    },
    Bpffs,
}

impl Missing {
    fn describe(&self) -> String {
        match self {
            Missing::Apt {
                command,
                package,
                why,
            } if command == package => format!("{package}: {why}"),
            Missing::Apt {
                command,
                package,
                why,
            } => format!("{package} (for `{command}`): {why}"),
            Missing::RustSrc => {
                "the nightly's rust-src: the XDP object is built with `-Z build-std=core`".into()
            }
            Missing::Aioquic => format!(
                "the Python module aioquic {AIOQUIC}: tests/support/h3_aioquic_client.py, the HTTP/3 \
                 test client"
            ),
            Missing::BpfLinker { llvm, force } => format!(
                "bpf-linker{}: links the XDP program (lb-ebpf); built against the nightly's LLVM {}, \
                 about a minute",
                if *force {
                    " (present but does not run)"
                } else {
                    ""
                },
                llvm.major
            ),
            Missing::Bpffs => {
                format!("bpffs on {BPFFS}: baton-lb pins its maps and XDP link there")
            }
        }
    }
}

/// Versions of what is present, for the summary line.
#[derive(Default)]
struct Present {
    bpftool: String,
    bpf_linker: String,
    aioquic: String,
}

/// Whether `python3` can import aioquic, and its version if so.
fn aioquic_version() -> Option<String> {
    output(
        "python3",
        &["-c", "import aioquic; print(aioquic.__version__)"],
    )
    .map(|v| v.trim().to_string())
}

fn has_pip() -> bool {
    output("python3", &["-m", "pip", "--version"]).is_some()
}

/// Whether python3's installation is marked externally managed (PEP 668, as Debian's python3 is):
/// pip then refuses to install outside a virtual environment unless told
/// `--break-system-packages`. Root's pip installs under /usr/local there, beside (not over) the
/// packages apt installed.
fn python_externally_managed() -> bool {
    output(
        "python3",
        &[
            "-c",
            "import os, sysconfig; \
             print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))",
        ],
    )
    .is_some_and(|o| o.trim() == "True")
}

/// `python3 -m pip install ... aioquic==AIOQUIC`.
fn pip_install_args(externally_managed: bool) -> Vec<String> {
    let mut args: Vec<String> = ["-m", "pip", "install", "--quiet"].map(String::from).into();
    if externally_managed {
        args.push("--break-system-packages".into());
    }
    args.push(format!("aioquic=={AIOQUIC}"));
    args
}

fn is_debian_like() -> bool {
    let Ok(release) = std::fs::read_to_string("/etc/os-release") else {
        return false;
    };
    let debian = release.lines().any(|l| {
        let Some((key, value)) = l.split_once('=') else {
            return false;
        };
        let value = value.trim_matches('"');
        (key == "ID" && value == "debian")
            || (key == "ID_LIKE" && value.split_whitespace().any(|v| v == "debian"))
    });
    debian && find_program("apt-get").is_some()
}

fn bpffs_mounted() -> bool {
    // /proc/self/mountinfo: "id parent dev root mountpoint options [optional...] - fstype source ...".
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|l| {
            let mut fields = l.split_whitespace();
            let mountpoint = fields.nth(4);
            let fstype = fields.skip_while(|f| *f != "-").nth(1);
            mountpoint == Some(BPFFS) && fstype == Some("bpf")
        })
    })
}

/// Fails unless the nightly toolchain is installed: it cannot be installed here (its LLVM is the
/// one bpf-linker is built against, and no other toolchain can be fetched).
fn require_nightly() -> Result<()> {
    if find_program("rustup").is_none() {
        bail!(
            "rustup is not on PATH (nor in {}): Baton's builds need rustup's stable and nightly \
             toolchains, see https://rustup.rs",
            cargo_bin()?.display()
        );
    }
    let list =
        output("rustup", &["toolchain", "list"]).context("`rustup toolchain list` failed")?;
    if !list.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the nightly toolchain is missing (it builds the XDP object, and bpf-linker is built \
             against its LLVM); install it with `rustup toolchain install nightly --component \
             rust-src`, then run this again"
        );
    }
    Ok(())
}

fn check() -> Result<(Vec<Missing>, Present)> {
    let mut missing = Vec::new();
    let mut present = Present::default();
    for &(command, package, why) in APT {
        if find_program(command).is_none() {
            missing.push(Missing::Apt {
                command,
                package,
                why,
            });
        }
    }
    if let Some(bpftool) = find_program("bpftool") {
        let out = output(bpftool.to_str().unwrap_or("bpftool"), &["--version"]);
        // "bpftool v7.1.0\nusing libbpf v1.1\n..."
        present.bpftool = out
            .as_deref()
            .and_then(|o| o.lines().next())
            .and_then(|l| l.split_whitespace().nth(1))
            .map(|v| v.trim_start_matches('v').to_string())
            .unwrap_or_else(|| "(version unknown)".into());
    }

    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("`rustup component list --toolchain nightly --installed` failed")?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        missing.push(Missing::RustSrc);
    }

    match output("bpf-linker", &["--version"]) {
        Some(v) => present.bpf_linker = v.trim().trim_start_matches("bpf-linker ").to_string(),
        None => {
            let force = cargo_bin()?.join("bpf-linker").exists();
            missing.push(Missing::BpfLinker {
                llvm: Llvm::find()?,
                force,
            });
        }
    }

    if !bpffs_mounted() {
        missing.push(Missing::Bpffs);
    }

    // aioquic, and pip to install it with. Without python3 at all (an APT item above) both are
    // missing too.
    match aioquic_version() {
        Some(v) => present.aioquic = v,
        None => {
            if !has_pip() {
                missing.push(Missing::Apt {
                    command: "python3 -m pip",
                    package: "python3-pip",
                    why: "installs the Python module aioquic",
                });
            }
            missing.push(Missing::Aioquic);
        }
    }
    Ok((missing, present))
}

/// Checks every prerequisite, installs what is missing (root on Debian-like systems only), then
/// prepares the patched dependency sources. `what` names the command, for the error message.
pub fn ensure(what: &str) -> Result<()> {
    require_nightly()?;
    let (missing, present) = check()?;
    if missing.is_empty() {
        summary(&present);
        return crate::patch::prepare();
    }

    let root = is_root();
    let debian = is_debian_like();
    if !root || !debian {
        bail!(
            "{}",
            manual_instructions(
                what,
                &missing,
                if root { "not Debian-like" } else { "not root" },
                debian
            )
        );
    }

    // All apt packages in one apt-get run, then the other items one by one.
    let packages = apt_packages(&missing);
    if !packages.is_empty() {
        for m in missing.iter().filter(|m| matches!(m, Missing::Apt { .. })) {
            log(format!("installing {}", m.describe()));
        }
        run(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        // dpkg's progress goes to stdout even with -qq; errors still reach stderr.
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()))?;
    }
    for m in missing.iter().filter(|m| !matches!(m, Missing::Apt { .. })) {
        log(format!("installing {}", m.describe()));
        match m {
            Missing::Apt { .. } => {}
            Missing::RustSrc => run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?,
            Missing::BpfLinker { llvm, force } => {
                llvm.link()?;
                // A binary that only lost its libLLVM links needs no rebuild.
                if *force && output("bpf-linker", &["--version"]).is_some() {
                    log("bpf-linker runs again with its libLLVM links restored");
                } else {
                    run(&mut llvm.install_command(*force))?;
                }
            }
            Missing::Bpffs => run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?,
            Missing::Aioquic => {
                if !has_pip() {
                    bail!(
                        "python3 ({}) has no pip, even after installing python3-pip: install pip for \
                         that interpreter (e.g. `python3 -m ensurepip`), or run `python3 -m pip \
                         install aioquic=={AIOQUIC}` with a python3 that has one, then run this again",
                        find_program("python3")
                            .map_or("not found".into(), |p| p.display().to_string())
                    );
                }
                run(Command::new("python3").args(pip_install_args(python_externally_managed())))?
            }
        }
    }

    // Check again: an install that "succeeded" but left the item missing must not pass silently.
    let (still, present) = check()?;
    if !still.is_empty() {
        let list: Vec<String> = still.iter().map(Missing::describe).collect();
        bail!("still missing after installing: {}", list.join("; "));
    }
    summary(&present);
    crate::patch::prepare()
}

fn summary(present: &Present) {
    let others: Vec<&str> = APT
        .iter()
        .map(|(c, _, _)| *c)
        .filter(|c| *c != "bpftool")
        .collect();
    log(format!(
        "all prerequisites present (bpftool {}, bpf-linker {}, aioquic {}, nightly rust-src, bpffs on \
         {BPFFS}; {})",
        present.bpftool,
        present.bpf_linker,
        present.aioquic,
        others.join(" ")
    ));
}

/// The error for a machine we do not install on: each missing item, then the commands.
fn manual_instructions(what: &str, missing: &[Missing], reason: &str, debian: bool) -> String {
    let mut msg = format!(
        "{what} needs what this machine lacks, and setup installs only as root on a Debian-like \
         system ({reason}). Missing:\n"
    );
    for m in missing {
        let _ = writeln!(msg, "  - {}", m.describe());
    }
    msg += "Install with:\n";
    let packages = apt_packages(missing);
    if !packages.is_empty() {
        if debian {
            let _ = writeln!(msg, "  sudo apt-get install -y {}", packages.join(" "));
        } else {
            let _ = writeln!(
                msg,
                "  your package manager's packages for these commands (Debian: sudo apt-get \
                 install -y {})",
                packages.join(" ")
            );
        }
    }
    for m in missing {
        match m {
            Missing::Apt { .. } => {}
            Missing::RustSrc => msg += "  rustup component add rust-src --toolchain nightly\n",
            Missing::BpfLinker { llvm, force } => {
                for line in llvm.shell_lines(*force) {
                    let _ = writeln!(msg, "  {line}");
                }
            }
            Missing::Bpffs => {
                let _ = writeln!(msg, "  sudo mount -t bpf bpf {BPFFS}");
            }
            Missing::Aioquic => {
                let args = pip_install_args(python_externally_managed());
                let _ = writeln!(msg, "  python3 {}", args.join(" "));
            }
        }
    }
    let _ = write!(msg, "then run `{what}` again.");
    msg
}
