//! Repository hygiene: what the project's own documents say about the code is checked
//! against the code, so they cannot drift apart unnoticed.
//!
//! - `ARCHITECTURE.md`'s module table lists every module of the `airlock` crate and
//!   nothing else: each module `sidecar/src/lib.rs` declares and, below them, every
//!   module with a file of its own (`apply::postgres`, `http::api`, ...). Modules are
//!   read with `syn`, so comments, attributes, `#[path]` and `#[cfg(test)]` modules
//!   are handled as the compiler handles them; a module that exists only under
//!   `#[cfg(test)]` needs no row, one under a feature flag does.
//! - Nothing in the repository points outside it: no file names the workplace's
//!   absolute paths or the design file that used to live beside the repository
//!   (the design is `docs/design.md`), and every relative link of every Markdown
//!   file resolves to a file or folder inside the repository.
//!
//! The files checked are the repository's own (`git ls-files`: committed or added),
//! so build output, installed packages and files other tests leave behind while
//! this one runs never count.
//! Each check also runs on small made-up inputs, which shows it failing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// The workspace root (the folder holding `ARCHITECTURE.md`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the sidecar crate lives inside the workspace")
        .to_path_buf()
}

// --- the crate's modules ----------------------------------------------------------

/// Every module of the crate whose root file is `lib`, as paths (`apply::postgres`),
/// with the file that defines it. Inline modules (`mod web { ... }`) are part of
/// their file's module and have no entry, but file modules declared inside them do.
fn crate_modules(lib: &Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut found = BTreeMap::new();
    let dir = lib
        .parent()
        .ok_or_else(|| format!("{}: no parent folder", lib.display()))?;
    file_modules(lib, dir, "", &mut found)?;
    Ok(found)
}

/// Reads the file modules that `file` declares, whose own files live in `dir`.
fn file_modules(
    file: &Path,
    dir: &Path,
    prefix: &str,
    found: &mut BTreeMap<String, PathBuf>,
) -> Result<(), String> {
    let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let parsed = syn::parse_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    items_modules(&parsed.items, file, dir, prefix, found)
}

fn items_modules(
    items: &[syn::Item],
    file: &Path,
    dir: &Path,
    prefix: &str,
    found: &mut BTreeMap<String, PathBuf>,
) -> Result<(), String> {
    for item in items {
        let syn::Item::Mod(module) = item else {
            continue;
        };
        if is_cfg_test(&module.attrs) {
            continue;
        }
        let name = module.ident.to_string();
        let name = name.strip_prefix("r#").unwrap_or(&name).to_owned();
        let path = format!("{prefix}{name}");
        let explicit = path_attribute(&module.attrs);
        match &module.content {
            // `mod name { ... }`: its own file modules live in `dir/name/`.
            Some((_, inner)) => {
                let inner_dir = match &explicit {
                    Some(p) => dir.join(p),
                    None => dir.join(&name),
                };
                items_modules(inner, file, &inner_dir, &format!("{path}::"), found)?;
            }
            // `mod name;`: its file is `dir/name.rs` or `dir/name/mod.rs`.
            None => {
                let (module_file, child_dir) = match &explicit {
                    Some(p) => {
                        let module_file = dir.join(p);
                        let child_dir = module_file
                            .parent()
                            .map(Path::to_path_buf)
                            .unwrap_or_else(|| dir.to_path_buf());
                        (module_file, child_dir)
                    }
                    None => {
                        let flat = dir.join(format!("{name}.rs"));
                        let nested = dir.join(&name).join("mod.rs");
                        if flat.is_file() {
                            (flat, dir.join(&name))
                        } else if nested.is_file() {
                            (nested, dir.join(&name))
                        } else {
                            return Err(format!(
                                "{}: module `{path}` has no file ({} or {})",
                                file.display(),
                                flat.display(),
                                nested.display()
                            ));
                        }
                    }
                };
                found.insert(path.clone(), module_file.clone());
                file_modules(&module_file, &child_dir, &format!("{path}::"), found)?;
            }
        }
    }
    Ok(())
}

/// Whether the attributes hold `#[cfg(test)]` (the module exists only in unit tests).
fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .parse_args::<syn::Ident>()
                .is_ok_and(|ident| ident == "test")
    })
}

/// The value of a `#[path = "..."]` attribute.
fn path_attribute(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|attr| match &attr.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

// --- ARCHITECTURE.md's module table -----------------------------------------------

/// The heading of the section whose tables list the modules.
const MODULES_HEADING: &str = "Modules of `airlock`";

/// The modules named in the first column of every table row of the section headed
/// [`MODULES_HEADING`], each with its line number. Header and separator rows are
/// skipped; any other row whose first cell is not one module path in backticks is
/// an error, as is a module named twice.
fn table_modules(markdown: &str) -> Result<BTreeMap<String, usize>, String> {
    let lines: Vec<&str> = markdown.lines().collect();
    let start = lines
        .iter()
        .position(|line| is_heading(line) && line.contains(MODULES_HEADING))
        .ok_or_else(|| format!("no heading containing {MODULES_HEADING:?}"))?;
    let level = heading_level(lines[start]);
    let mut rows = BTreeMap::new();
    let mut errors = Vec::new();
    let mut fenced = false;
    for (index, line) in lines.iter().enumerate().skip(start + 1) {
        let number = index + 1;
        let trimmed = line.trim();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if is_heading(line) && heading_level(line) <= level {
            break;
        }
        if !trimmed.starts_with('|') {
            continue;
        }
        let first = first_cell(trimmed);
        if is_separator_row(trimmed) {
            continue;
        }
        // A header row is the row right above a separator row.
        if lines
            .get(index + 1)
            .is_some_and(|next| next.trim().starts_with('|') && is_separator_row(next.trim()))
        {
            continue;
        }
        match module_path(first) {
            Some(path) => {
                if let Some(earlier) = rows.insert(path.clone(), number) {
                    errors.push(format!(
                        "line {number}: `{path}` already has a row (line {earlier})"
                    ));
                }
            }
            None => errors.push(format!(
                "line {number}: the first cell {first:?} is not one module path in backticks \
                 (like `apply::postgres`)"
            )),
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors.join("\n"))
    }
}

fn is_heading(line: &str) -> bool {
    let hashes = heading_level(line);
    (1..=6).contains(&hashes) && line[hashes..].starts_with(' ')
}

fn heading_level(line: &str) -> usize {
    line.chars().take_while(|&c| c == '#').count()
}

/// The first cell of a table row, trimmed (a `\|` inside it does not end it).
fn first_cell(row: &str) -> &str {
    let body = row.strip_prefix('|').unwrap_or(row);
    let bytes = body.as_bytes();
    let mut end = body.len();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'|' && (i == 0 || bytes[i - 1] != b'\\') {
            end = i;
            break;
        }
    }
    body[..end].trim()
}

fn is_separator_row(row: &str) -> bool {
    let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
    !cells.is_empty()
        && cells.iter().all(|cell| {
            cell.contains('-') && cell.chars().all(|c| c == '-' || c == ':' || c == ' ')
        })
}

/// `` `apply::postgres` `` → `apply::postgres`; anything else → `None`.
fn module_path(cell: &str) -> Option<String> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    let valid = !inner.is_empty()
        && inner.split("::").all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    valid.then(|| inner.to_owned())
}

/// Compares the table with the crate: the rows missing and the rows naming no module.
fn compare_modules(
    modules: &BTreeMap<String, PathBuf>,
    rows: &BTreeMap<String, usize>,
) -> Result<(), String> {
    let missing: Vec<String> = modules
        .iter()
        .filter(|(path, _)| !rows.contains_key(*path))
        .map(|(path, file)| format!("  `{path}` ({})", file.display()))
        .collect();
    let stale: Vec<String> = rows
        .iter()
        .filter(|(path, _)| !modules.contains_key(*path))
        .map(|(path, line)| format!("  `{path}` (line {line})"))
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "modules with no row in the table (add a row: module, job, what it knows):\n{}",
            missing.join("\n")
        ));
    }
    if !stale.is_empty() {
        problems.push(format!(
            "rows naming no module of the crate (remove or rename them):\n{}",
            stale.join("\n")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn architecture_lists_every_module_of_the_crate() {
    let root = root();
    let modules: BTreeMap<String, PathBuf> = crate_modules(&root.join("sidecar/src/lib.rs"))
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|(path, file)| {
            let file = file
                .strip_prefix(&root)
                .map(Path::to_path_buf)
                .unwrap_or(file);
            (path, file)
        })
        .collect();
    // The walk found the crate, not nothing.
    for expected in ["apply", "apply::postgres", "http::api", "undo", "pipeline"] {
        assert!(
            modules.contains_key(expected),
            "the module walk missed `{expected}`: {modules:?}"
        );
    }
    let markdown = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let rows = table_modules(&markdown).unwrap_or_else(|e| panic!("ARCHITECTURE.md: {e}"));
    if let Err(problems) = compare_modules(&modules, &rows) {
        panic!("ARCHITECTURE.md's module table and sidecar/src disagree:\n{problems}");
    }
}

#[test]
fn the_module_check_fails_on_a_missing_or_stale_row() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::create_dir_all(src.join("net")).unwrap();
    fs::create_dir_all(src.join("pure")).unwrap();
    fs::write(
        src.join("lib.rs"),
        r#"//! Doc with `mod fake;` in it.
// mod commented_out;
/* mod also_commented; */
pub mod net;
#[cfg(feature = "extra")]
pub(crate) mod flagged;
#[cfg(test)]
mod unit_tests;
#[path = "pure/odd_name.rs"]
mod renamed;
mod inline {
    pub fn f() -> &'static str { "mod not_a_module;" }
}
"#,
    )
    .unwrap();
    fs::write(
        src.join("net/mod.rs"),
        "pub mod wire;\n#[cfg(test)]\nmod tests {}\n",
    )
    .unwrap();
    fs::write(src.join("net/wire.rs"), "").unwrap();
    fs::write(src.join("flagged.rs"), "").unwrap();
    fs::write(src.join("pure/odd_name.rs"), "").unwrap();
    let modules = crate_modules(&src.join("lib.rs")).unwrap();
    assert_eq!(
        modules.keys().map(String::as_str).collect::<Vec<_>>(),
        ["flagged", "net", "net::wire", "renamed"]
    );

    let table = |rows: &str| {
        format!(
            "# A\n\n## {MODULES_HEADING}, in data-flow order\n\
             | module | job |\n|---|:--|\n{rows}\n## Next\n| `ignored` | x |\n"
        )
    };
    let complete =
        table("| `net` | a \\| b |\n| `net::wire` | w |\n| `renamed` | r |\n| `flagged` | f |\n");
    let rows = table_modules(&complete).unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    compare_modules(&modules, &rows).unwrap();

    // A module with no row, and a row with no module.
    let drifted = table("| `net` | a |\n| `renamed` | r |\n| `flagged` | f |\n| `gone` | g |\n");
    let error = compare_modules(&modules, &table_modules(&drifted).unwrap()).unwrap_err();
    assert!(error.contains("`net::wire`"), "{error}");
    assert!(error.contains("`gone` (line"), "{error}");

    // Rows the check cannot read are errors, not skipped.
    let unreadable = table("| net | a |\n| `net` | a |\n| `net` | again |\n");
    let error = table_modules(&unreadable).unwrap_err();
    assert!(error.contains("\"net\" is not one module path"), "{error}");
    assert!(error.contains("`net` already has a row"), "{error}");
    assert!(table_modules("# no such section\n").is_err());

    // A declared module without a file.
    fs::write(src.join("lib.rs"), "mod nowhere;\n").unwrap();
    let error = crate_modules(&src.join("lib.rs")).unwrap_err();
    assert!(error.contains("`nowhere` has no file"), "{error}");
}

// --- nothing points outside the repository ------------------------------------------

/// Strings no file of the repository may contain: the workplace's absolute paths and
/// the design file that used to sit beside the repository. Built with `concat!` so
/// that this file does not contain them.
const FORBIDDEN: [&str; 3] = [
    concat!("/wo", "rk/"),
    concat!("../", "shared"),
    concat!("DESIGN", ".md"),
];

/// The repository's files (committed or added), relative to `root`.
fn repository_files(root: &Path) -> Vec<PathBuf> {
    let output = Command::new("git")
        .args(["ls-files", "-z", "--cached"])
        .current_dir(root)
        .output()
        .expect("git runs (the tidy checks read the repository's file list)");
    assert!(
        output.status.success(),
        "git ls-files failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files: BTreeSet<PathBuf> = output
        .stdout
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| PathBuf::from(String::from_utf8_lossy(name).into_owned()))
        // Deleted but not yet committed.
        .filter(|name| root.join(name).is_file())
        .collect();
    files.into_iter().collect()
}

/// Each forbidden string `text` contains, with its line number.
fn forbidden_mentions(text: &[u8]) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        for needle in FORBIDDEN {
            if line
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
            {
                found.push((index + 1, needle));
            }
        }
    }
    found
}

/// The relative link targets of a Markdown text (`[text](target)`, `[label]: target`),
/// outside fenced code blocks and inline code, with their line numbers. Web links,
/// mail links and in-page anchors are not relative links.
fn relative_links(markdown: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    let mut fenced = false;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let prose = without_code_spans(line);
        let mut targets = Vec::new();
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            targets.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
        // A reference definition: `[label]: target`.
        if let Some(after) = trimmed.strip_prefix('[')
            && let Some(close) = after.find("]:")
            && !after[..close].contains('[')
        {
            targets.push(after[close + 2..].to_owned());
        }
        for target in targets {
            let target = target.trim();
            // `<target>` and `target "title"`.
            let target = target
                .strip_prefix('<')
                .and_then(|t| t.split_once('>'))
                .map_or_else(
                    || target.split_whitespace().next().unwrap_or(""),
                    |(t, _)| t,
                );
            let target = target.split('#').next().unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            links.push((index + 1, target.to_owned()));
        }
    }
    links
}

/// The line with its inline code spans (`` `...` ``) blanked.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else {
            out.push(if in_code { ' ' } else { c });
        }
    }
    out
}

/// Where a relative link from `file` (relative to the root) leads, or `None` if it
/// climbs out of the repository.
fn resolve_link(file: &Path, target: &str) -> Option<PathBuf> {
    let mut resolved = PathBuf::new();
    let base = if target.starts_with('/') {
        PathBuf::new()
    } else {
        file.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    for component in base.join(target.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !resolved.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(resolved)
}

/// The problems of one file: forbidden strings, and for Markdown, relative links that
/// leave the repository or lead nowhere.
fn outside_pointers(root: &Path, file: &Path, bytes: &[u8]) -> Vec<String> {
    let mut problems: Vec<String> = forbidden_mentions(bytes)
        .into_iter()
        .map(|(line, needle)| format!("{}:{line}: mentions {needle:?}", file.display()))
        .collect();
    if file.extension().is_some_and(|ext| ext == "md") {
        let text = String::from_utf8_lossy(bytes);
        for (line, target) in relative_links(&text) {
            match resolve_link(file, &target) {
                None => problems.push(format!(
                    "{}:{line}: the link {target:?} leads outside the repository",
                    file.display()
                )),
                Some(path) if !root.join(&path).exists() => problems.push(format!(
                    "{}:{line}: the link {target:?} leads to {}, which does not exist",
                    file.display(),
                    path.display()
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    let root = root();
    let files = repository_files(&root);
    assert!(
        files.iter().any(|f| f == Path::new("docs/design.md"))
            && files.iter().any(|f| f == Path::new("sidecar/src/lib.rs")),
        "git ls-files did not list the repository: {files:?}"
    );
    let mut problems = Vec::new();
    for file in &files {
        let bytes = match fs::read(root.join(file)) {
            Ok(bytes) => bytes,
            // Deleted in the work tree since git listed it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => panic!("{}: {error}", file.display()),
        };
        problems.extend(outside_pointers(&root, file, &bytes));
    }
    assert!(
        problems.is_empty(),
        "files point outside the repository (the design is docs/design.md):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_outside_pointer_check_fails_on_each_kind_of_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("docs")).unwrap();
    fs::write(root.join("docs/design.md"), "").unwrap();
    fs::write(root.join("README.md"), "").unwrap();

    let file = Path::new("docs/guide.md");
    let clean = "See [the design](design.md), [the readme](../README.md#top), \
                 [docs](./), [web](https://example.invalid/x) and [here](#part).\n\
                 ```\n[not a link](../../nowhere)\n```\n\
                 Code: `[x](../../nowhere)`.\n[ref]: design.md \"Design\"\n";
    assert_eq!(
        outside_pointers(root, file, clean.as_bytes()),
        Vec::<String>::new()
    );

    let bad = format!(
        "[up](../../secret.md)\n[gone](missing.md)\n[ref]: <../../x.md>\nread {}\n\
         also {}x and {}\n",
        FORBIDDEN[2], FORBIDDEN[0], FORBIDDEN[1]
    );
    let problems = outside_pointers(root, file, bad.as_bytes()).join("\n");
    assert!(
        problems.contains(":1: the link \"../../secret.md\" leads outside"),
        "{problems}"
    );
    assert!(
        problems
            .contains(":2: the link \"missing.md\" leads to docs/missing.md, which does not exist"),
        "{problems}"
    );
    assert!(
        problems.contains(":3: the link \"../../x.md\" leads outside"),
        "{problems}"
    );
    for (line, needle) in [(4, FORBIDDEN[2]), (5, FORBIDDEN[0]), (5, FORBIDDEN[1])] {
        assert!(
            problems.contains(&format!(":{line}: mentions {needle:?}")),
            "{problems}"
        );
    }
    // Forbidden strings count in every file, not only Markdown.
    let code = format!("// see {}\n", FORBIDDEN[2]);
    assert_eq!(
        outside_pointers(root, Path::new("src/lib.rs"), code.as_bytes()).len(),
        1
    );
}
