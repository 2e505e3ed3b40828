//! xtask: the project's automation (tidy checks, benchmarks, SLO tooling),
//! written in Rust so CI and developers run the same thing.

mod api;
mod bench;
mod bench_pg;
mod latency;
mod ledger_bytes;
mod lopsided;
mod release;
mod scale;
mod slo;
mod tidy;

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    match args.first().map(String::as_str) {
        Some("tidy") => tidy::run(),
        Some("api") => api::run(&root(), args.iter().any(|a| a == "--check")),
        Some("release-check") => release::run(&root()),
        Some("probe") => bench::probe(),
        Some("slo-check") => slo::release_check(&root()),
        Some("slo-gen") => slo::run(&root(), args.iter().any(|a| a == "--check")),
        Some("bench") => {
            let what = args.get(1).map_or("all", String::as_str);
            let pg = args
                .iter()
                .position(|a| a == "--db")
                .and_then(|i| args.get(i + 1))
                .filter(|u| u.starts_with("postgres"));
            if let (Some(url), "store") = (pg, what) {
                bench_pg::store(&root(), url, quick)?;
            } else if matches!(what, "store" | "all" | "--quick") {
                bench::store(&root(), quick)?;
            }
            if matches!(what, "download" | "all" | "--quick") {
                bench::download(&root(), quick, false, 1)?;
            }
            if what == "small" {
                let rounds = args
                    .iter()
                    .position(|a| a == "--rounds")
                    .and_then(|i| args.get(i + 1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(3);
                bench::download(&root(), quick, true, rounds)?;
            }
            if matches!(what, "download" | "latency" | "all" | "--quick") {
                latency::bench(&root(), quick)?;
            }
            if matches!(what, "download" | "lopsided" | "all" | "--quick") {
                lopsided::bench(&root(), quick)?;
            }
            if matches!(what, "bytes" | "all" | "--quick") {
                ledger_bytes::bench(&root(), quick)?;
            }
            if what == "scale" {
                let jobs = args
                    .iter()
                    .position(|a| a == "--jobs")
                    .and_then(|i| args.get(i + 1))
                    .map(|n| n.parse::<u64>())
                    .transpose()?;
                scale::bench(&root(), quick, jobs)?;
            }
            Ok(())
        }
        _ => {
            eprintln!("usage: cargo xtask <tidy | api [--check] | release-check | slo-gen [--check] | slo-check | bench [store|download|small [--rounds N]|latency|lopsided|bytes|scale [--jobs N]|all] [--quick]>");
            std::process::exit(2);
        }
    }
}
