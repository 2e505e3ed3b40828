//! xtask: the project's automation (tidy checks, benchmarks, SLO tooling),
//! written in Rust so CI and developers run the same thing.

mod tidy;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tidy") => tidy::run(),
        _ => {
            eprintln!("usage: cargo xtask <tidy>");
            std::process::exit(2);
        }
    }
}
