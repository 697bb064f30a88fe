//! `kubectl gefyra <TAB>`: kubectl (1.26 and later) completes a plugin's arguments by
//! running `kubectl_complete-gefyra WORD... PARTIAL` from the PATH and reading Cobra's
//! completion protocol from it: a candidate a line (`value<TAB>description`), then
//! `:<directive>`. `kubectl_complete-gefyra` is this binary under that name (a symlink) or
//! `kubectl-gefyra __complete WORD... PARTIAL`. Subcommands, flags and flag values come from
//! the clap definition; client IDs from the cluster.

use clap::{Arg, Command};

/// Cobra's ShellCompDirectiveDefault: the shell may offer file names.
pub const FILES: u32 = 0;
/// Cobra's ShellCompDirectiveNoFileComp: only the candidates given.
pub const NO_FILES: u32 = 4;

/// Objects whose names are read from the cluster for a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// GefyraClients (with the kubeconfig).
    Clients,
    /// GefyraBridgeMounts (with the client file if one was given, else the kubeconfig).
    Mounts,
    /// The client file's own GefyraBridges.
    Bridges,
}

/// What the words typed so far ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// These candidates (value, description), already filtered by the partial word.
    Candidates {
        candidates: Vec<(String, String)>,
        directive: u32,
    },
    /// The names of these objects that start with `prefix` (read from the cluster).
    Names { names: Names, prefix: String },
}

/// The cluster options among the words, for listing names as the command would.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    pub kubeconfig: Option<String>,
    pub context: Option<String>,
    pub namespace: Option<String>,
    /// `-f CLIENT_FILE`.
    pub file: Option<String>,
}

fn long_option<'a>(path: &[&'a Command], name: &str) -> Option<&'a Arg> {
    path.iter().rev().find_map(|command| {
        command.get_arguments().find(|arg| {
            arg.get_long() == Some(name)
                || arg
                    .get_all_aliases()
                    .is_some_and(|aliases| aliases.contains(&name))
        })
    })
}

fn short_option<'a>(path: &[&'a Command], short: char) -> Option<&'a Arg> {
    path.iter().rev().find_map(|command| {
        command
            .get_arguments()
            .find(|arg| arg.get_short() == Some(short))
    })
}

fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

fn subcommand<'a>(command: &'a Command, word: &str) -> Option<&'a Command> {
    command
        .get_subcommands()
        .find(|sub| sub.get_name() == word || sub.get_all_aliases().any(|alias| alias == word))
}

/// The first line of a help text, as a completion's description.
fn first_line(text: Option<&clap::builder::StyledStr>) -> String {
    text.map(|text| {
        text.to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
    .unwrap_or_default()
}

/// The command line's definition, built (defaults filled in, global flags propagated) so
/// that it can be walked.
pub fn definition() -> Command {
    let mut command = <crate::args::Cli as clap::CommandFactory>::command();
    command.build();
    command
}

/// The words typed before the partial one, read as clap would read them.
struct Typed<'a> {
    /// The subcommands entered, the root first.
    path: Vec<&'a Command>,
    options: ClusterOptions,
    /// Positional words given to the innermost subcommand.
    positionals: usize,
    /// The option whose value the partial word is.
    pending: Option<&'a Arg>,
}

fn record(options: &mut ClusterOptions, arg: &Arg, value: &str) {
    let slot = match arg.get_id().as_str() {
        "kubeconfig" => &mut options.kubeconfig,
        "context" => &mut options.context,
        "namespace" | "short_namespace" => &mut options.namespace,
        "file" => &mut options.file,
        _ => return,
    };
    *slot = Some(value.to_string());
}

fn read_typed<'a>(root: &'a Command, typed: &[String]) -> Typed<'a> {
    let mut path: Vec<&Command> = vec![root];
    let mut options = ClusterOptions::default();
    let mut positionals = 0usize;
    let mut pending: Option<&Arg> = None;
    for word in typed {
        if let Some(arg) = pending.take() {
            record(&mut options, arg, word);
            continue;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (long, None),
            };
            if let Some(arg) = long_option(&path, name).filter(|arg| takes_value(arg)) {
                match value {
                    Some(value) => record(&mut options, arg, value),
                    None => pending = Some(arg),
                }
            }
        } else if let Some(shorts) = word.strip_prefix('-').filter(|s| !s.is_empty()) {
            let mut chars = shorts.chars();
            if let Some(arg) = chars
                .next()
                .and_then(|short| short_option(&path, short))
                .filter(|arg| takes_value(arg))
            {
                let rest = chars.as_str().trim_start_matches('=');
                if rest.is_empty() {
                    pending = Some(arg);
                } else {
                    record(&mut options, arg, rest);
                }
            }
        } else if let Some(sub) = path.last().and_then(|current| subcommand(current, word)) {
            path.push(sub);
            positionals = 0;
        } else {
            positionals += 1;
        }
    }
    Typed {
        path,
        options,
        positionals,
        pending,
    }
}

/// The objects a value names: a flag's (`--mount`) or a positional argument's of the
/// innermost command (`clients inspect ID`, `mount delete NAME`, `bridge delete NAME`).
fn names_for(path: &[&Command], arg: &Arg) -> Option<Names> {
    let id = arg.get_id().as_str();
    if id.starts_with("client_id") {
        return Some(Names::Clients);
    }
    if id == "mount" {
        return Some(Names::Mounts);
    }
    let names: Vec<&str> = path.iter().map(|command| command.get_name()).collect();
    match names.as_slice() {
        [.., "mount", "delete"] => Some(Names::Mounts),
        [.., "bridge", "delete"] => Some(Names::Bridges),
        _ => None,
    }
}

/// A flag's values: its possible values, a name from the cluster, or file names.
fn flag_values(path: &[&Command], arg: &Arg, partial: &str) -> Wanted {
    if let Some(names) = names_for(path, arg) {
        return Wanted::Names {
            names,
            prefix: partial.to_string(),
        };
    }
    let values: Vec<(String, String)> = arg
        .get_possible_values()
        .iter()
        .filter(|value| !value.is_hide_set())
        .map(|value| {
            (
                value.get_name().to_string(),
                value.get_help().map(|h| h.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    let file = arg
        .get_value_names()
        .is_some_and(|names| names.iter().any(|name| name.contains("FILE")));
    Wanted::Candidates {
        candidates: filtered(values, partial),
        directive: if file { FILES } else { NO_FILES },
    }
}

/// The long flags of the innermost command and the global ones.
fn flags(path: &[&Command], partial: &str) -> Wanted {
    let mut flags: Vec<(String, String)> = Vec::new();
    for (depth, command) in path.iter().enumerate() {
        let innermost = depth + 1 == path.len();
        for arg in command.get_arguments() {
            if arg.is_hide_set() || !(innermost || arg.is_global_set()) {
                continue;
            }
            if let Some(long) = arg.get_long() {
                flags.push((format!("--{long}"), first_line(arg.get_help())));
            }
        }
    }
    flags.sort();
    flags.dedup_by(|a, b| a.0 == b.0);
    Wanted::Candidates {
        candidates: filtered(flags, partial),
        directive: NO_FILES,
    }
}

fn filtered(candidates: Vec<(String, String)>, partial: &str) -> Vec<(String, String)> {
    candidates
        .into_iter()
        .filter(|(value, _)| value.starts_with(partial))
        .collect()
}

/// What to offer for `words` (the last one is the partial word, possibly empty) typed
/// after `kubectl gefyra`, and the cluster options found among them.
pub fn wanted(root: &Command, words: &[String]) -> (Wanted, ClusterOptions) {
    let empty = String::new();
    let (partial, typed) = words.split_last().unwrap_or((&empty, &[]));
    let Typed {
        path,
        options,
        positionals,
        pending,
    } = read_typed(root, typed);
    let current = *path.last().unwrap_or(&root);
    let wanted = if let Some(arg) = pending {
        flag_values(&path, arg, partial)
    } else if partial.starts_with('-') {
        flags(&path, partial)
    } else if current.has_subcommands() {
        let names = current
            .get_subcommands()
            .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
            .map(|sub| (sub.get_name().to_string(), first_line(sub.get_about())))
            .collect();
        Wanted::Candidates {
            candidates: filtered(names, partial),
            directive: NO_FILES,
        }
    } else {
        // The first positional names an object (several when it takes several).
        let named = current.get_positionals().next().and_then(|arg| {
            let multiple = arg
                .get_num_args()
                .is_some_and(|range| range.max_values() > 1);
            (positionals == 0 || multiple)
                .then(|| names_for(&path, arg))
                .flatten()
        });
        match named {
            Some(names) => Wanted::Names {
                names,
                prefix: partial.clone(),
            },
            None => Wanted::Candidates {
                candidates: Vec::new(),
                directive: NO_FILES,
            },
        }
    };
    (wanted, options)
}

/// Cobra's protocol: a candidate a line, then the directive.
pub fn render(candidates: &[(String, String)], directive: u32) -> String {
    let mut text = String::new();
    for (value, description) in candidates {
        if description.is_empty() {
            text.push_str(&format!("{value}\n"));
        } else {
            text.push_str(&format!("{value}\t{description}\n"));
        }
    }
    text.push_str(&format!(":{directive}\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(words: &[&str]) -> (Wanted, ClusterOptions) {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        wanted(&definition(), &words)
    }

    fn names(wanted: &Wanted) -> Vec<&str> {
        match wanted {
            Wanted::Candidates { candidates, .. } => {
                candidates.iter().map(|(value, _)| value.as_str()).collect()
            }
            Wanted::Names { .. } => vec!["<names>"],
        }
    }

    #[test]
    fn subcommands_flags_values_and_client_ids() {
        let (top, _) = ask(&[""]);
        let top_names = names(&top);
        for expected in ["clients", "connect", "disconnect", "completion"] {
            assert!(top_names.contains(&expected), "{top_names:?}");
        }
        assert!(!top_names.contains(&"__complete") && !top_names.contains(&"help"));
        assert_eq!(names(&ask(&["cl"]).0), ["clients"]);
        let (clients, _) = ask(&["clients", ""]);
        assert!(names(&clients).contains(&"inspect"), "{clients:?}");
        let (formats, _) = ask(&["clients", "ls", "-o", ""]);
        assert_eq!(names(&formats), ["table", "wide", "json", "yaml", "name"]);
        assert_eq!(
            names(&ask(&["clients", "list", "--output", "y"]).0),
            ["yaml"]
        );
        let (flags, _) = ask(&["clients", "list", "--n"]);
        assert_eq!(names(&flags), ["--namespace", "--no-headers"]);
        let (file, _) = ask(&["connect", "-f", ""]);
        assert!(
            matches!(
                file,
                Wanted::Candidates {
                    directive: FILES,
                    ..
                }
            ),
            "{file:?}"
        );
        let (ids, options) = ask(&[
            "--namespace",
            "team",
            "clients",
            "inspect",
            "--kubeconfig=/k",
            "an",
        ]);
        assert_eq!(
            ids,
            Wanted::Names {
                names: Names::Clients,
                prefix: "an".into()
            }
        );
        assert_eq!(options.namespace.as_deref(), Some("team"));
        assert_eq!(options.kubeconfig.as_deref(), Some("/k"));
        // inspect takes one ID: after it, nothing more.
        assert_eq!(
            names(&ask(&["clients", "inspect", "anna", ""]).0),
            Vec::<&str>::new()
        );
        assert!(matches!(
            ask(&["clients", "rm", "anna", ""]).0,
            Wanted::Names {
                names: Names::Clients,
                ..
            }
        ));
        assert_eq!(render(&[("a".into(), "b".into())], NO_FILES), "a\tb\n:4\n");
    }

    #[test]
    fn mounts_and_bridges_are_completed_by_name() {
        let (top, _) = ask(&[""]);
        for expected in ["mount", "bridge"] {
            assert!(names(&top).contains(&expected), "{top:?}");
        }
        assert_eq!(names(&ask(&["bridge", ""]).0), ["create", "list", "delete"]);
        let (flags, _) = ask(&["bridge", "create", "--match-h"]);
        assert_eq!(
            names(&flags),
            [
                "--match-header-exact",
                "--match-header-prefix",
                "--match-header-regex"
            ]
        );
        let (mounts, options) = ask(&["bridge", "create", "-f", "dev.json", "--mount", "w"]);
        assert_eq!(
            mounts,
            Wanted::Names {
                names: Names::Mounts,
                prefix: "w".into()
            }
        );
        assert_eq!(options.file.as_deref(), Some("dev.json"));
        // A new bridge's name is not completed; an existing one's is, to delete it.
        assert_eq!(names(&ask(&["bridge", "create", ""]).0), Vec::<&str>::new());
        let (bridges, options) = ask(&["bridge", "rm", "--file=dev.json", "d"]);
        assert_eq!(
            bridges,
            Wanted::Names {
                names: Names::Bridges,
                prefix: "d".into()
            }
        );
        assert_eq!(options.file.as_deref(), Some("dev.json"));
        assert!(matches!(
            ask(&["mount", "delete", "web", ""]).0,
            Wanted::Names {
                names: Names::Mounts,
                ..
            }
        ));
        assert_eq!(names(&ask(&["mount", "ls", "-o", "w"]).0), ["wide"]);
    }
}
