//! The last step of a reconcile: the `Ready` condition and the credentials' expiry in the
//! client's status, written only when they change.

use gefyra_api::GefyraClient;
use jiff::Timestamp;
use kube::ResourceExt;
use serde_json::json;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::lifecycle;

/// Records that the client is ready (connected or not), describing `generation`, and when
/// its credentials expire.
pub async fn record_ready(
    client: &GefyraClient,
    ctx: &Context,
    connected: bool,
    generation: Option<i64>,
    expires_at: Option<String>,
    now: Timestamp,
) -> Result<()> {
    let (reason, message) = if connected {
        (
            "Connected",
            "the client's credentials are ready and it is connected",
        )
    } else {
        ("CredentialsIssued", "the client's credentials are ready")
    };
    let condition = lifecycle::ready_condition(
        client.ready_condition(),
        true,
        reason,
        message,
        generation,
        now,
    );
    let status = client.status.clone().unwrap_or_default();
    let condition_changed = client.ready_condition().is_none_or(|c| {
        c.status != "True"
            || c.reason != condition.reason
            || c.observed_generation != condition.observed_generation
    });
    if !condition_changed && status.credentials_expire_at == expires_at {
        return Ok(());
    }
    let name = client.name_any();
    let patch =
        json!({ "status": { "conditions": [condition], "credentialsExpireAt": expires_at } });
    ctx.patch_client(client, true, patch, |source| Error::RecordCredentials {
        client: name.clone(),
        source,
    })
    .await?;
    Ok(())
}
