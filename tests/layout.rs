//! The module layout `src/lib.rs` promises: dependencies between herald's modules point one way
//! (no module reaches, directly or through others, a module that reaches it back), and the data
//! plane neither names tokio nor reaches the control plane.
//!
//! A module is a top-level file or folder of `src/` (`bus/redis.rs` belongs to `bus`); a
//! dependency is any `crate::name` path in code, tests included (comments are not code).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The data plane: the shard threads and what they run.
const DATA_PLANE: &[&str] = &[
    "shard",
    "conn",
    "batch",
    "outbox",
    "registry",
    "mailbox",
    "protocol",
    "event",
    "ws",
    "query",
    "filter",
    "origin",
    "admission",
    "identity",
    "names",
    "distinct",
    "memory",
    "liveness",
    "uring",
];
/// The control plane, which the data plane must not import.
const CONTROL_PLANE: &[&str] = &[
    "hub", "bus", "replay", "resolver", "doorbell", "admin", "history", "gateway",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for the crate roots).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// Every `crate::name` a file's code refers to, and whether it names tokio.
fn references(text: &str) -> (BTreeSet<String>, bool) {
    let mut deps = BTreeSet::new();
    let mut tokio = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        tokio |= code.contains("tokio::") || code.contains("tokio;");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                deps.insert(name);
            }
        }
    }
    (deps, tokio)
}

fn graph() -> (BTreeMap<String, BTreeSet<String>>, BTreeSet<String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut with_tokio = BTreeSet::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let (deps, tokio) = references(&text);
        if tokio {
            with_tokio.insert(module.clone());
        }
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    (graph, with_tokio)
}

/// A path from `from` back to itself, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("paths are never empty");
        for next in graph.get(last).into_iter().flatten() {
            if next == from {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn module_dependencies_form_no_cycle() {
    let (graph, _) = graph();
    assert!(graph.contains_key("shard") && graph.contains_key("conn"));
    for module in graph.keys() {
        if let Some(cycle) = cycle_through(&graph, module) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_data_plane_imports_no_control_plane_module_and_no_tokio() {
    let (graph, with_tokio) = graph();
    for module in DATA_PLANE {
        let deps = graph
            .get(*module)
            .unwrap_or_else(|| panic!("no module {module}"));
        for dep in deps {
            assert!(
                !CONTROL_PLANE.contains(&dep.as_str()),
                "the data plane module {module} imports the control plane module {dep}"
            );
        }
        assert!(!with_tokio.contains(*module), "{module} uses tokio");
    }
}

#[test]
fn the_checks_see_cycles_and_crate_paths() {
    let (deps, tokio) =
        references("use crate::a::B; // crate::b\nlet x = crate::c::f(); tokio::spawn");
    assert_eq!(deps, BTreeSet::from(["a".to_owned(), "c".to_owned()]));
    assert!(tokio);
    let graph = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(
        cycle_through(&graph, "a"),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
