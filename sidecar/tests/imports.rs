//! Imports go one way: every module of `airlock` uses only modules below it in the
//! import order that `src/lib.rs` documents (its "Import order" section), so the data
//! flow reads bottom to top and no stage reaches back up into a driver, nor storage
//! into a stage.
//!
//! The check reads each file under `src/` as Rust tokens (comments, strings and doc
//! text are not paths; macro bodies are), takes every `crate::<module>` path and
//! every `super::` path that climbs out of its top-level module, and reports each one
//! whose target does not come before its source in [`ORDER`]. [`ORDER`] must match
//! the list in `lib.rs` and name every module `lib.rs` declares, so the documented
//! order, the modules and the check cannot drift apart. `main.rs` (the binary, above
//! every module) is not checked.

use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

/// The import order, lowest first: a module may use only the modules before it.
/// The same list, with the reasons, is the "Import order" section of `lib.rs`.
const ORDER: &[&str] = &[
    // vocabulary, pure
    "clock",
    "lifecycle",
    "log",
    "config",
    "metrics",
    // storage and trust
    "state",
    "seal",
    "verify",
    "queue",
    // the target
    "apply",
    // stages
    "decide",
    "review",
    "undo",
    "replay",
    "outcome",
    "intake",
    "webhook",
    // drivers
    "pipeline",
    "http",
    "probes",
    "daemon",
    "submit",
    "demo",
    "telemetry",
];

/// One use of another top-level module: `from`'s file `file` names `to` at `line`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Edge {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The check's core, pure: every edge whose target is not strictly before its
/// source in `order`, or that names a module `order` lacks, as a message naming the
/// file, the line and the problem. Edges within one module are not imports.
fn violations(edges: &[Edge], order: &[&str]) -> Vec<String> {
    let rank = |module: &str| order.iter().position(|m| *m == module);
    let mut found = Vec::new();
    for edge in edges.iter().filter(|e| e.from != e.to) {
        let at = format!("src/{}:{}", edge.file, edge.line);
        match (rank(&edge.from), rank(&edge.to)) {
            (Some(from), Some(to)) if to < from => {}
            (Some(_), Some(_)) => found.push(format!(
                "{at}: `{}` uses `crate::{}`, but `{}` comes after `{}` in the import order \
                 (lib.rs): a back edge",
                edge.from, edge.to, edge.to, edge.from
            )),
            (None, _) => found.push(format!(
                "{at}: module `{}` is not in the import order (lib.rs)",
                edge.from
            )),
            (_, None) => found.push(format!(
                "{at}: `{}` uses `crate::{}`, which is not in the import order (lib.rs)",
                edge.from, edge.to
            )),
        }
    }
    found
}

/// The top-level modules one file's tokens name. `file` is the path under `src/`;
/// its module and its depth below the crate root follow from it (`queue.rs` is
/// `crate::queue`, `decide/input.rs` is `crate::decide::input`), and inline
/// `mod name { … }` blocks go one deeper, so `super::` paths resolve as rustc does.
fn edges_of(file: &str, source: &str) -> Result<Vec<Edge>, String> {
    let tokens: TokenStream = source
        .parse()
        .map_err(|e| format!("src/{file} does not lex as Rust: {e:?}"))?;
    let stem = file.trim_end_matches(".rs");
    let parts: Vec<&str> = stem.split('/').collect();
    let from = parts[0].to_owned();
    let depth = if parts.last() == Some(&"mod") {
        parts.len() - 1
    } else {
        parts.len()
    };
    let mut edges = Vec::new();
    walk(tokens, depth, file, &from, &mut edges);
    Ok(edges)
}

/// Collects the edges in `tokens`, lying `depth` modules below the crate root.
fn walk(tokens: TokenStream, depth: usize, file: &str, from: &str, edges: &mut Vec<Edge>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            // `mod name { … }`: its body lies one module deeper.
            TokenTree::Ident(ident) if ident == "mod" => {
                if let (Some(TokenTree::Ident(_)), Some(TokenTree::Group(body))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                    && body.delimiter() == Delimiter::Brace
                {
                    walk(body.stream(), depth + 1, file, from, edges);
                    i += 3;
                    continue;
                }
            }
            TokenTree::Ident(ident) if ident == "crate" && is_path_sep(&tokens, i + 1) => {
                let line = ident.span().start().line;
                targets(&tokens, i + 3, line, file, from, edges);
            }
            // `super::super::…`: only a path that climbs to the crate root names a
            // top-level module (and only a path's first `super` starts a climb).
            TokenTree::Ident(ident) if ident == "super" => {
                let line = ident.span().start().line;
                let mut climbed = 0;
                let mut at = i;
                while matches!(&tokens.get(at), Some(TokenTree::Ident(s)) if s == "super")
                    && is_path_sep(&tokens, at + 1)
                {
                    climbed += 1;
                    at += 3;
                }
                if climbed >= depth && climbed > 0 {
                    targets(&tokens, at, line, file, from, edges);
                }
                i = at.max(i + 1);
                continue;
            }
            TokenTree::Group(group) => walk(group.stream(), depth, file, from, edges),
            _ => {}
        }
        i += 1;
    }
}

/// Whether `tokens[at..]` starts with `::`.
fn is_path_sep(tokens: &[TokenTree], at: usize) -> bool {
    matches!(
        (tokens.get(at), tokens.get(at + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
            if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
    )
}

/// The module(s) a path names at the crate root, `tokens[at]` being the first
/// segment after `crate::`: one identifier, or a `{a, b::c, …}` use group.
fn targets(
    tokens: &[TokenTree],
    at: usize,
    line: usize,
    file: &str,
    from: &str,
    edges: &mut Vec<Edge>,
) {
    let mut push = |to: String| {
        edges.push(Edge {
            file: file.to_owned(),
            line,
            from: from.to_owned(),
            to,
        })
    };
    match tokens.get(at) {
        Some(TokenTree::Ident(module)) => push(module.to_string()),
        Some(TokenTree::Group(group)) if group.delimiter() == Delimiter::Brace => {
            let inner: Vec<TokenTree> = group.stream().into_iter().collect();
            let mut start = true;
            for token in &inner {
                match token {
                    TokenTree::Ident(module) if start => {
                        // `self` in `crate::{self, …}` is the root, not a module.
                        if module != "self" {
                            push(module.to_string());
                        }
                        start = false;
                    }
                    TokenTree::Punct(p) if p.as_char() == ',' => start = true,
                    _ => start = false,
                }
            }
        }
        _ => {}
    }
}

/// Every `.rs` file under `dir`, as paths relative to `root`, sorted.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    out.sort();
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The edges of every module file under `src/` (not `lib.rs` or `main.rs`).
fn source_edges() -> Vec<Edge> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &root, &mut files);
    let mut edges = Vec::new();
    for file in files {
        let name = file.to_string_lossy().replace('\\', "/");
        if name == "lib.rs" || name == "main.rs" {
            continue;
        }
        let text =
            std::fs::read_to_string(root.join(&file)).unwrap_or_else(|e| panic!("src/{name}: {e}"));
        edges.extend(edges_of(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    edges
}

fn lib_rs() -> String {
    std::fs::read_to_string(src().join("lib.rs")).unwrap_or_else(|e| panic!("src/lib.rs: {e}"))
}

/// The modules the "Import order" section of `lib.rs` lists, in order: every
/// `` `name` `` on its numbered lines.
fn documented_order(lib: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut inside = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            break;
        };
        let doc = doc.trim();
        if doc.starts_with('#') {
            inside = doc == "# Import order";
            continue;
        }
        if !inside {
            continue;
        }
        // The list starts at its first item; its lines (and their continuations)
        // name the modules in order.
        if order.is_empty() && !doc.starts_with("1. ") {
            continue;
        }
        let text = doc;
        for (i, piece) in text.split('`').enumerate() {
            if i % 2 == 1
                && !piece.is_empty()
                && piece.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                order.push(piece.to_owned());
            }
        }
    }
    order
}

/// The modules `lib.rs` declares (`pub mod name;`), sorted.
fn declared_modules(lib: &str) -> Vec<String> {
    let mut modules: Vec<String> = lib
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod "))
        .filter_map(|rest| rest.strip_suffix(';'))
        .map(str::to_owned)
        .collect();
    modules.sort();
    modules
}

#[test]
fn imports_follow_the_documented_order() {
    let edges = source_edges();
    // The scan sees the imports that are known to exist, so an empty scan cannot
    // pass for a clean one.
    for (from, to) in [
        ("queue", "lifecycle"),
        ("pipeline", "decide"),
        ("decide", "apply"),
    ] {
        assert!(
            edges.iter().any(|e| e.from == from && e.to == to),
            "the scan missed {from} → {to}: {edges:?}"
        );
    }
    let found = violations(&edges, ORDER);
    assert!(
        found.is_empty(),
        "imports against the order:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_order_is_the_one_lib_rs_documents_and_names_every_module() {
    let lib = lib_rs();
    assert_eq!(
        documented_order(&lib),
        ORDER,
        "the \"Import order\" section of src/lib.rs and ORDER in tests/imports.rs differ"
    );
    let mut ordered: Vec<String> = ORDER.iter().map(|m| (*m).to_owned()).collect();
    ordered.sort();
    assert_eq!(
        declared_modules(&lib),
        ordered,
        "src/lib.rs declares modules the import order does not place, or the reverse"
    );
}

#[test]
fn the_check_fails_on_a_back_edge() {
    // The queue holding a `Decision` from the decide stage: the back edge this order
    // removed (the type moved down to `lifecycle`).
    let source = "//! A queue.\n\
                  use crate::lifecycle::State;\n\
                  use crate::decide::Decision;\n";
    let edges = edges_of("queue.rs", source).unwrap();
    let found = violations(&edges, ORDER);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0],
        "src/queue.rs:3: `queue` uses `crate::decide`, but `decide` comes after `queue` in \
         the import order (lib.rs): a back edge"
    );

    // The same file with the type where it belongs passes.
    let fixed = "use crate::lifecycle::{Decision, State};\n";
    assert_eq!(
        violations(&edges_of("queue.rs", fixed).unwrap(), ORDER),
        Vec::<String>::new()
    );

    // A cycle is two edges, one of them back: `outcome` → `queue` is fine, `queue`
    // → `outcome` is not.
    let cycle = [
        Edge {
            file: "outcome.rs".into(),
            line: 1,
            from: "outcome".into(),
            to: "queue".into(),
        },
        Edge {
            file: "queue.rs".into(),
            line: 9,
            from: "queue".into(),
            to: "outcome".into(),
        },
    ];
    let found = violations(&cycle, ORDER);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("src/queue.rs:9: `queue` uses `crate::outcome`"),
        "{found:?}"
    );

    // A module the order does not know is an error, either way round.
    let unknown = [Edge {
        file: "journal/mod.rs".into(),
        line: 2,
        from: "journal".into(),
        to: "seal".into(),
    }];
    assert_eq!(
        violations(&unknown, ORDER),
        ["src/journal/mod.rs:2: module `journal` is not in the import order (lib.rs)"]
    );
}

#[test]
fn paths_are_read_as_rustc_reads_them() {
    let source = r#"
//! Docs name crate::daemon, which is not an import.
use crate::{clock::now_ms, self, lifecycle};
use super::x;
fn f() {
    let s = "crate::pipeline"; // crate::http in a comment
    /* crate::demo in a block comment */
    tracing::info!(at = %crate::config::DEFAULT_MAX_REFUSED_BYTES);
    let _ = super::super::seal::digest(b"");
}
mod tests {
    use super::*;
    use super::super::super::queue::Queue;
}
"#;
    let edges = edges_of("decide/input.rs", source).unwrap();
    let seen: Vec<(usize, &str)> = edges.iter().map(|e| (e.line, e.to.as_str())).collect();
    assert_eq!(
        seen,
        [
            (3, "clock"),
            (3, "lifecycle"),
            (8, "config"),
            (9, "seal"),
            (13, "queue")
        ]
    );
    assert!(
        edges
            .iter()
            .all(|e| e.from == "decide" && e.file == "decide/input.rs")
    );

    // In a top-level module, one `super` already reaches the root; in its inline
    // test module, it does not.
    let edges = edges_of(
        "queue.rs",
        "use super::decide::Decision;\nmod tests { use super::*; }\n",
    )
    .unwrap();
    assert_eq!(edges.len(), 1, "{edges:?}");
    assert_eq!(edges[0].to, "decide");
}
