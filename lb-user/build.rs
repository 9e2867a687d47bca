//! Builds the XDP object (`lb-ebpf`) with aya-build so `cargo build -p lb-user` embeds it.
//! `AYA_BUILD_SKIP=1` skips the eBPF build (e.g. for `cargo check` without the nightly toolchain):
//! an empty placeholder is embedded instead and `object::bytes()` reports it.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-user sits in the workspace");
    let ebpf_dir = workspace.join("lb-ebpf");
    // The XDP program compiles lb-common too: rebuild when either changes.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("lb-common").display()
    );
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");

    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("lb-ebpf");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !out.exists() {
            std::fs::write(&out, [])?;
        }
        return Ok(());
    }
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: ebpf_dir.to_str().expect("workspace path is UTF-8"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).map_err(|e| {
        anyhow::anyhow!(
            "building the XDP program (lb-ebpf) failed: {e:#}\n\
             It needs the nightly toolchain with rust-src (`rustup component add rust-src --toolchain nightly`) \
             and bpf-linker on PATH (see docs/ENVIRONMENT or .ci/run); set AYA_BUILD_SKIP=1 to build without it."
        )
    })
}
