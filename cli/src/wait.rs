//! Waiting for the operator: polls the client with `get` (all a client's own credentials
//! allow besides `watch`) until a condition holds, it fails, or time runs out.

use std::time::Duration;

use gefyra_api::{ClientState, GefyraClient};
use kube::Api;
use tokio::time::Instant;

use crate::error::{CliError, Kind, Result};

const POLL: Duration = Duration::from_millis(500);

/// What a wait is waiting for, for the messages.
pub struct Goal<'a> {
    pub description: &'a str,
    pub timeout: Duration,
    /// An ERROR seen while the client still has this resourceVersion predates the request
    /// being waited on (the operator has not acted on it yet), so it does not end the wait.
    pub stale_version: Option<String>,
}

/// Waits until `done(client)`; a client in state ERROR ends the wait with its reason, a
/// client that disappears with NotFound.
pub async fn until(
    api: &Api<GefyraClient>,
    name: &str,
    goal: &Goal<'_>,
    done: impl Fn(&GefyraClient) -> bool,
) -> Result<GefyraClient> {
    let deadline = Instant::now() + goal.timeout;
    loop {
        let state = match api.get_opt(name).await {
            Ok(Some(client)) => {
                if done(&client) {
                    return Ok(client);
                }
                if client.state == ClientState::Error
                    && client.metadata.resource_version != goal.stale_version
                {
                    return Err(in_error(&client));
                }
                client.state
            }
            Ok(None) => {
                return Err(CliError::new(
                    Kind::NotFound,
                    format!(
                        "GefyraClient {name} disappeared while waiting for it to be {}",
                        goal.description
                    ),
                ));
            }
            Err(error) => {
                return Err(CliError::kube(
                    &format!("reading GefyraClient {name}"),
                    error,
                ));
            }
        };
        if Instant::now() >= deadline {
            return Err(CliError::new(
                Kind::Timeout,
                format!(
                    "GefyraClient {name} is not {} after {}s (state {state}); is the operator running? `kubectl gefyra clients inspect {name}` shows its Events",
                    goal.description,
                    goal.timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the client is gone.
pub async fn until_gone(api: &Api<GefyraClient>, name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            Ok(Some(client)) => {
                return Err(CliError::new(
                    Kind::Timeout,
                    format!(
                        "GefyraClient {name} still exists after {}s (state {}); its clean-up may be blocked: `kubectl gefyra clients inspect {name}`",
                        timeout.as_secs(),
                        client.state
                    ),
                ));
            }
            Err(error) => {
                return Err(CliError::kube(
                    &format!("reading GefyraClient {name}"),
                    error,
                ));
            }
        }
    }
}

/// The error for a client the operator put in state ERROR.
pub fn in_error(client: &GefyraClient) -> CliError {
    let reason = client
        .ready_condition()
        .map(|condition| condition.message.clone())
        .filter(|message| !message.is_empty())
        .unwrap_or_else(|| "no reason recorded".into());
    CliError::new(
        Kind::InError,
        format!(
            "GefyraClient {} is in state ERROR: {reason}",
            kube::ResourceExt::name_any(client)
        ),
    )
}
