//! Loads every XDP program of an eBPF object file and prints what the verifier made of it:
//! instructions processed and translated size, or the tail of its log when it rejects one.
//! A diagnostic for verifier complexity (needs root and bpffs; maps are pinned in a scratch
//! directory that is removed afterwards).
//!
//! `cargo run --release -p lb-user --example verify_object -- <object> [log tail lines]`
use anyhow::{Context, Result};
use aya::programs::Xdp;
use aya::{EbpfLoader, VerifierLogLevel};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: verify_object <object> [log tail lines]")?;
    let tail: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(40);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/baton-verify-{}", std::process::id()));
    std::fs::create_dir_all(&pins)?;
    let result = (|| -> Result<()> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .verifier_log_level(VerifierLogLevel::STATS)
            .load(&bytes)?;
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        for name in names {
            let prog: &mut Xdp = match ebpf.program_mut(&name).unwrap().try_into() {
                Ok(p) => p,
                Err(_) => continue,
            };
            match prog.load() {
                Ok(()) => {
                    let info = prog.info()?;
                    println!(
                        "{name}: ok, {:?} instructions verified, {:?} bytes translated",
                        info.verified_instruction_count(),
                        info.size_translated()
                    );
                }
                Err(e) => {
                    let text = format!("{e}");
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(tail);
                    println!("{name}: REJECTED\n{}", lines[from..].join("\n"));
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&pins);
    result
}
