//! GefyraBridges and GefyraBridgeMounts: served (in Gefyra's wire layout) so that Gefyra's
//! CLI can list a client's bridges, but not acted on yet. Every one the operator sees is put
//! in state ERROR with a reason saying so, with a Warning Event; nothing is bridged.

use std::sync::Arc;

use futures::StreamExt;
use gefyra_api::bridge::{self, NOT_SUPPORTED_MESSAGE, NOT_SUPPORTED_REASON};
use jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use crate::context::Context;
use crate::lifecycle::gefyra_time;

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(gefyra_api::client::GROUP, gefyra_api::client::VERSION, kind),
        plural,
    )
}

/// Watches both kinds in the operator's namespace and refuses each object once.
pub async fn refuse_forever(ctx: Arc<Context>) {
    let kinds = [
        resource(bridge::BRIDGE_KIND, bridge::BRIDGE_PLURAL),
        resource(bridge::BRIDGE_MOUNT_KIND, bridge::BRIDGE_MOUNT_PLURAL),
    ];
    let streams = kinds.map(|kind| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ctx.settings.namespace, &kind);
        watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .map(move |object| (kind.clone(), object))
            .boxed()
    });
    futures::stream::select_all(streams)
        .for_each_concurrent(4, |(kind, object)| {
            let ctx = ctx.clone();
            async move {
                match object {
                    Ok(object) => refuse(&ctx, &kind, &object).await,
                    Err(error) => {
                        warn!(kind = %kind.kind, %error, "watching bridges failed; retrying")
                    }
                }
            }
        })
        .await;
}

async fn refuse(ctx: &Context, kind: &ApiResource, object: &DynamicObject) {
    if object.data.get("state").and_then(|state| state.as_str()) == Some("ERROR") {
        return;
    }
    let name = object.name_any();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ctx.settings.namespace, kind);
    let patch = bridge::refusal(&gefyra_time(Timestamp::now()));
    if let Err(error) = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        warn!(kind = %kind.kind, %name, %error, "could not mark the bridge as not supported; retrying on its next change");
        return;
    }
    info!(kind = %kind.kind, %name, "bridging is not supported yet: state ERROR");
    let event = Event {
        type_: EventType::Warning,
        reason: NOT_SUPPORTED_REASON.into(),
        note: Some(NOT_SUPPORTED_MESSAGE.into()),
        action: "Refuse".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(kind)).await {
        warn!(kind = %kind.kind, %name, %error, "could not publish event {NOT_SUPPORTED_REASON}");
    }
}
