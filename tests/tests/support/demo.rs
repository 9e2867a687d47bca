//! Running `cargo xtask demo` as a user does, for the demo tests: the binaries built by the netns
//! harness, the output captured, the RESULT line and its fields.
use super::*;

/// Builds the binaries the demo runs into this test's own target/profile directory (the netns
/// harness's builds: baton-lb and baton, baton-worker, baton-load), so the demo does not need a
/// release build of its own.
pub fn demo_bin_dir() -> &'static Path {
    worker_bin();
    load_bin();
    bin_dir()
}

/// `cargo xtask demo --small --bin-dir <bins> ARGS`, which must succeed and end with a line
/// starting `result_start`. Returns that RESULT line and the run's output (for messages).
pub fn run_demo(args: &[&str], result_start: &str) -> (String, String) {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the demo test needs root (namespaces, XDP, bpffs)"
    );
    let out = Command::new(env!("CARGO"))
        .args(["xtask", "demo", "--small", "--bin-dir"])
        .arg(demo_bin_dir())
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run cargo xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}");
    assert!(
        out.status.success(),
        "cargo xtask demo --small {args:?} failed ({}):\n{context}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with(result_start),
        "the demo's output must end with the RESULT line:\n{context}"
    );
    eprintln!("{args:?}: {last}");
    (last, context)
}

/// `key=value` fields of the RESULT line.
pub fn field(result: &str, key: &str) -> f64 {
    result
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("RESULT line has no {key}: {result}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {result}: {e}"))
}
