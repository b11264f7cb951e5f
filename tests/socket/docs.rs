//! The documentation checked against the code: the configuration reference is generated from
//! `config::REFERENCE`, every `FERRY_*` variable the code reads is documented, every relative link between
//! the Markdown files resolves, and every error message Ferry can print is explained in
//! docs/troubleshooting.md. No daemon and no root needed.
//!
//! `FERRY_UPDATE_DOCS=1 cargo test --test socket docs::` rewrites the generated block instead of failing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const BEGIN: &str = "<!-- BEGIN config-reference (generated: cargo test --test socket docs:: regenerates with FERRY_UPDATE_DOCS=1) -->";
const END: &str = "<!-- END config-reference -->";

/// Error messages a user can never see, so docs/troubleshooting.md need not explain them: a prefix of the
/// format string, and why it never reaches a user. Keep this list short; an entry that no longer matches
/// any message fails the test.
const NEVER_SHOWN: &[(&str, &str)] = &[];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

#[test]
fn configuration_reference_is_generated_from_the_code() {
    let path = repo().join("docs/configuration.md");
    let text = read("docs/configuration.md");
    let expected = format!("{BEGIN}\n{}{END}", ferry::config::reference_markdown());
    let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        panic!("docs/configuration.md must contain the lines\n{BEGIN}\n{END}\nto hold the generated reference");
    };
    assert!(start < end, "the reference markers are out of order");
    let current = &text[start..end + END.len()];
    if current == expected {
        return;
    }
    if std::env::var("FERRY_UPDATE_DOCS").as_deref() == Ok("1") {
        let updated = format!("{}{expected}{}", &text[..start], &text[end + END.len()..]);
        // Write and rename, so the other tests reading the file in parallel never see it half written.
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, updated).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eprintln!("rewrote the configuration reference in {}", path.display());
        return;
    }
    panic!(
        "docs/configuration.md does not match config::REFERENCE; run \
         `FERRY_UPDATE_DOCS=1 cargo test --test socket docs::` and commit the result.\n\
         expected:\n{expected}\nfound:\n{current}"
    );
}

#[test]
fn every_environment_variable_is_documented() {
    let doc = read("docs/configuration.md");
    let mut vars = BTreeSet::new();
    for (file, text) in sources() {
        let code = non_test(&text);
        // Every string literal naming a variable: clap's `env = "FERRY_..."` and direct reads alike.
        for (i, _) in code.match_indices("\"FERRY_") {
            let name: String = code[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            vars.insert((name, file.clone()));
        }
    }
    let names: BTreeSet<_> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains("FERRY_SOCKET") && names.contains("FERRY_LOG"),
        "the scan found too little: {names:?}"
    );
    let missing: Vec<_> = vars
        .iter()
        .filter(|(n, _)| !doc.contains(&format!("`{n}`")))
        .map(|(n, f)| format!("{n} (read in {f})"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document: {missing:?}"
    );
}

#[test]
fn relative_links_resolve() {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path_part, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path_part.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path_part)
            };
            let shown = format!(
                "{} -> {target}",
                file.strip_prefix(repo()).unwrap().display()
            );
            if !resolved.exists() {
                broken.push(format!("{shown}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                if resolved.extension().is_some_and(|e| e == "md") {
                    let anchors = heading_anchors(&std::fs::read_to_string(&resolved).unwrap());
                    if !anchors.contains(anchor) {
                        broken.push(format!("{shown}: no heading with that anchor"));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(
        checked > 0,
        "no relative links found; is the link scanner broken?"
    );
}

#[test]
fn every_error_message_is_in_troubleshooting() {
    let doc = squash(&read("docs/troubleshooting.md"));
    let messages = error_messages();
    assert!(
        messages.len() >= 40
            && messages
                .iter()
                .any(|m| m.format.starts_with("volume name is empty")),
        "the scan found too few messages ({}); is the scanner broken?",
        messages.len()
    );
    let mut used_allowances = BTreeSet::new();
    let mut missing = Vec::new();
    for m in &messages {
        if let Some((prefix, _)) = NEVER_SHOWN.iter().find(|(p, _)| m.format.starts_with(p)) {
            used_allowances.insert(*prefix);
            continue;
        }
        let segments = literal_segments(&m.format);
        if segments.iter().all(|s| s.trim().is_empty()) {
            // Only placeholders, such as "{0}": it prints a wrapped error, which is checked where defined.
            continue;
        }
        let distinctive: Vec<_> = segments
            .iter()
            .map(|s| squash(s))
            .filter(|s| s.len() >= 12)
            .collect();
        let documented = if distinctive.is_empty() {
            // Short pieces around placeholders, such as "volume {name:?}: {source}": they must appear in
            // order on one line, with something in place of each placeholder.
            doc_lines_match(&read("docs/troubleshooting.md"), &segments)
        } else {
            distinctive.iter().all(|s| doc.contains(s.as_str()))
        };
        if !documented {
            missing.push(format!("{} ({}): {:?}", m.location, m.kind, m.format));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md does not explain these messages (quote each as printed, with its \
         placeholders in capitals, and say what it means and what to do):\n{}",
        missing.join("\n")
    );
    for (prefix, _) in NEVER_SHOWN {
        assert!(
            used_allowances.contains(prefix),
            "NEVER_SHOWN lists {prefix:?}, which no message starts with any more; remove it"
        );
    }
}

// ---- source scanning ----

/// Every `.rs` file under src/, as (path relative to the repository, text), in path order.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&repo().join("src"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(repo()).unwrap().display().to_string();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The part of a file before its unit tests. By the house style test modules come last, so everything from
/// the first `#[cfg(test)] mod` on is test code.
fn non_test(text: &str) -> &str {
    let mut from = 0;
    while let Some(i) = text[from..].find("#[cfg(test)]") {
        let at = from + i;
        let after = text[at + "#[cfg(test)]".len()..].trim_start();
        if after.starts_with("mod ") {
            return &text[..at];
        }
        from = at + 1;
    }
    text
}

struct Message {
    location: String,
    kind: &'static str,
    format: String,
}

/// Every message Ferry can print as an error: `#[error("...")]` format strings, and the literal first
/// argument of `.context(..)`, `.with_context(|| format!(..))`, `anyhow!(..)` and `bail!(..)`.
fn error_messages() -> Vec<Message> {
    let mut out = Vec::new();
    for (file, text) in sources() {
        let code = non_test(&text);
        let line_of = |i: usize| code[..i].matches('\n').count() + 1;
        let mut found = |kind: &'static str, at: usize, lit: Option<String>| {
            if let Some(format) = lit {
                out.push(Message {
                    location: format!("{file}:{}", line_of(at)),
                    kind,
                    format,
                });
            }
        };
        for (i, pat) in code.match_indices("#[error(") {
            found(
                "#[error]",
                i,
                string_literal(code[i + pat.len()..].trim_start()),
            );
        }
        for (i, pat) in code.match_indices(".context(") {
            let rest = code[i + pat.len()..].trim_start();
            let rest = rest.strip_prefix("format!(").unwrap_or(rest).trim_start();
            found(".context", i, string_literal(rest));
        }
        for (i, pat) in code.match_indices(".with_context(") {
            let rest = code[i + pat.len()..].trim_start();
            let rest = rest.strip_prefix("||").unwrap_or(rest).trim_start();
            let rest = rest.strip_prefix("format!(").unwrap_or(rest).trim_start();
            found(".with_context", i, string_literal(rest));
        }
        for mac in ["anyhow!(", "bail!("] {
            for (i, pat) in code.match_indices(mac) {
                found(mac, i, string_literal(code[i + pat.len()..].trim_start()));
            }
        }
    }
    out
}

/// The value of the Rust string literal (plain or raw) that `s` starts with, if it starts with one.
fn string_literal(s: &str) -> Option<String> {
    if let Some(raw) = s.strip_prefix('r') {
        let hashes = raw.chars().take_while(|c| *c == '#').count();
        let body = raw[hashes..].strip_prefix('"')?;
        let close = format!("\"{}", "#".repeat(hashes));
        return Some(body[..body.find(&close)?].to_string());
    }
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                // A line continuation drops the newline and the next line's indentation.
                '\n' => chars = chars.as_str().trim_start().chars(),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The literal pieces of a format string, between its placeholders (`{{` and `}}` are literal braces).
fn literal_segments(format: &str) -> Vec<String> {
    let mut segments = vec![String::new()];
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                segments.last_mut().unwrap().push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                segments.last_mut().unwrap().push('}');
            }
            '{' => {
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
                segments.push(String::new());
            }
            c => segments.last_mut().unwrap().push(c),
        }
    }
    segments
}

/// Whether some line of `doc` holds the segments in order, with text between them where placeholders were.
fn doc_lines_match(doc: &str, segments: &[String]) -> bool {
    // Whitespace runs become one space, but edges stay: "volume " must not match "volume:".
    let spaced = |s: &str| {
        let mut out = s.split_whitespace().collect::<Vec<_>>().join(" ");
        if s.starts_with(char::is_whitespace) {
            out.insert(0, ' ');
        }
        if s.ends_with(char::is_whitespace) && !out.ends_with(' ') {
            out.push(' ');
        }
        out
    };
    doc.lines().any(|line| {
        let line = spaced(line);
        let mut at = 0;
        for (i, seg) in segments.iter().enumerate() {
            let seg = spaced(seg);
            if seg.is_empty() {
                // A placeholder at the end or two in a row: it must stand for something.
                at += usize::from(i > 0);
                if at > line.len() {
                    return false;
                }
                continue;
            }
            match line.get(at..).and_then(|rest| rest.find(&seg)) {
                // After a placeholder, at least one character must stand in for it.
                Some(j) if i == 0 || j > 0 => at += j + seg.len(),
                _ => return false,
            }
        }
        true
    })
}

/// Collapses every run of whitespace to one space and trims, so wrapped lines match.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---- Markdown ----

/// The targets of inline links and reference definitions, outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            out.push(target.trim_matches(['<', '>']).to_string());
            rest = &rest[end..];
        }
        // Reference definitions: `[label]: target`.
        let t = line.trim_start();
        if t.starts_with('[') {
            if let Some((_, target)) = t.split_once("]: ") {
                out.push(target.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    }
    out
}

fn without_code_spans(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join("")
}

/// The anchors GitHub gives the headings of a Markdown file.
fn heading_anchors(text: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(title) = line
            .strip_prefix('#')
            .map(|l| l.trim_start_matches('#'))
            .filter(|l| !fenced && l.starts_with(' '))
        else {
            continue;
        };
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while anchors.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        anchors.insert(unique);
    }
    anchors
}

#[test]
fn scanner_helpers() {
    assert_eq!(
        string_literal(
            r#""a \"b\" \
                       c{0}" rest"#
        ),
        Some("a \"b\" c{0}".into())
    );
    assert_eq!(string_literal(r##"r#"x "y""# z"##), Some("x \"y\"".into()));
    assert_eq!(string_literal("transparent)"), None);
    assert_eq!(
        literal_segments("cannot {op} {path:?}: {{x}} {}"),
        vec!["cannot ", " ", ": {x} ", ""]
    );
    let segs = literal_segments("volume {name:?}: {source}");
    assert!(doc_lines_match("- `volume \"NAME\": CAUSE`", &segs));
    assert!(!doc_lines_match("- `volume : CAUSE`", &segs));
    assert_eq!(
        links("see [a](x.md#y \"t\") and `[b](no.md)`\n```\n[c](no.md)\n```\n[d]: z.md"),
        vec!["x.md#y", "z.md"]
    );
    let anchors =
        heading_anchors("# Top\n## When a server is unreachable\n## `ferry doctor`\n## Top");
    assert!(
        anchors.contains("when-a-server-is-unreachable"),
        "{anchors:?}"
    );
    assert!(
        anchors.contains("ferry-doctor") && anchors.contains("top-1"),
        "{anchors:?}"
    );
}
