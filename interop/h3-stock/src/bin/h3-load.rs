//! HTTP/3 load client. See README.md.

use clap::Parser;
use h3_stock::load::{self, cli::Args};
use tracing_subscriber::EnvFilter;

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                load::CANNOT_START
            } else {
                0
            });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("h3-load: starting the runtime: {e}");
            std::process::exit(load::CANNOT_START);
        }
    };
    let code = runtime.block_on(load::run(args));
    drop(runtime);
    std::process::exit(code);
}
