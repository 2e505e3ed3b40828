//! `cargo xtask api [--check]`: the public API of each published library
//! crate, one item per line with its signature, from rustdoc's JSON
//! (`RUSTC_BOOTSTRAP=1` on the stable toolchain), written to
//! `api/<crate>.txt`. `--check` compares instead and fails on any change,
//! so a change to the public API is always a reviewed change to a file.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The library crates a user may depend on.
pub(crate) const LIBRARIES: &[&str] = &[
    "idem-core",
    "idem-store-sqlite",
    "idem-store-postgres",
    "idem-store-conformance",
    "idem-http",
    "idem-worker",
    "idem-telemetry",
    "idem-origin",
];

pub(crate) fn run(root: &Path, check: bool) -> Result<()> {
    let mut changed = Vec::new();
    for krate in LIBRARIES {
        let listing = listing(root, krate)?;
        let file = root.join("api").join(format!("{krate}.txt"));
        if check {
            let old = std::fs::read_to_string(&file).unwrap_or_default();
            if old != listing {
                let old: BTreeSet<&str> = old.lines().collect();
                let new: BTreeSet<&str> = listing.lines().collect();
                for gone in old.difference(&new) {
                    eprintln!("{krate}: - {gone}");
                }
                for added in new.difference(&old) {
                    eprintln!("{krate}: + {added}");
                }
                changed.push(*krate);
            }
        } else {
            std::fs::create_dir_all(file.parent().expect("api/"))?;
            std::fs::write(&file, listing)?;
        }
    }
    if !changed.is_empty() {
        bail!(
            "the public API of {} changed; if that is meant, run `cargo xtask api` and commit api/",
            changed.join(", ")
        );
    }
    println!(
        "api: {}",
        if check {
            "unchanged"
        } else {
            "written to api/"
        }
    );
    Ok(())
}

/// One crate's public items, sorted, one per line.
fn listing(root: &Path, krate: &str) -> Result<String> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["rustdoc", "-q", "--locked", "--lib", "-p", krate, "--"])
        .args(["-Z", "unstable-options", "--output-format", "json"])
        .status()?;
    if !status.success() {
        bail!("rustdoc of {krate} failed");
    }
    let json = crate::bench::target_dir(root)?
        .join("doc")
        .join(format!("{}.json", krate.replace('-', "_")));
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )?;
    let index = &doc["index"];
    let paths = &doc["paths"];
    let mut lines = BTreeSet::new();
    let path_of = |id: &Value| -> Option<String> {
        let p = &paths[id.to_string().as_str()];
        (p["crate_id"] == 0).then(|| {
            p["path"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("::")
                })
                .unwrap_or_default()
        })
    };
    let Some(items) = index.as_object() else {
        bail!("{}: no index", json.display());
    };
    for item in items.values() {
        if item["crate_id"] != 0 {
            continue;
        }
        let inner = &item["inner"];
        if let Some(path) = path_of(&item["id"]) {
            let kind = &paths[item["id"].to_string().as_str()]["kind"];
            let kind = kind.as_str().unwrap_or("item");
            let detail = match kind {
                "function" => signature(&inner["function"]),
                "constant" => format!(": {}", ty(&inner["constant"]["type"])),
                "static" => format!(": {}", ty(&inner["static"]["type"])),
                "type_alias" => format!(" = {}", ty(&inner["type_alias"]["type"])),
                "variant" => variant(index, &inner["variant"]),
                _ => String::new(),
            };
            lines.insert(format!("{kind} {path}{detail}"));
            // A struct's public fields.
            if let Some(fields) = inner["struct"]["kind"]["plain"]["fields"].as_array() {
                for f in fields {
                    let f = &index[f.to_string().as_str()];
                    if f["visibility"] == "public" {
                        let name = f["name"].as_str().unwrap_or("?");
                        lines.insert(format!(
                            "field {path}::{name}: {}",
                            ty(&f["inner"]["struct_field"])
                        ));
                    }
                }
            }
            // A trait's items.
            if let Some(members) = inner["trait"]["items"].as_array() {
                for m in members {
                    let m = &index[m.to_string().as_str()];
                    let name = m["name"].as_str().unwrap_or("?");
                    let sig = m["inner"]
                        .get("function")
                        .map(signature)
                        .unwrap_or_default();
                    lines.insert(format!("trait-item {path}::{name}{sig}"));
                }
            }
        }
        // Inherent methods (trait impls are covered by the trait's listing).
        let imp = &inner["impl"];
        if imp.is_object() && imp["trait"].is_null() {
            let Some(owner) = imp["for"]["resolved_path"].get("id").and_then(&path_of) else {
                continue;
            };
            for m in imp["items"].as_array().into_iter().flatten() {
                let m = &index[m.to_string().as_str()];
                if m["visibility"] != "public" {
                    continue;
                }
                let name = m["name"].as_str().unwrap_or("?");
                let detail = match m["inner"].get("function") {
                    Some(f) => signature(f),
                    None => m["inner"]
                        .get("assoc_const")
                        .map(|c| format!(": {}", ty(&c["type"])))
                        .unwrap_or_default(),
                };
                lines.insert(format!("method {owner}::{name}{detail}"));
            }
        }
    }
    Ok(lines.into_iter().map(|l| l + "\n").collect())
}

fn variant(index: &Value, v: &Value) -> String {
    let kind = &v["kind"];
    if let Some(fields) = kind["tuple"].as_array() {
        let tys: Vec<String> = fields
            .iter()
            .map(|f| {
                f.as_i64().map_or("_".into(), |id| {
                    ty(&index[id.to_string().as_str()]["inner"]["struct_field"])
                })
            })
            .collect();
        return format!("({})", tys.join(", "));
    }
    if let Some(fields) = kind["struct"]["fields"].as_array() {
        let fs: Vec<String> = fields
            .iter()
            .map(|id| {
                let f = &index[id.to_string().as_str()];
                format!(
                    "{}: {}",
                    f["name"].as_str().unwrap_or("?"),
                    ty(&f["inner"]["struct_field"])
                )
            })
            .collect();
        return format!(" {{ {} }}", fs.join(", "));
    }
    String::new()
}

fn signature(f: &Value) -> String {
    let sig = &f["sig"];
    let inputs: Vec<String> = sig["inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}: {}", p[0].as_str().unwrap_or("_"), ty(&p[1])))
        .collect();
    let asyncness = if f["header"]["is_async"] == true {
        "async "
    } else {
        ""
    };
    let generics = generics(&f["generics"]);
    let out = if sig["output"].is_null() {
        String::new()
    } else {
        format!(" -> {}", ty(&sig["output"]))
    };
    format!("({asyncness}{generics}{}){out}", inputs.join(", "))
}

fn generics(g: &Value) -> String {
    let params: Vec<String> = g["params"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"]["type"]["is_synthetic"] != true)
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            let bounds = bounds(&p["kind"]["type"]["bounds"]);
            Some(if bounds.is_empty() {
                name.to_owned()
            } else {
                format!("{name}: {bounds}")
            })
        })
        .collect();
    if params.is_empty() {
        String::new()
    } else {
        format!("<{}> ", params.join(", "))
    }
}

fn bounds(b: &Value) -> String {
    b.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let t = &b["trait_bound"]["trait"];
            t.is_object().then(|| path_ty(t))
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

fn path_ty(p: &Value) -> String {
    let name = p["path"].as_str().unwrap_or("?").to_owned();
    let args = &p["args"]["angle_bracketed"];
    let mut parts: Vec<String> = args["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            a.get("type")
                .map(ty)
                .or_else(|| a.get("lifetime").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| "_".into())
        })
        .collect();
    parts.extend(
        args["constraints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let name = c["name"].as_str().unwrap_or("?");
                match c["binding"].get("equality").and_then(|e| e.get("type")) {
                    Some(t) => format!("{name} = {}", ty(t)),
                    None => format!("{name}: {}", bounds(&c["binding"]["constraint"])),
                }
            }),
    );
    if parts.is_empty() {
        name
    } else {
        format!("{name}<{}>", parts.join(", "))
    }
}

/// A type as rustdoc's JSON gives it, written out.
fn ty(t: &Value) -> String {
    if let Some(p) = t.get("resolved_path") {
        return path_ty(p);
    }
    if let Some(p) = t.get("primitive").and_then(Value::as_str) {
        return p.to_owned();
    }
    if let Some(g) = t.get("generic").and_then(Value::as_str) {
        return g.to_owned();
    }
    if let Some(r) = t.get("borrowed_ref") {
        let m = if r["is_mutable"] == true { "mut " } else { "" };
        let lt = r["lifetime"]
            .as_str()
            .map_or(String::new(), |l| format!("{l} "));
        return format!("&{lt}{m}{}", ty(&r["type"]));
    }
    if let Some(items) = t.get("tuple").and_then(Value::as_array) {
        return format!("({})", items.iter().map(ty).collect::<Vec<_>>().join(", "));
    }
    if let Some(s) = t.get("slice") {
        return format!("[{}]", ty(s));
    }
    if let Some(a) = t.get("array") {
        return format!("[{}; {}]", ty(&a["type"]), a["len"].as_str().unwrap_or("_"));
    }
    if let Some(b) = t.get("impl_trait") {
        return format!("impl {}", bounds(b));
    }
    if let Some(d) = t.get("dyn_trait") {
        let traits: Vec<String> = d["traits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| path_ty(&p["trait"]))
            .collect();
        return format!("dyn {}", traits.join(" + "));
    }
    if let Some(q) = t.get("qualified_path") {
        return format!(
            "<{} as {}>::{}",
            ty(&q["self_type"]),
            q["trait"]["path"].as_str().unwrap_or("?"),
            q["name"].as_str().unwrap_or("?")
        );
    }
    if let Some(p) = t.get("raw_pointer") {
        let m = if p["is_mutable"] == true {
            "mut"
        } else {
            "const"
        };
        return format!("*{m} {}", ty(&p["type"]));
    }
    if t.get("function_pointer").is_some() {
        return "fn(..)".into();
    }
    "_".into()
}
