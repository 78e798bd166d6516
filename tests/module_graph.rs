//! The layout rule of docs/architecture.md: every `use` points down. For each pair of sibling
//! modules in `src/` (two top-level modules, or two submodules of one module), one may use the
//! other, never both ways, directly or around a longer loop. Paths are read from the source text
//! (`crate::a::b`, `super::b`), test code left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `[a, b]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Module {
    let relative = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Module = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The paths after `prefix` (`crate::` or `super::`) in `text`, as segments.
fn paths_after(text: &str, prefix: &str) -> Vec<Module> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let segments: Module = rest[..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !segments.is_empty() {
            found.push(segments);
        }
    }
    found
}

/// Edges between sibling modules: `a → b` where `a` uses something inside `b`.
fn sibling_edges(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let files: Vec<_> = files
        .into_iter()
        .filter(|f| f != &src.join("main.rs") && !f.starts_with(src.join("bin")))
        .collect();
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for file in &files {
        let from = module_of(src, file);
        let text = std::fs::read_to_string(file).expect("read file");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        // `super::` of src/a/b.rs and of src/a/b/mod.rs (both module `[a, b]`) is `a`.
        let parent: Module = from[..from.len().saturating_sub(1)].to_vec();
        let mut targets = paths_after(code, "crate::");
        targets.extend(paths_after(code, "super::").into_iter().map(|p| {
            let mut full = parent.clone();
            full.extend(p);
            full
        }));
        for mut to in targets {
            while !to.is_empty() && !modules.contains(&to) {
                to.pop();
            }
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common >= from.len() || common >= to.len() {
                continue; // a module using its own parent or child
            }
            edges
                .entry(from[..=common].to_vec())
                .or_default()
                .insert(to[..=common].to_vec());
        }
    }
    edges
}

/// A loop in `edges`, if any, as the modules around it.
fn find_loop(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|m| m == node).unwrap_or(0);
                return Some(stack[start..].to_vec());
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Open);
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, marks, stack) {
                return Some(found);
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut marks, &mut Vec::new()))
}

#[test]
fn every_use_between_sibling_modules_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = sibling_edges(&src);
    let top: Vec<String> = edges
        .iter()
        .filter(|(from, _)| from.len() == 1)
        .map(|(from, to)| {
            let to: Vec<&str> = to.iter().map(|m| m[0].as_str()).collect();
            format!("{:<10} → {}", from[0], to.join(", "))
        })
        .collect();
    println!("top-level modules:\n{}", top.join("\n"));
    assert!(
        edges.values().map(BTreeSet::len).sum::<usize>() > 50,
        "too few uses found: the reader is broken"
    );
    if let Some(found) = find_loop(&edges) {
        let names: Vec<String> = found.iter().map(|m| m.join("::")).collect();
        panic!(
            "modules use each other in a loop: {} → (back to the first)",
            names.join(" → ")
        );
    }
}

#[test]
fn the_loop_finder_finds_a_loop() {
    let module = |s: &str| vec![s.to_owned()];
    let mut edges = BTreeMap::new();
    edges.insert(module("a"), BTreeSet::from([module("b")]));
    edges.insert(module("b"), BTreeSet::from([module("c")]));
    assert_eq!(find_loop(&edges), None);
    edges.insert(module("c"), BTreeSet::from([module("a")]));
    assert_eq!(find_loop(&edges).map(|l| l.len()), Some(3));
}
