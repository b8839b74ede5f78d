//! The crate's structure, checked: three programs (wings) over one shared base, imports that
//! only point down, and no cycle between the top-level modules.
//!
//! Every `crate::module` path outside comments counts as an import of `module` (doc links
//! are comments and do not). The wings are `harness` (`pagehint-migrate`), `qemu`
//! (`compare-qemu`, which reads the harness's results) and the `pagehint-uffd` crate
//! (`migrate/uffd`, whose `pagehint_migrate::module` paths are imports of the base); the base
//! is every other module, and `sys` (the system wrappers) imports nothing of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules each `.rs` file under `src` names with `prefix` (`crate::`), by top-level
/// module (`wing`: every file counts as that one module instead).
fn imports_in(
    src: &Path,
    prefix: &str,
    wing: Option<&str>,
    out: &mut BTreeMap<String, BTreeSet<String>>,
) {
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel.iter().next().unwrap().to_string_lossy();
            let module = match wing {
                Some(w) => w.to_string(),
                None => first.trim_end_matches(".rs").to_string(),
            };
            if wing.is_none() && ["main", "lib", "bin"].contains(&module.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let named = out.entry(module.clone()).or_default();
            for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
                for (i, _) in line.match_indices(prefix) {
                    let rest = &line[i + prefix.len()..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    let target = &rest[..end];
                    if !target.is_empty() && target != module {
                        named.insert(target.to_string());
                    }
                }
            }
        }
    }
}

/// Top-level module (and the `pagehint-uffd` crate, as `restore`) → the top-level modules
/// of this crate it names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = BTreeMap::new();
    imports_in(&dir.join("src"), "crate::", None, &mut out);
    imports_in(
        &dir.join("uffd/src"),
        "pagehint_migrate::",
        Some("restore"),
        &mut out,
    );
    out
}

const WINGS: &[&str] = &["harness", "qemu", "restore"];

/// Whether `from` may import `to`.
fn allowed(from: &str, to: &str) -> bool {
    match (from, to) {
        ("sys", _) => false,
        // compare-qemu runs the harness's migrations and reads their results.
        ("qemu", "harness") => true,
        (_, to) if WINGS.contains(&to) => false,
        _ => true,
    }
}

/// A cycle through `node`, if one is reachable from it.
fn cycle(
    g: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|n| n == node) {
        return Some(path[i..].to_vec());
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in g.get(node).into_iter().flatten() {
        if let Some(c) = cycle(g, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn imports_point_down_and_never_across_or_around() {
    let g = imports();
    for wing in WINGS
        .iter()
        .chain(&["sys", "wire", "dest", "source", "guest"])
    {
        assert!(g.contains_key(*wing), "module {wing} not found: {g:?}");
    }
    let up: Vec<String> = g
        .iter()
        .flat_map(|(from, to)| to.iter().map(move |t| (from, t)))
        .filter(|(from, to)| !allowed(from, to))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(up.is_empty(), "imports against the structure: {up:?}");
    let mut done = BTreeSet::new();
    for node in g.keys() {
        let c = cycle(&g, node, &mut Vec::new(), &mut done);
        assert!(c.is_none(), "a cycle of imports: {c:?}");
    }
}

/// The checker itself catches what it is there for (a mutant): an import up, and a cycle.
#[test]
fn the_checker_catches_an_arrow_up_and_a_cycle() {
    assert!(!allowed("dest", "harness"));
    assert!(!allowed("restore", "harness"));
    assert!(!allowed("sys", "guest"));
    assert!(!allowed("harness", "qemu"));
    assert!(allowed("qemu", "harness") && allowed("harness", "dest"));
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycle(&g, "a", &mut Vec::new(), &mut BTreeSet::new()),
        Some(vec!["a".to_string(), "b".to_string()])
    );
}
