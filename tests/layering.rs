//! The crate's layers, checked from its sources (no root, no build of the crate needed): who may
//! name whom in a `crate::…` path.
//!
//! - a command never names another command (what two share lives in `commands/mod.rs` or in a
//!   library module);
//! - `kernel/` names neither `modes/` nor `commands/`;
//! - `state/` and `types` name neither `request/` nor `modes/`;
//! - `modes/` and `lb/` never name `commands/`.

use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The module path of a file under `src/` (`commands/hook.rs` → `["commands", "hook"]`).
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "main") {
        parts.pop();
    }
    parts
}

/// The paths a source names after `crate::`, as segments; a `crate::{a::b, c}` group gives one
/// path per member. Comments are skipped.
fn crate_paths(src: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for member in group[..end].split(',') {
                    let segs = segments(member.trim());
                    if !segs.is_empty() {
                        out.push(segs);
                    }
                }
            } else {
                let segs = segments(rest);
                if !segs.is_empty() {
                    out.push(segs);
                }
            }
        }
    }
    out
}

fn segments(s: &str) -> Vec<String> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s[..end]
        .split("::")
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// Why `from` may not name `to`, if it may not. `commands` lists the command modules (the files
/// of `commands/` other than `mod.rs`).
fn violation(from: &[String], to: &[String], commands: &[String]) -> Option<String> {
    let top = |p: &[String]| p.first().cloned().unwrap_or_default();
    let (f, t) = (top(from), top(to));
    let why = match (f.as_str(), t.as_str()) {
        ("commands", "commands") => {
            // `commands/mod.rs` itself declares the commands.
            let own = from.get(1)?;
            match to.get(1) {
                Some(y) if commands.contains(y) && own != y => "a command names another command",
                _ => return None,
            }
        }
        ("kernel", "modes" | "commands") => "kernel/ names a layer above it",
        ("state" | "types", "request" | "modes") => "the vocabulary names a layer above it",
        ("modes" | "lb", "commands") => "a library module names a command",
        _ => return None,
    };
    Some(format!(
        "{} names crate::{}: {why}",
        from.join("/"),
        to.join("::")
    ))
}

/// Every violation in `src` of the file whose module is `from`.
fn check(from: &[String], src: &str, commands: &[String]) -> Vec<String> {
    crate_paths(src)
        .iter()
        .filter_map(|to| violation(from, to, commands))
        .collect()
}

#[test]
fn the_layers_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let commands: Vec<String> = sources(&root.join("commands"))
        .iter()
        .map(|p| module_of(p.strip_prefix(root.join("commands")).unwrap()))
        .filter_map(|m| m.first().cloned())
        .collect();
    assert!(
        commands.contains(&"hook".to_string()) && commands.contains(&"gc".to_string()),
        "{commands:?}"
    );
    let files = sources(&root);
    assert!(files.len() > 40, "found {} sources", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let from = module_of(f.strip_prefix(&root).unwrap());
        let src = fs::read_to_string(f).expect("read source");
        bad.extend(check(&from, &src, &commands));
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

fn m(s: &str) -> Vec<String> {
    s.split('/').map(str::to_string).collect()
}

#[test]
fn a_planted_violation_is_found() {
    let commands = vec!["hook".to_string(), "ports".to_string(), "gc".to_string()];
    let cases = [
        (
            "commands/registrar",
            "use crate::commands::ports::{host_address, instance_id};",
        ),
        (
            "commands/gc",
            "    let r = crate::commands::hook::teardown(g, id);",
        ),
        ("commands/gc", "use crate::{commands::hook, state::State};"),
        ("kernel/host", "use crate::modes::bridge::VETH_PREFIX;"),
        ("kernel/nft/fake", "use crate::commands::Globals;"),
        ("state/record", "use crate::modes::awsvpc::pin_path;"),
        ("types", "use crate::request::EniSpec;"),
        ("modes/awsvpc/shared", "use crate::commands::hook;"),
        ("lb/export", "use crate::commands::ports::PortEntry;"),
    ];
    for (from, src) in cases {
        let found = check(&m(from), src, &commands);
        assert_eq!(found.len(), 1, "{from}: {src}: {found:?}");
    }
}

#[test]
fn what_is_allowed_passes() {
    let commands = vec!["hook".to_string(), "ports".to_string()];
    let cases = [
        // The shared part of commands, and a command's own module.
        ("commands/hook", "use crate::commands::{Exit, Globals};"),
        ("commands/hook", "use crate::commands::hook::Stage;"),
        (
            "commands",
            "pub mod hook; use crate::commands::ports::Format;",
        ),
        // Downward names.
        ("commands/hook", "use crate::modes::{self, SetupCtx};"),
        ("modes/bridge", "use crate::kernel::{At, Kernel};"),
        ("state/record", "use crate::names::{pin_path, is_our_name};"),
        ("kernel/fake", "use crate::types::MacAddr;"),
        // Comments are not code.
        (
            "kernel/mod",
            "//! The modes reach it through [`crate::modes::apply`].",
        ),
        ("kernel/mod", "let x = 1; // see crate::commands::hook"),
    ];
    for (from, src) in cases {
        let found = check(&m(from), src, &commands);
        assert!(found.is_empty(), "{from}: {src}: {found:?}");
    }
}
