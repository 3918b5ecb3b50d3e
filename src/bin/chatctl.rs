//! `chatctl`: the cluster CLI. Thin wrapper over `chatstore::cli`.

/// glibc's allocator spent about a fifth of the write path's CPU in malloc,
/// free and arena-lock contention between threads (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() {
    let cli = chatstore::cli::Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("start tokio");
    let code = match runtime.block_on(chatstore::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
