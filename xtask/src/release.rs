//! `cargo xtask release-check`: what must hold before a release, in the
//! order a failure is cheapest to see: every published crate packages, the
//! public API is the one recorded in `api/`, the docs build without
//! warnings, the examples run, the stated minimum Rust version builds the
//! workspace, and the release scenario meets every SLO.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

fn cargo(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(root).args(args);
    c
}

fn step(what: &str, mut c: Command) -> Result<()> {
    println!("== release-check: {what}");
    let status = c.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("release-check: {what} failed");
    }
    Ok(())
}

pub(crate) fn run(root: &Path) -> Result<()> {
    step(
        "cargo package (every crate but xtask)",
        cargo(
            root,
            &[
                "package",
                "--workspace",
                "--exclude",
                "xtask",
                "--no-verify",
                "--locked",
            ],
        ),
    )?;
    println!("== release-check: public API");
    crate::api::run(root, true)?;
    // The libraries: the binaries' doc comments are their `--help`.
    let mut doc = cargo(
        root,
        &[
            "doc",
            "--workspace",
            "--exclude",
            "idem-cli",
            "--exclude",
            "xtask",
            "--no-deps",
            "--locked",
        ],
    );
    doc.env("RUSTDOCFLAGS", "-D warnings");
    step("docs", doc)?;
    for (krate, example) in [
        ("idem-core", "state_machine"),
        ("idem-worker", "fetch_three"),
        ("idem-worker", "local_http"),
    ] {
        step(
            &format!("example {krate}/{example}"),
            cargo(
                root,
                &["run", "-q", "--locked", "-p", krate, "--example", example],
            ),
        )?;
    }
    let msrv = msrv(root)?;
    if has_toolchain(&msrv) || install_toolchain(&msrv) {
        // Through rustup, so the toolchain's own cargo and rustc build it.
        let mut check = Command::new("rustup");
        check.current_dir(root).args([
            "run",
            &msrv,
            "cargo",
            "check",
            "--workspace",
            "--all-targets",
            "--locked",
        ]);
        // The variables the outer cargo set would point this one at the
        // current toolchain's tools.
        check
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("CARGO");
        step(
            &format!("the minimum Rust version ({msrv}) builds the workspace"),
            check,
        )?;
    } else {
        // Without that toolchain: clippy's incompatible_msrv lint (run with
        // -D warnings in CI) refuses std APIs newer than rust-version, and
        // no dependency may ask for a newer Rust than ours.
        println!("== release-check: Rust {msrv} cannot be installed here; checking dependencies' rust-version instead");
        dependencies_fit(root, &msrv)?;
    }
    println!("== release-check: the release scenario's SLOs");
    crate::slo::release_check(root)?;
    println!("release-check: ok");
    Ok(())
}

/// The workspace's `rust-version`.
fn msrv(root: &Path) -> Result<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml"))?;
    text.lines()
        .find_map(|l| {
            let v = l
                .trim()
                .strip_prefix("rust-version")?
                .trim()
                .strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .context("Cargo.toml states no rust-version")
}

fn has_toolchain(version: &str) -> bool {
    Command::new("rustup")
        .args(["run", version, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn install_toolchain(version: &str) -> bool {
    println!("== release-check: install Rust {version}");
    Command::new("rustup")
        .args(["toolchain", "install", version, "--profile", "minimal"])
        .status()
        .is_ok_and(|s| s.success())
}

/// `1.89` or `1.89.0` as (major, minor, patch).
fn version_of(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.trim().split('.').map(|p| p.parse::<u64>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// Every package in the build states a rust-version no newer than ours
/// (or none).
fn dependencies_fit(root: &Path, msrv: &str) -> Result<()> {
    let out = cargo(root, &["metadata", "--format-version", "1", "--locked"]).output()?;
    if !out.status.success() {
        bail!("cargo metadata failed");
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ours = version_of(msrv).context("rust-version is not a version")?;
    let mut newer = Vec::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        if let Some(v) = p["rust_version"].as_str() {
            if version_of(v).is_some_and(|v| v > ours) {
                newer.push(format!(
                    "{} {} needs Rust {v}",
                    p["name"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    if !newer.is_empty() {
        bail!(
            "dependencies need a newer Rust than {msrv}: {}",
            newer.join("; ")
        );
    }
    Ok(())
}
