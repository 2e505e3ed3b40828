//! Tidy: architectural rules checked by `cargo test` (and `cargo xtask tidy`).
//!
//! The core's purity is the project's load-bearing promise, so it is checked
//! by machine: its normal dependency closure must hold no runtime, network,
//! database or metrics crate and no other idem crate, and its source must not
//! read the clock, touch the filesystem or network, or sleep.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that would mean I/O, a runtime or metrics in the core.
const FORBIDDEN_CORE_DEPS: &[&str] = &[
    "tokio",
    "reqwest",
    "hyper",
    "rusqlite",
    "libsqlite3-sys",
    "tokio-postgres",
    "postgres",
    "sqlx",
    "metrics",
    "mio",
];

/// Source patterns that would mean the core reads the clock or does I/O.
const FORBIDDEN_CORE_SOURCE: &[&str] = &[
    "SystemTime::now",
    "Instant::now",
    "std::fs",
    "std::net",
    "thread::sleep",
    "std::process",
    "std::io::stdin",
];

pub(crate) fn run() -> Result<()> {
    let root = workspace_root();
    let mut problems = core_dependency_problems(&root)?;
    problems.extend(core_source_problems(&root)?);
    problems.extend(module_doc_problems(&root)?);
    problems.extend(library_print_problems(&root)?);
    problems.extend(library_closure_problems(&root)?);
    if problems.is_empty() {
        eprintln!("tidy: ok");
        Ok(())
    } else {
        bail!("tidy found problems:\n  {}", problems.join("\n  "))
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// The package names in `idem-core`'s normal (non-dev, non-build) closure.
fn core_closure(root: &Path) -> Result<Vec<String>> {
    closure_of(root, &["idem-core"])
}

/// What a library user's build of the core, the SQLite store and the
/// engine must not pull in: the CLI's argument parser, the Prometheus
/// exporter, the test origin.
const CLI_ONLY_DEPS: &[&str] = &[
    "clap",
    "metrics-exporter-prometheus",
    "idem-origin",
    "idem-cli",
];

fn library_closure_problems(root: &Path) -> Result<Vec<String>> {
    let closure = closure_of(root, &["idem-core", "idem-store-sqlite", "idem-worker"])?;
    Ok(closure
        .iter()
        .filter(|name| CLI_ONLY_DEPS.contains(&name.as_str()))
        .map(|name| {
            format!("a build of idem-core + idem-store-sqlite + idem-worker pulls in `{name}`")
        })
        .collect())
}

/// The package names in the normal (non-dev, non-build) closure of
/// `packages`.
fn closure_of(root: &Path, packages: &[&str]) -> Result<Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args: Vec<&str> = vec!["tree"];
    for p in packages {
        args.extend(["--package", p]);
    }
    let out = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .args(["--edges", "normal", "--prefix", "none", "--format", "{p}"])
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn core_dependency_problems(root: &Path) -> Result<Vec<String>> {
    let closure = core_closure(root)?;
    Ok(dependency_problems(&closure))
}

fn dependency_problems(closure: &[String]) -> Vec<String> {
    closure
        .iter()
        .filter(|name| {
            FORBIDDEN_CORE_DEPS.contains(&name.as_str())
                || (name.starts_with("idem-") && name.as_str() != "idem-core")
        })
        .map(|name| {
            format!("idem-core depends on `{name}` (no I/O, runtime or adapter crates allowed)")
        })
        .collect()
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "target" || n == ".git") {
                    continue;
                }
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn core_source_problems(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for file in rust_files(&root.join("crates/idem-core/src"))? {
        let text = std::fs::read_to_string(&file)?;
        problems.extend(source_problems(&file.display().to_string(), &text));
    }
    Ok(problems)
}

fn source_problems(name: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for pat in FORBIDDEN_CORE_SOURCE {
            if code.contains(pat) {
                problems.push(format!("{name}:{}: idem-core must not use `{pat}`", i + 1));
            }
        }
    }
    problems
}

/// Every Rust file in the workspace opens with a `//!` line saying what and why.
fn module_doc_problems(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        let d = root.join(dir);
        if !d.exists() {
            continue;
        }
        for file in rust_files(&d)? {
            let text = std::fs::read_to_string(&file)?;
            if !text.trim_start().starts_with("//!") {
                problems.push(format!(
                    "{}: does not open with a `//!` module doc",
                    file.display()
                ));
            }
        }
    }
    Ok(problems)
}

/// Libraries log through `tracing`, never straight to the terminal: only
/// the CLI (and xtask) print. Test modules may.
fn library_print_problems(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for krate in std::fs::read_dir(root.join("crates"))? {
        let dir = krate?.path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "idem-cli" || !dir.join("src").exists() {
            continue;
        }
        for file in rust_files(&dir.join("src"))? {
            if file.components().any(|c| c.as_os_str() == "tests") {
                continue;
            }
            let text = std::fs::read_to_string(&file)?;
            // Code after a `#[cfg(test)]` module is test code.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            // Comments (doc examples included) may show a print.
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for pat in ["eprintln!", "println!", "print!(", "eprint!("] {
                if code.contains(pat) {
                    problems.push(format!(
                        "{}: `{pat}` in a library (log through `tracing`)",
                        file.display()
                    ));
                }
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy() {
        run().unwrap();
    }

    #[test]
    fn dependency_rule_catches_forbidden_crates() {
        let closure = vec![
            "idem-core".to_owned(),
            "serde".to_owned(),
            "tokio".to_owned(),
            "idem-http".to_owned(),
        ];
        let p = dependency_problems(&closure);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("tokio"));
        assert!(p[1].contains("idem-http"));
    }

    #[test]
    fn source_rule_catches_clock_and_io() {
        let text = "//! x\nfn f() { let _ = std::time::SystemTime::now(); }\n// Instant::now in a comment is fine\nuse std::fs::File;\n";
        let p = source_problems("x.rs", text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("x.rs:2"));
        assert!(p[1].contains("std::fs"));
    }
}
