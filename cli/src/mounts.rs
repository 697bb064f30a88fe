//! `kubectl gefyra mount ...`: the admin's GefyraBridgeMounts. A mount puts a router in front
//! of a workload's Pods (its Services switched to the router, the Pods untouched) so that
//! developers can bridge its traffic; deleting it switches the Services back first.

use gefyra_api::bridge::{BRIDGE_MOUNT_KIND, MOUNT_PROVIDER, MountFields};
use gefyra_api::client::API_VERSION;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::args::{MountCreateArgs, MountDeleteArgs, MountListArgs, OutputFormat};
use crate::bridging::{
    Goal, Progress, mount_resource, name_part, random_suffix, refused, wait_error, watch,
};
use crate::cluster::Admin;
use crate::error::{CliError, Kind, Result};
use crate::render::{ListRow, TableView, list as render_list, or_dash, printable};

/// `KIND/NAME` of the workload and the container, from `--target` (Gefyra's
/// `KIND/NAME/CONTAINER` too) and `--container`.
pub fn target_of(target: &str, container: Option<&str>) -> Result<(String, Option<String>)> {
    let usage =
        |problem: String| CliError::new(Kind::Usage, format!("--target {target:?}: {problem}"));
    let parts: Vec<&str> = target.split('/').collect();
    let (workload, in_target) = match parts.as_slice() {
        [kind, name] => (format!("{kind}/{name}"), None),
        [kind, name, container] if !container.is_empty() => {
            (format!("{kind}/{name}"), Some((*container).to_string()))
        }
        _ => {
            return Err(usage(
                "use KIND/NAME (deployment/NAME, statefulset/NAME, pod/NAME), or Gefyra's KIND/NAME/CONTAINER".into(),
            ));
        }
    };
    gefyra_api::bridge::workload(&workload).map_err(usage)?;
    let container = match (in_target, container) {
        (Some(a), Some(b)) if a != b => {
            return Err(CliError::new(
                Kind::Usage,
                format!("--target names container {a:?} and --container {b:?}: give one"),
            ));
        }
        (in_target, flag) => in_target.or(flag.map(str::to_string)),
    };
    Ok((workload, container))
}

/// The name Gefyra's CLI would choose: `<workload>-<namespace>-<5 random>`.
pub fn default_name(workload: &str, namespace: &str, suffix: &str) -> String {
    let name = workload.rsplit('/').next().unwrap_or(workload);
    format!(
        "{}-{}-{suffix}",
        name_part(name, 25),
        name_part(namespace, 20)
    )
}

/// What `mount create` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub name: String,
    pub namespace: String,
    pub target_namespace: String,
    /// `KIND/NAME`.
    pub target: String,
    pub container: Option<String>,
}

impl MountRequest {
    /// The GefyraBridgeMount as Gefyra's CLI writes it (no TLS: an empty providerParameter).
    pub fn body(&self) -> Value {
        let mut body = json!({
            "apiVersion": API_VERSION,
            "kind": BRIDGE_MOUNT_KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "targetNamespace": self.target_namespace,
            "target": self.target,
            "provider": MOUNT_PROVIDER,
            "providerParameter": {},
        });
        if let Some(container) = &self.container {
            body["targetContainer"] = json!(container);
        }
        body
    }
}

/// What the operator records of an ACTIVE mount: the container ports its router takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
struct Routed {
    status: RoutedStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
struct RoutedStatus {
    ports: Vec<u16>,
}

fn routed(mount: &DynamicObject) -> RoutedStatus {
    serde_json::from_value::<Routed>(mount.data.clone())
        .unwrap_or_default()
        .status
}

/// One line of `mount list`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct MountRow {
    pub name: String,
    pub namespace: String,
    pub target: String,
    pub container: Option<String>,
    pub state: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// The container ports its router takes (once ACTIVE).
    pub ports: Vec<u16>,
    pub created: Option<String>,
}

impl MountRow {
    pub fn of(mount: &DynamicObject) -> Self {
        let fields: MountFields = serde_json::from_value(mount.data.clone()).unwrap_or_default();
        let progress = Progress::of(mount);
        Self {
            name: mount.name_any(),
            namespace: fields.target_namespace,
            target: fields.target,
            container: fields.target_container.filter(|c| !c.is_empty()),
            state: progress.state().to_string(),
            reason: progress.status.reason,
            message: progress.status.message,
            ports: routed(mount).ports,
            created: mount
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0.to_string()),
        }
    }
}

impl ListRow for MountRow {
    const KIND: &'static str = BRIDGE_MOUNT_KIND;
    const COLUMNS: &'static [&'static str] = &[
        "NAME",
        "NAMESPACE",
        "TARGET",
        "CONTAINER",
        "STATE",
        "REASON",
        "AGE",
    ];
    /// The container ports the router takes, the operator's message.
    const WIDE_COLUMNS: &'static [&'static str] = &["PORTS", "MESSAGE"];

    fn name(&self) -> &str {
        &self.name
    }

    fn cells(&self, wide: bool, view: &TableView) -> Vec<String> {
        let mut cells = vec![
            self.name.clone(),
            self.namespace.clone(),
            self.target.clone(),
            or_dash(&self.container),
            self.state.clone(),
            or_dash(&self.reason),
            view.age(self.created.as_deref()),
        ];
        if wide {
            let ports = (!self.ports.is_empty()).then(|| {
                self.ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            });
            cells.extend([or_dash(&ports), or_dash(&self.message)]);
        }
        cells
    }
}

/// What an ACTIVE mount routes, and how developers bridge it.
pub fn active_report(name: &str, fields: &MountFields, ports: &[u16]) -> String {
    let ports_text = if ports.is_empty() {
        "its Services' ports".to_string()
    } else {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let example = ports.first().map_or("PORT".to_string(), u16::to_string);
    [
        format!(
            "GefyraBridgeMount {name} is ACTIVE: a router is in front of {} in namespace {} (container ports {ports_text})",
            fields.target, fields.target_namespace
        ),
        format!(
            "Developers bridge it with: kubectl gefyra bridge create -f CLIENT_FILE --mount {name} -p {example}:LOCAL_PORT"
        ),
    ]
    .iter()
    .map(|line| format!("{}\n", printable(line)))
    .collect()
}

pub async fn create(admin: &Admin, args: &MountCreateArgs) -> Result<()> {
    let (target, container) = target_of(&args.target, args.container.as_deref())?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&target, &args.target_namespace, &random_suffix()));
    let request = MountRequest {
        name: name.clone(),
        namespace: admin.namespace.clone(),
        target_namespace: args.target_namespace.clone(),
        target,
        container,
    };
    let api: Api<DynamicObject> =
        Api::namespaced_with(admin.client.clone(), &admin.namespace, &mount_resource());
    let object: DynamicObject =
        serde_json::from_value(request.body()).expect("a mount is a DynamicObject");
    api.create(&PostParams::default(), &object)
        .await
        .map_err(|error| refused(&format!("creating GefyraBridgeMount {name}"), error))?;
    if args.no_wait {
        println!(
            "GefyraBridgeMount {} created for {} in namespace {}; not waiting for it to be ACTIVE (`kubectl gefyra mount list` shows its state)",
            printable(&name),
            printable(&request.target),
            printable(&request.target_namespace)
        );
        return Ok(());
    }
    let hint = format!(
        "the mount stays: `kubectl gefyra mount list -o wide` shows it, `kubectl gefyra mount delete {name}` removes it"
    );
    let mount = match watch(&api, &name, Goal::State("ACTIVE"), args.timeout).await? {
        Ok(Some(mount)) => mount,
        Ok(None) => unreachable!("a wait for a state ends with the object"),
        Err(end) => {
            return Err(wait_error(
                &format!("GefyraBridgeMount {name}"),
                "ACTIVE",
                args.timeout,
                end,
                &hint,
            ));
        }
    };
    let fields: MountFields = serde_json::from_value(mount.data.clone()).unwrap_or_default();
    print!("{}", active_report(&name, &fields, &routed(&mount).ports));
    Ok(())
}

pub async fn list(admin: &Admin, args: &MountListArgs) -> Result<()> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(admin.client.clone(), &admin.namespace, &mount_resource());
    let mut mounts = api
        .list(&ListParams::default())
        .await
        .map_err(|error| {
            CliError::kube(
                &format!(
                    "listing the GefyraBridgeMounts in namespace {}",
                    admin.namespace
                ),
                error,
            )
        })?
        .items;
    mounts.sort_by_key(|mount| {
        (
            mount.metadata.creation_timestamp.as_ref().map(|t| t.0),
            mount.name_any(),
        )
    });
    let rows: Vec<MountRow> = mounts.iter().map(MountRow::of).collect();
    if rows.is_empty() && matches!(args.output, OutputFormat::Table | OutputFormat::Wide) {
        eprintln!(
            "No GefyraBridgeMounts found in namespace {}",
            admin.namespace
        );
        return Ok(());
    }
    let view = TableView {
        headers: !args.no_headers,
        ..TableView::now()
    };
    print!("{}", render_list(&rows, args.output, view));
    Ok(())
}

pub async fn delete(admin: &Admin, args: &MountDeleteArgs) -> Result<()> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(admin.client.clone(), &admin.namespace, &mount_resource());
    for name in &args.names {
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(|error| match &error {
                kube::Error::Api(status) if status.code == 404 => CliError::new(
                    Kind::NotFound,
                    format!(
                        "GefyraBridgeMount {name} does not exist in namespace {} (`kubectl gefyra mount list` shows the mounts)",
                        admin.namespace
                    ),
                ),
                _ => refused(&format!("deleting GefyraBridgeMount {name}"), error),
            })?;
        if !args.wait {
            println!(
                "GefyraBridgeMount {} marked for deletion (its Services are switched back, then its router and bridges removed)",
                printable(name)
            );
            continue;
        }
        if let Err(end) = watch(&api, name, Goal::Gone, args.timeout).await? {
            return Err(wait_error(
                &format!("GefyraBridgeMount {name}"),
                "gone",
                args.timeout,
                end,
                "its clean-up (Services switched back, router and bridges removed) is not done: is the operator running? `kubectl gefyra mount list -o wide` shows why",
            ));
        }
        println!(
            "GefyraBridgeMount {} deleted: its workload's Services select its own Pods again",
            printable(name)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_ours_and_gefyras_notation() {
        assert_eq!(
            target_of("deployment/web", Some("web")).unwrap(),
            ("deployment/web".into(), Some("web".into()))
        );
        assert_eq!(
            target_of("deploy/web/app", None).unwrap(),
            ("deploy/web".into(), Some("app".into()))
        );
        assert_eq!(target_of("sts/db", None).unwrap(), ("sts/db".into(), None));
        for (bad, expected) in [
            ("web", "use KIND/NAME"),
            ("cronjob/x", "cannot be mounted"),
            ("deployment/", "names no workload"),
            ("a/b/c/d", "use KIND/NAME"),
        ] {
            let error = target_of(bad, None).unwrap_err();
            assert_eq!(error.kind, Kind::Usage);
            assert!(error.message.contains(expected), "{bad}: {}", error.message);
        }
        assert!(
            target_of("deployment/web/app", Some("other"))
                .unwrap_err()
                .message
                .contains("give one")
        );
    }

    #[test]
    fn the_mount_is_gefyras_wire_shape() {
        let request = MountRequest {
            name: default_name("deployment/web", "demo", "a1b2c"),
            namespace: "gefyra".into(),
            target_namespace: "demo".into(),
            target: "deployment/web".into(),
            container: Some("web".into()),
        };
        assert_eq!(
            request.body(),
            json!({
                "apiVersion": "gefyra.dev/v1",
                "kind": "gefyrabridgemount",
                "metadata": {"name": "web-demo-a1b2c", "namespace": "gefyra"},
                "targetNamespace": "demo",
                "target": "deployment/web",
                "targetContainer": "web",
                "provider": "carrier2mount",
                "providerParameter": {},
            })
        );
        let any_container = MountRequest {
            container: None,
            ..request
        };
        assert!(any_container.body().get("targetContainer").is_none());
        let long = default_name(
            &format!("deployment/{}", "w".repeat(60)),
            &"n".repeat(60),
            "a1b2c",
        );
        assert_eq!(long.len(), 25 + 20 + 5 + 2);
    }

    #[test]
    fn the_list_and_the_report() {
        let mut mount = DynamicObject::new("web-demo-a1b2c", &mount_resource());
        mount.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-07T14:00:00Z".parse().unwrap(),
            ));
        mount.data = json!({
            "targetNamespace": "demo", "target": "deployment/web", "targetContainer": "web",
            "state": "ACTIVE",
            "status": {"reason": "Ready", "message": "the router is in front", "ports": [80, 443], "services": ["web"]},
        });
        let rows = [MountRow::of(&mount)];
        let view = TableView {
            now: "2026-12-07T15:00:00Z".parse().unwrap(),
            headers: true,
        };
        assert_eq!(
            render_list(&rows, OutputFormat::Table, view),
            "NAME             NAMESPACE   TARGET           CONTAINER   STATE    REASON   AGE\n\
             web-demo-a1b2c   demo        deployment/web   web         ACTIVE   Ready    60m\n"
        );
        assert!(
            render_list(&rows, OutputFormat::Wide, view)
                .lines()
                .nth(1)
                .unwrap()
                .ends_with("60m   80,443   the router is in front")
        );
        assert_eq!(
            render_list(&rows, OutputFormat::Name, view),
            "gefyrabridgemount.gefyra.dev/web-demo-a1b2c\n"
        );
        let fields: MountFields = serde_json::from_value(mount.data.clone()).unwrap();
        assert_eq!(
            active_report("web-demo-a1b2c", &fields, &routed(&mount).ports),
            "GefyraBridgeMount web-demo-a1b2c is ACTIVE: a router is in front of deployment/web in namespace demo (container ports 80, 443)\n\
             Developers bridge it with: kubectl gefyra bridge create -f CLIENT_FILE --mount web-demo-a1b2c -p 80:LOCAL_PORT\n"
        );
    }
}
