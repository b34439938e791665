//! The layering rule of `service/lib.rs`, checked over the source: every
//! `crate::…` path a file names (in `use` items and inline, nested groups
//! included) must point down. `make lint` runs this test.
//!
//! Comments and string literals are skipped, so a doc comment that mentions
//! `crate::domain` is not an import.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// What each layer must not reach: (layer, forbidden top-level modules).
const RULES: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "api",
            "domain",
            "loaders",
            "cache",
            "store",
            "documents",
            "middleware",
            "startup",
            "auth",
            "config",
        ],
    ),
    (
        "error",
        &[
            "api",
            "domain",
            "loaders",
            "cache",
            "store",
            "documents",
            "middleware",
            "startup",
            "model",
        ],
    ),
    (
        "store",
        &[
            "api",
            "domain",
            "loaders",
            "cache",
            "documents",
            "middleware",
            "startup",
        ],
    ),
    (
        "documents",
        &[
            "api",
            "domain",
            "loaders",
            "cache",
            "store",
            "middleware",
            "startup",
        ],
    ),
    (
        "cache",
        &[
            "api",
            "domain",
            "loaders",
            "store",
            "documents",
            "middleware",
            "startup",
        ],
    ),
    ("loaders", &["api", "domain", "middleware", "startup"]),
    ("domain", &["api", "middleware", "startup"]),
    (
        "api",
        &[
            "store",
            "documents",
            "cache",
            "loaders",
            "middleware",
            "startup",
        ],
    ),
];

/// One upward import: the file, the module it reaches, and its layer.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    file: String,
    layer: &'static str,
    reaches: String,
}

/// The layer of a file under `service/`: its first path component (or file
/// stem for a top-level file).
fn layer_of(relative: &Path) -> String {
    let first = relative
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The source without comments, string and char literals (replaced by
/// spaces), so only code is searched.
fn code_only(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(bytes.len(), |n| i + n);
            out.push(' ');
            i = end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(bytes.len(), |n| i + n + 2);
            out.push(' ');
            i = end;
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            let end = source[body..]
                .find(&close)
                .map_or(bytes.len(), |n| body + n + close.len());
            out.push(' ');
            i = end;
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            out.push(' ');
            i = j + 1;
        } else if bytes[i] == b'\'' && is_char_literal(rest) {
            let end = rest[1..].find('\'').map_or(bytes.len(), |n| i + n + 2);
            out.push(' ');
            i = end;
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"…"` or `r#"…"#`: the number of hashes.
fn raw_string_start(rest: &str) -> Option<usize> {
    let after_r = rest.strip_prefix('r')?;
    let hashes = after_r.bytes().take_while(|b| *b == b'#').count();
    after_r[hashes..].starts_with('"').then_some(hashes)
}

/// `'a'`, `'\n'`, `'\''` (a char), not `'a` (a lifetime).
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// The top-level modules named after `crate::` in `code`, nested `use`
/// groups (`crate::{a::x, b::{y, z}}`) included.
fn crate_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // part of another identifier
        }
        let Some(path) = after.trim_start().strip_prefix("::") else {
            continue;
        };
        let path = path.trim_start();
        if let Some(group) = path.strip_prefix('{') {
            for item in top_level_items(group) {
                found.insert(item);
            }
        } else {
            found.insert(identifier(path));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The first identifier of each comma-separated item of a `{…}` group.
fn top_level_items(group: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut depth = 0;
    let mut start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && !c.is_whitespace() => {
                items.push(identifier(&group[i..]));
                start = false;
            }
            _ => {}
        }
    }
    items
}

fn identifier(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The upward imports of one file, given its path relative to `service/`.
fn violations(relative: &Path, source: &str) -> Vec<Violation> {
    let layer = layer_of(relative);
    let Some((layer, forbidden)) = RULES.iter().find(|(name, _)| *name == layer) else {
        return Vec::new();
    };
    crate_modules(&code_only(source))
        .into_iter()
        .filter(|module| forbidden.contains(&module.as_str()))
        .map(|reaches| Violation {
            file: relative.display().to_string(),
            layer,
            reaches,
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("the source folder is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("service");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut all = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).expect("a readable source file");
        let relative = file.strip_prefix(&root).expect("under service/");
        all.extend(violations(relative, &source));
    }
    let report: Vec<String> = all
        .iter()
        .map(|v| format!("{} ({}) imports crate::{}", v.file, v.layer, v.reaches))
        .collect();
    assert!(
        report.is_empty(),
        "imports against the layering rule (service/lib.rs):\n{}",
        report.join("\n")
    );
}

#[test]
fn a_store_module_importing_the_domain_is_reported() {
    let source =
        "use sqlx::PgConnection;\nuse crate::{error::Result, domain::users::user_not_found};\n";
    assert_eq!(
        violations(Path::new("store/users.rs"), source),
        [Violation {
            file: "store/users.rs".into(),
            layer: "store",
            reaches: "domain".into(),
        }]
    );
}

#[test]
fn inline_paths_and_nested_groups_are_seen() {
    let inline = "fn f() { crate::api::error::ERROR_DOMAIN; }";
    assert_eq!(violations(Path::new("cache/mod.rs"), inline).len(), 1);
    let nested = "use crate::{model::{Id, users::User}, store::{self, users}};";
    let found = violations(Path::new("api/users.rs"), nested);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].reaches, "store");
    let loaders = "use crate::domain::orders::Orders;";
    assert_eq!(violations(Path::new("loaders/orders.rs"), loaders).len(), 1);
}

#[test]
fn comments_strings_and_other_identifiers_are_not_imports() {
    let source = r##"
        //! See `crate::domain::users` for the rules.
        /* crate::api */
        const DOC: &str = "crate::domain";
        const RAW: &str = r#"crate::domain"#;
        fn f<'a>(x: &'a str) -> char { let _ = my_crate::domain::x; 'c' }
        use crate::model::Id;
    "##;
    assert!(violations(Path::new("store/users.rs"), source).is_empty());
}

#[test]
fn allowed_imports_pass() {
    let source = "use crate::{error::Result, model::{Id, users::User}, config::DatabaseSettings};";
    assert!(violations(Path::new("store/users.rs"), source).is_empty());
    let domain = "use crate::{cache::Cache, loaders::Loaders, store, documents::Mongo};";
    assert!(violations(Path::new("domain/orders.rs"), domain).is_empty());
}
