//! `values-table VALUES README`: the chart's values as a Markdown table (key, default,
//! description from the comments above each key), written into README between the
//! markers `<!-- values-table:begin -->` and `<!-- values-table:end -->`. Run by
//! tests/generate.sh with the chart's own README (charts/gefyra-operator/README.md, which
//! `helm show readme` prints); the drift test fails when its table is stale.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const BEGIN: &str = "<!-- values-table:begin -->";
const END: &str = "<!-- values-table:end -->";

/// One documented value: its dotted path, its comment lines.
struct Entry {
    path: Vec<String>,
    comment: Vec<String>,
}

/// The keys of `text` in order, each with the comment lines right above it (a blank line
/// ends a comment that belongs to no key). List items belong to their key's value.
fn entries(text: &str) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut comment: Vec<String> = Vec::new();
    // The indentation of the list item being read: what is deeper belongs to it.
    let mut item: Option<usize> = None;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if !trimmed.is_empty() && item.is_some_and(|depth| indent > depth) {
            continue;
        }
        item = None;
        if trimmed.is_empty() {
            comment.clear();
        } else if let Some(text) = trimmed.strip_prefix('#') {
            comment.push(text.trim().to_string());
        } else if trimmed.starts_with("- ") || trimmed == "-" {
            comment.clear();
            item = Some(indent);
        } else if let Some((key, _)) = trimmed.split_once(':') {
            ensure!(
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "line {}: {key:?} is not a plain key",
                number + 1
            );
            while path.last().is_some_and(|(depth, _)| *depth >= indent) {
                path.pop();
            }
            path.push((indent, key.to_string()));
            entries.push(Entry {
                path: path.iter().map(|(_, key)| key.clone()).collect(),
                comment: std::mem::take(&mut comment),
            });
        } else {
            bail!(
                "line {}: {line:?} is neither a key nor a comment",
                number + 1
            );
        }
    }
    Ok(entries)
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The table: a row for every value that is not a non-empty mapping (those are sections;
/// their comment, if any, is a row of its own without a default).
fn table(text: &str) -> Result<String> {
    let values: Value = serde_saphyr::from_str(text).context("values.yaml is not YAML")?;
    let mut rows = vec![
        "| Key | Default | Description |".to_string(),
        "|-----|---------|-------------|".to_string(),
    ];
    for entry in entries(text)? {
        let mut value = &values;
        for key in &entry.path {
            value = value
                .get(key)
                .with_context(|| format!("{} is not in the parsed values", entry.path.join(".")))?;
        }
        let section = value.as_object().is_some_and(|map| !map.is_empty());
        if section && entry.comment.is_empty() {
            continue;
        }
        let default = if section {
            String::new()
        } else {
            format!("`{}`", cell(&serde_json::to_string(value)?))
        };
        rows.push(format!(
            "| `{}` | {} | {} |",
            entry.path.join("."),
            default,
            cell(&entry.comment.join(" "))
        ));
    }
    Ok(rows.join("\n") + "\n")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [values, readme] = args.as_slice() else {
        bail!("usage: values-table VALUES README");
    };
    let text = std::fs::read_to_string(values).with_context(|| format!("reading {values}"))?;
    let table = table(&text)?;
    let readme_path = Path::new(readme);
    let document =
        std::fs::read_to_string(readme_path).with_context(|| format!("reading {readme}"))?;
    let (before, rest) = document
        .split_once(BEGIN)
        .with_context(|| format!("{readme} has no {BEGIN}"))?;
    let (_, after) = rest
        .split_once(END)
        .with_context(|| format!("{readme} has no {END}"))?;
    std::fs::write(readme_path, format!("{before}{BEGIN}\n{table}{END}{after}"))
        .with_context(|| format!("writing {readme}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_get_their_comments_and_defaults() {
        let text = "# the file's own comment\n\nimage:\n  # Where from.\n  repository: x/y\n  tag: \"\"\nlist:\n  # Items.\n  deny:\n    - 10.0.0.0/8\n  from:\n    - namespaceSelector:\n        matchLabels:\n          a: b\nempty: {}\n";
        let table = table(text).unwrap();
        assert!(
            table.contains("| `image.repository` | `\"x/y\"` | Where from. |"),
            "{table}"
        );
        assert!(table.contains("| `image.tag` | `\"\"` |  |"), "{table}");
        assert!(
            table.contains("| `list.deny` | `[\"10.0.0.0/8\"]` | Items. |"),
            "{table}"
        );
        assert!(table.contains("| `empty` | `{}` |"), "{table}");
        assert!(!table.contains("namespaceSelector`"), "{table}");
        assert!(!table.contains("the file's own comment"), "{table}");
    }
}
