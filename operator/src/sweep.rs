//! Every 30 s, the ranges of clients that no longer exist are freed — asking the API server
//! only when the caches show such a range.

use std::sync::Arc;
use std::time::Duration;

use gefyra_api::GefyraClient;
use gefyra_api::ipam::Routes;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::allocator;
use crate::context::Context;
use crate::routes;

/// Every 30 s, frees the ranges of clients that no longer exist (e.g. deleted while no
/// operator ran and their finalizer was forced away).
pub async fn sweep_allocations_forever(ctx: Arc<Context>) {
    loop {
        if let Err(error) = sweep_allocations(&ctx).await {
            warn!(%error, "sweeping stale allocations failed; trying again in 30 s");
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

/// Whether the caches show a claim or a route of a client they do not know (then the sweep
/// asks the API server; else it sends nothing). Unsure (a cache not synced yet): true.
fn may_hold_stale_ranges(ctx: &Context) -> bool {
    let (Some(clients), Some(routed)) = (ctx.clients.get(), ctx.routes.cached_uids()) else {
        return true;
    };
    let known: std::collections::BTreeSet<String> = clients
        .state()
        .iter()
        .filter_map(|client| client.metadata.uid.clone())
        .collect();
    let claimed = ctx
        .claims
        .store
        .state()
        .iter()
        .filter_map(|lease| allocator::claimed(lease).map(|(_, uid)| uid.to_string()))
        .collect::<Vec<_>>();
    claimed
        .iter()
        .chain(routed.iter())
        .any(|uid| !known.contains(uid))
}

async fn sweep_allocations(ctx: &Context) -> anyhow::Result<()> {
    if !may_hold_stale_ranges(ctx) {
        return Ok(());
    }
    let namespace = &ctx.settings.namespace;
    // Only entries seen *before* listing the clients are candidates: a claim or route made
    // after the list belongs to a client the list may not show yet.
    let claims_before: Vec<(String, String)> = ctx
        .claims
        .store
        .state()
        .iter()
        .filter_map(|lease| {
            let (_, uid) = allocator::claimed(lease)?;
            Some((lease.name_any(), uid.to_string()))
        })
        .collect();
    let routes_before = routes::read_shards(&ctx.client, namespace).await?;
    if claims_before.is_empty() && routes_before.values().all(Routes::is_empty) {
        return Ok(());
    }
    let clients: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), namespace);
    let live: std::collections::BTreeSet<String> = clients
        .list_metadata(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|client| client.metadata.uid)
        .collect();
    let mut swept: Vec<String> = Vec::new();
    for (name, uid) in claims_before.iter().filter(|(_, uid)| !live.contains(uid)) {
        ctx.claims.delete_if_held(name, uid).await?;
        swept.push(name.clone());
    }
    let routes = ctx.routes.sweep(&routes_before, &live).await?;
    swept.extend(routes.into_iter().map(|name| format!("route of {name}")));
    ctx.observe_pool();
    if !swept.is_empty() {
        info!(freed = ?swept, "freed the ranges of clients that no longer exist");
    }
    Ok(())
}
