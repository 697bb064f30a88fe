//! The commands of the README and of docs/*.md, as the docs test runs them (issue 29: "a
//! test runs the README's and the docs' commands as written, not a copy of them").
//!
//! Every code block of kind `sh` is preceded, on the line right above its fence, by a
//! marker:
//! - `<!-- test: node -->`: run on the node cluster, on the admin's machine;
//! - `<!-- test: node netns -->`: run as root in a network namespace of its own (the
//!   developer's machine: no kubeconfig, `wg-quick` may bring up an interface there);
//! - `<!-- test: not run (WHY) -->`: shown to readers, never run; WHY is required.
//!
//! An `sh` block without a marker, a marker above anything else and an unknown marker are
//! errors, so no command is left out silently. Other blocks (`text`, `yaml`, ...) are not
//! commands.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// Where a block runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// On the admin's machine.
    Host,
    /// As root in the developer's network namespace.
    Netns,
    /// Not run; the reason the page gives.
    NotRun(String),
}

/// One `sh` block of a page.
#[derive(Clone, Debug)]
pub struct Block {
    /// The page, relative to the repository (`docs/install.md`).
    pub page: String,
    /// The line of its opening fence (1-based).
    pub line: usize,
    pub marker: Marker,
    /// The commands, as written (without the fences).
    pub text: String,
}

fn marker(comment: &str) -> Result<Option<Marker>> {
    let Some(inner) = comment
        .trim()
        .strip_prefix("<!--")
        .and_then(|rest| rest.strip_suffix("-->"))
    else {
        return Ok(None);
    };
    let Some(spec) = inner.trim().strip_prefix("test:") else {
        return Ok(None);
    };
    let spec = spec.trim();
    Ok(Some(match spec {
        "node" => Marker::Host,
        "node netns" => Marker::Netns,
        _ => {
            let Some(why) = spec
                .strip_prefix("not run (")
                .and_then(|rest| rest.strip_suffix(')'))
                .filter(|why| !why.trim().is_empty())
            else {
                bail!(
                    "unknown marker {comment:?}: use `test: node`, `test: node netns` or `test: not run (WHY)`"
                );
            };
            Marker::NotRun(why.trim().to_string())
        }
    }))
}

/// The `sh` blocks of one page, in order, each with its marker.
pub fn blocks(page: &str, text: &str) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index];
        let Some(info) = line.strip_prefix("```") else {
            if let Some(found) = marker(line).with_context(|| format!("{page}:{}", index + 1))? {
                let next = lines.get(index + 1).copied().unwrap_or_default();
                ensure!(
                    next.trim_end() == "```sh",
                    "{page}:{}: marker {found:?} is not right above a ```sh block",
                    index + 1
                );
            }
            index += 1;
            continue;
        };
        let start = index;
        let end = lines[start + 1..]
            .iter()
            .position(|line| line.trim_end() == "```")
            .map(|offset| start + 1 + offset)
            .with_context(|| format!("{page}:{}: a code block that never ends", start + 1))?;
        if info.trim() == "sh" {
            let above = start.checked_sub(1).map(|above| lines[above]);
            let found = match above {
                Some(above) => marker(above).with_context(|| format!("{page}:{start}"))?,
                None => None,
            }
            .with_context(|| {
                format!(
                    "{page}:{}: an sh block without a marker; put `<!-- test: node -->` (or `node netns`, or `not run (WHY)`) on the line above it",
                    start + 1
                )
            })?;
            blocks.push(Block {
                page: page.to_string(),
                line: start + 1,
                marker: found,
                text: lines[start + 1..end].join("\n") + "\n",
            });
        }
        index = end + 1;
    }
    Ok(blocks)
}

/// The pages the docs test reads: README.md and docs/*.md, relative to `root`, sorted.
pub fn pages(root: &Path) -> Result<Vec<String>> {
    let mut pages = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .context("reading docs/")?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    pages.extend(docs);
    Ok(pages)
}

/// Every page's blocks, checked; then those to run, in `order` (pages) and in page order
/// within each. A page with a block to run that `order` does not name is an error.
pub fn runnable_blocks(root: &Path, order: &[&str]) -> Result<(Vec<Block>, Vec<Block>)> {
    let mut all = Vec::new();
    for page in pages(root)? {
        let text =
            std::fs::read_to_string(root.join(&page)).with_context(|| format!("reading {page}"))?;
        all.extend(blocks(&page, &text)?);
    }
    for block in &all {
        ensure!(
            matches!(block.marker, Marker::NotRun(_)) || order.contains(&block.page.as_str()),
            "{}:{} is to be run, but the docs test's order of pages does not name {}",
            block.page,
            block.line,
            block.page
        );
    }
    let mut run = Vec::new();
    for page in order {
        run.extend(
            all.iter()
                .filter(|block| block.page == *page && !matches!(block.marker, Marker::NotRun(_)))
                .cloned(),
        );
    }
    let not_run = all
        .into_iter()
        .filter(|block| matches!(block.marker, Marker::NotRun(_)))
        .collect();
    Ok((run, not_run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_blocks_carry_their_markers_and_other_blocks_are_not_commands() {
        let page = "# T\n\n<!-- test: node -->\n```sh\na\nb\n```\n\n```text\nnot a command\n```\n<!-- test: node netns -->\n```sh\nc\n```\n<!-- test: not run (needs a cloud) -->\n```sh\nd\n```\n";
        let found = blocks("p.md", page).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].marker, Marker::Host);
        assert_eq!(found[0].text, "a\nb\n");
        assert_eq!(found[0].line, 4);
        assert_eq!(found[1].marker, Marker::Netns);
        assert_eq!(found[2].marker, Marker::NotRun("needs a cloud".into()));
    }

    #[test]
    fn unmarked_blocks_stray_markers_and_unknown_markers_are_refused() {
        assert!(blocks("p.md", "```sh\na\n```\n").is_err());
        assert!(blocks("p.md", "<!-- test: node -->\n\n```sh\na\n```\n").is_err());
        assert!(blocks("p.md", "<!-- test: node -->\ntext\n").is_err());
        assert!(blocks("p.md", "<!-- test: nod -->\n```sh\na\n```\n").is_err());
        assert!(blocks("p.md", "<!-- test: not run () -->\n```sh\na\n```\n").is_err());
        assert!(blocks("p.md", "<!-- other comment -->\n```yaml\na: b\n```\n").is_ok());
    }
}
