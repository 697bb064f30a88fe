//! Golden tests for what `clients list` and `clients inspect` print. Regenerate after an
//! intended change with `UPDATE_GOLDEN=1 cargo test -p kubectl-gefyra --test golden`.

use std::path::PathBuf;

use gefyra_api::GefyraClient;
use k8s_openapi::api::core::v1::Event;
use kubectl_gefyra::args::OutputFormat;
use kubectl_gefyra::render::{ClientRow, Inspection, TableView, client_list};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let text = std::fs::read_to_string(golden_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing: run with UPDATE_GOLDEN=1", path.display()));
    assert!(
        expected == actual,
        "{name} differs from the golden file; if the change is intended, run with UPDATE_GOLDEN=1\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

#[test]
fn client_list_in_every_format() {
    let clients: Vec<GefyraClient> = fixture("clients.json");
    let rows: Vec<ClientRow> = clients.iter().map(ClientRow::of).collect();
    // Ages are measured against a fixed time, so the table does not change with the clock.
    let view = TableView {
        now: "2026-11-23T10:00:00Z".parse().unwrap(),
        headers: true,
    };
    let without_headers = TableView {
        headers: false,
        ..view
    };
    for (format, view, name) in [
        (OutputFormat::Table, view, "list.txt"),
        (OutputFormat::Table, without_headers, "list-no-headers.txt"),
        (OutputFormat::Wide, view, "list-wide.txt"),
        (OutputFormat::Json, view, "list.json"),
        (OutputFormat::Yaml, view, "list.yaml"),
        (OutputFormat::Name, view, "list.name"),
    ] {
        let output = client_list(&rows, format, view);
        assert!(!output.contains("c2VjcmV0"), "no credentials in {name}");
        check(name, &output);
    }
}

#[test]
fn inspect_in_every_format() {
    let clients: Vec<GefyraClient> = fixture("clients.json");
    let events: Vec<Event> = fixture("events.json");
    let inspection = Inspection::of(&clients[1], Some(&events));
    for (format, name) in [
        (OutputFormat::Table, "inspect.txt"),
        (OutputFormat::Json, "inspect.json"),
        (OutputFormat::Yaml, "inspect.yaml"),
    ] {
        let output = inspection.render(format);
        assert!(
            !output.contains("c2VjcmV0"),
            "no credentials or keys in {name}"
        );
        check(name, &output);
    }
    check(
        "inspect-error.txt",
        &Inspection::of(&clients[2], None).render(OutputFormat::Table),
    );
}

#[test]
fn exec_credentials_in_both_versions() {
    use kubectl_gefyra::credential::{EXEC_V1, EXEC_V1BETA1, exec_credential};
    let expires_at: jiff::Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
    check(
        "exec-credential-v1.json",
        &exec_credential(EXEC_V1, "eyJhbGciOiJSUzI1NiJ9.minted", Some(expires_at)),
    );
    check(
        "exec-credential-v1beta1.json",
        &exec_credential(
            EXEC_V1BETA1,
            "eyJhbGciOiJSUzI1NiJ9.minted",
            Some(expires_at),
        ),
    );
    check(
        "exec-credential-long-lived.json",
        &exec_credential(EXEC_V1, "eyJhbGciOiJSUzI1NiJ9.file", None),
    );
}
