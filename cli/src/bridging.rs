//! What `bridge` and `mount` share: the two resources (GefyraBridge, GefyraBridgeMount) as
//! dynamic objects in Gefyra's wire layout, their progress as the operator records it
//! (`state`, `status.reason`, `status.message`), names, the API server's refusals, and
//! watching an object until the operator is done with it.

use std::time::Duration;

use futures::StreamExt;
use gefyra_api::bridge::{
    BRIDGE_KIND, BRIDGE_MOUNT_KIND, BRIDGE_MOUNT_PLURAL, BRIDGE_PLURAL, MAX_NAME_LENGTH,
};
use gefyra_api::client::{GROUP, VERSION};
use indicatif::{ProgressBar, ProgressStyle};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Deserialize;

use crate::error::{CliError, Kind, Result};
use crate::render::printable;

pub fn bridge_resource() -> ApiResource {
    resource(BRIDGE_KIND, BRIDGE_PLURAL)
}

pub fn mount_resource() -> ApiResource {
    resource(BRIDGE_MOUNT_KIND, BRIDGE_MOUNT_PLURAL)
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// An object's progress as the operator records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// `REQUESTED` until the operator writes one.
    pub state: Option<String>,
    pub status: ProgressStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ProgressStatus {
    pub reason: Option<String>,
    pub message: Option<String>,
}

impl Progress {
    /// A value that does not parse (a hostile or foreign object) shows as no progress.
    pub fn of(object: &DynamicObject) -> Self {
        serde_json::from_value(object.data.clone()).unwrap_or_default()
    }

    pub fn state(&self) -> &str {
        self.state.as_deref().unwrap_or("REQUESTED")
    }

    /// `STATE (Reason: message)`, or `STATE` when the operator has said nothing yet.
    pub fn describe(&self) -> String {
        let state = self.state();
        match (&self.status.reason, &self.status.message) {
            (Some(reason), Some(message)) if !message.is_empty() => {
                format!("{state} ({reason}: {message})")
            }
            (Some(reason), _) => format!("{state} ({reason})"),
            (None, Some(message)) if !message.is_empty() => format!("{state} ({message})"),
            _ => state.to_string(),
        }
    }
}

/// A name a GefyraBridge or GefyraBridgeMount may have: a DNS subdomain in lower case, at
/// most 63 characters (it is a label value of the bridges).
pub fn parse_object_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= MAX_NAME_LENGTH
        && text.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a valid name: at most {MAX_NAME_LENGTH} lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ))
    }
}

/// `part` cut to at most `length` characters, without a dangling `-` or `.` (names are
/// joined with `-`, and a DNS label may not end in either).
pub fn name_part(part: &str, length: usize) -> String {
    let cut: String = part.chars().take(length).collect();
    cut.trim_end_matches(['-', '.']).to_string()
}

/// Five random lower-case letters and digits, as Gefyra's CLI ends generated names.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..5)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

/// A create the API server refused, worded for the user: an admission policy's own message
/// (what it refuses and what to do) rather than the API server's preamble.
pub fn refused(what: &str, error: kube::Error) -> CliError {
    if let kube::Error::Api(status) = &error {
        let policy_message = status
            .message
            .split_once("denied request: ")
            .map(|(_, message)| message.trim().to_string());
        match (status.code, policy_message) {
            (403, Some(message)) => {
                return CliError::new(Kind::Forbidden, format!("{what} was refused: {message}"))
                    .with_detail(&error);
            }
            (409, _) if status.reason == "AlreadyExists" => {
                return CliError::new(
                    Kind::Conflict,
                    format!("{what} failed: the name is taken; choose another name"),
                )
                .with_detail(&error);
            }
            (404, _) => {
                return CliError::new(
                    Kind::NotFound,
                    format!(
                        "{what} failed: {} (is Gefyra installed with bridging, is the namespace right?)",
                        status.message
                    ),
                )
                .with_detail(&error);
            }
            _ => {}
        }
    }
    CliError::kube(what, error)
}

/// What a wait waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal<'a> {
    /// The object in this state; ERROR ends the wait.
    State(&'a str),
    /// No object of the name any more (the operator's clean-up done).
    Gone,
}

impl Goal<'_> {
    fn describe(&self) -> String {
        match self {
            Goal::State(state) => (*state).to_string(),
            Goal::Gone => "gone".to_string(),
        }
    }
}

/// How a wait for an object ended, when it did not reach its goal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitEnd {
    /// The object is in state ERROR.
    Failed(Progress),
    /// The object is gone.
    Gone,
    /// Time ran out; the last progress seen.
    TimedOut(Option<Progress>),
}

/// Watches `name` until `goal`; ERROR (unless waiting for it to go), a disappearance and
/// the timeout end the wait too. A spinner on a terminal shows the state meanwhile.
pub async fn watch(
    api: &Api<DynamicObject>,
    name: &str,
    goal: Goal<'_>,
    timeout: Duration,
) -> Result<std::result::Result<Option<DynamicObject>, WaitEnd>> {
    let spinner = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("a valid progress template"),
    );
    spinner.enable_steady_tick(Duration::from_millis(120));
    let waiting = format!("waiting for {} to be {}", printable(name), goal.describe());
    spinner.set_message(waiting.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api.clone(), config).default_backoff().boxed();
    let mut last: Option<Progress> = None;
    let mut listed = false;
    let watching = async {
        while let Some(event) = events.next().await {
            // What there is now: `None` when the object is gone.
            let object = match event {
                Ok(watcher::Event::Init) => {
                    listed = false;
                    continue;
                }
                Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                    listed = true;
                    Some(object)
                }
                Ok(watcher::Event::Delete(_)) => None,
                Ok(watcher::Event::InitDone) if !listed => None,
                Ok(watcher::Event::InitDone) => continue,
                // Not allowed to watch, or no such resource: waiting cannot work.
                Err(
                    watcher::Error::InitialListFailed(error)
                    | watcher::Error::WatchStartFailed(error),
                ) if matches!(&error, kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404)) =>
                {
                    return Err(CliError::kube(&format!("watching {name}"), error));
                }
                // Anything else is retried (with a backoff) until the timeout.
                Err(_) => continue,
            };
            let Some(object) = object else {
                return Ok(if goal == Goal::Gone {
                    Ok(None)
                } else {
                    Err(WaitEnd::Gone)
                });
            };
            let progress = Progress::of(&object);
            if goal == Goal::State(progress.state()) {
                return Ok(Ok(Some(object)));
            }
            spinner.set_message(format!("{waiting}: {}", printable(&progress.describe())));
            if goal != Goal::Gone && progress.state() == "ERROR" {
                return Ok(Err(WaitEnd::Failed(progress)));
            }
            last = Some(progress);
        }
        Ok(Err(WaitEnd::TimedOut(None)))
    };
    let outcome = tokio::time::timeout(timeout, watching).await;
    spinner.finish_and_clear();
    outcome.unwrap_or(Ok(Err(WaitEnd::TimedOut(last))))
}

/// The error for a wait that ended without its goal; `what` names the object
/// ("GefyraBridge x"), `goal` what was waited for ("ACTIVE"), `hint` what to do when it
/// failed or time ran out (the object stays).
pub fn wait_error(what: &str, goal: &str, timeout: Duration, end: WaitEnd, hint: &str) -> CliError {
    let hinted = |text: String| {
        if hint.is_empty() {
            text
        } else {
            format!("{text}; {hint}")
        }
    };
    match end {
        WaitEnd::Failed(progress) => CliError::new(
            Kind::InError,
            hinted(format!(
                "{what} is in state ERROR: {}",
                printable(&reason_and_message(&progress))
            )),
        ),
        WaitEnd::Gone => CliError::new(
            Kind::NotFound,
            format!("{what} was deleted while waiting for it to be {goal}"),
        ),
        WaitEnd::TimedOut(progress) => {
            let seen = progress.map_or_else(
                || "the operator has not recorded a state".to_string(),
                |progress| format!("it is {}", printable(&progress.describe())),
            );
            CliError::new(
                Kind::Timeout,
                hinted(format!(
                    "{what} is not {goal} after {}s: {seen}",
                    timeout.as_secs()
                )),
            )
        }
    }
}

/// `Reason: message` of an object in ERROR.
fn reason_and_message(progress: &Progress) -> String {
    let message = progress
        .status
        .message
        .clone()
        .filter(|message| !message.is_empty())
        .unwrap_or_else(|| "no message recorded".into());
    match &progress.status.reason {
        Some(reason) => format!("{reason}: {message}"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(data: serde_json::Value) -> DynamicObject {
        let mut object = DynamicObject::new("x", &bridge_resource());
        object.data = data;
        object
    }

    #[test]
    fn progress_reads_the_operators_state_and_why() {
        let waiting = Progress::of(&object(json!({
            "state": "INSTALLING",
            "status": {"reason": "WaitingForMount", "message": "waiting for GefyraBridgeMount web to be ACTIVE (it is INSTALLING)"}
        })));
        assert_eq!(
            waiting.describe(),
            "INSTALLING (WaitingForMount: waiting for GefyraBridgeMount web to be ACTIVE (it is INSTALLING))"
        );
        assert_eq!(Progress::of(&object(json!({}))).describe(), "REQUESTED");
        assert_eq!(
            Progress::of(&object(json!({"state": 7, "status": "x"}))),
            Progress::default(),
            "what does not parse shows as nothing"
        );
    }

    #[test]
    fn a_failed_wait_says_why_and_a_timeout_where_it_is_stuck() {
        let failed = Progress {
            state: Some("ERROR".into()),
            status: ProgressStatus {
                reason: Some("MountNotFound".into()),
                message: Some("GefyraBridgeMount web does not exist".into()),
            },
        };
        let error = wait_error(
            "GefyraBridge b",
            "ACTIVE",
            Duration::from_secs(5),
            WaitEnd::Failed(failed),
            "",
        );
        assert_eq!(error.kind, Kind::InError);
        assert_eq!(
            error.message,
            "GefyraBridge b is in state ERROR: MountNotFound: GefyraBridgeMount web does not exist"
        );
        let stuck = Progress {
            state: Some("INSTALLING".into()),
            status: ProgressStatus {
                reason: Some("Installing".into()),
                message: Some("waiting for the router to be Ready".into()),
            },
        };
        let error = wait_error(
            "GefyraBridgeMount m",
            "ACTIVE",
            Duration::from_secs(3),
            WaitEnd::TimedOut(Some(stuck)),
            "it stays; `kubectl gefyra mount list` shows it",
        );
        assert_eq!(error.kind, Kind::Timeout);
        assert_eq!(
            error.message,
            "GefyraBridgeMount m is not ACTIVE after 3s: it is INSTALLING (Installing: waiting for the router to be Ready); it stays; `kubectl gefyra mount list` shows it"
        );
    }

    #[test]
    fn names_are_label_values_and_cut_cleanly() {
        assert_eq!(parse_object_name("web.v2-a"), Ok("web.v2-a".into()));
        for bad in ["", "Web", "a_b", "-a", "a-", "a..b", &"a".repeat(64)] {
            assert!(parse_object_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(name_part("abc-def", 4), "abc");
        assert_eq!(name_part("ab.cd", 3), "ab");
        let suffix = random_suffix();
        assert!(
            suffix.len() == 5
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{suffix}"
        );
    }

    #[test]
    fn an_admission_refusal_is_the_policys_message() {
        let status = kube::core::Status {
            code: 403,
            reason: "Forbidden".into(),
            message: "gefyrabridges.gefyra.dev \"b\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'p' denied request: destinationIP 10.0.0.1 is neither the tunnel address of client a nor in its routed subnet".into(),
            ..kube::core::Status::default()
        };
        let error = refused(
            "creating GefyraBridge b",
            kube::Error::Api(Box::new(status)),
        );
        assert_eq!(error.kind, Kind::Forbidden);
        assert_eq!(
            error.message,
            "creating GefyraBridge b was refused: destinationIP 10.0.0.1 is neither the tunnel address of client a nor in its routed subnet"
        );
    }
}
