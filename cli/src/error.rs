//! Failures as the user sees them: one readable line on stderr and an exit code per kind,
//! so scripts can tell "not found" from "forbidden" from "the cluster is down".

use std::process::ExitCode;

/// What went wrong, by what the user can do about it. The discriminant is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything unexpected.
    Failed = 1,
    /// Wrong arguments (clap uses 2 as well).
    Usage = 2,
    /// No kubeconfig, or the API server cannot be reached.
    NoCluster = 3,
    /// The object asked for (a GefyraClient, bridge, mount, Service) does not exist.
    NotFound = 4,
    /// The API server refused the credentials or the request (401/403).
    Forbidden = 5,
    /// A wait ran out of time.
    Timeout = 6,
    /// The client file is missing, unreadable or not a Gefyra client file.
    BadClientFile = 7,
    /// The request conflicts with what exists: an ID that is taken, a client in the wrong state.
    Conflict = 8,
    /// The operator put the object (a client, a bridge, a mount) in state ERROR.
    InError = 9,
    /// The client file's credentials were revoked (the client was deleted).
    Revoked = 10,
}

/// An error for the user: `message` is the one line; `detail` is shown with `-v`.
#[derive(Debug)]
pub struct CliError {
    pub kind: Kind,
    pub message: String,
    pub detail: Option<String>,
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

impl CliError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl std::fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.kind as u8)
    }

    /// What is printed on stderr.
    pub fn render(&self, verbose: bool) -> String {
        match (&self.detail, verbose) {
            (Some(detail), true) => format!("error: {}\n  caused by: {detail}", self.message),
            _ => format!("error: {}", self.message),
        }
    }

    /// A failed API call, classified; `what` names the request ("reading GefyraClient x").
    pub fn kube(what: &str, error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(status) => {
                let (kind, hint) = match status.code {
                    401 => (
                        Kind::Forbidden,
                        "the API server did not accept the credentials (expired or revoked)",
                    ),
                    403 => (Kind::Forbidden, "forbidden"),
                    404 => (Kind::NotFound, "not found"),
                    409 => (Kind::Conflict, "conflict"),
                    422 => (Kind::Conflict, "rejected"),
                    _ => (Kind::Failed, "failed"),
                };
                let message = if status.message.is_empty() {
                    format!("{what}: {hint} ({})", status.code)
                } else {
                    format!("{what}: {hint}: {}", status.message)
                };
                Self::new(kind, message).with_detail(&error)
            }
            kube::Error::HyperError(_) | kube::Error::Service(_) => Self::new(
                Kind::NoCluster,
                format!("{what}: cannot reach the Kubernetes API server (is the cluster up, is the kubeconfig right?)"),
            )
            .with_detail(error_chain(&error)),
            _ => Self::new(Kind::Failed, format!("{what}: {error}")).with_detail(error_chain(&error)),
        }
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Many errors repeat their source in their own message already.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn api_errors_map_to_distinct_exit_codes() {
        let cases = [
            (401, Kind::Forbidden),
            (403, Kind::Forbidden),
            (404, Kind::NotFound),
            (409, Kind::Conflict),
            (422, Kind::Conflict),
            (500, Kind::Failed),
        ];
        for (code, kind) in cases {
            assert_eq!(
                CliError::kube("reading x", api_error(code, "m")).kind,
                kind,
                "{code}"
            );
        }
        let codes: std::collections::BTreeSet<u8> = [
            Kind::Failed,
            Kind::Usage,
            Kind::NoCluster,
            Kind::NotFound,
            Kind::Forbidden,
            Kind::Timeout,
            Kind::BadClientFile,
            Kind::Conflict,
            Kind::InError,
            Kind::Revoked,
        ]
        .into_iter()
        .map(|kind| kind as u8)
        .collect();
        assert_eq!(codes.len(), 10);
    }

    #[test]
    fn one_line_unless_verbose() {
        let error = CliError::kube("reading GefyraClient a", api_error(403, "no access"));
        assert_eq!(
            error.render(false),
            "error: reading GefyraClient a: forbidden: no access"
        );
        assert!(error.render(true).contains("\n  caused by: "));
    }
}
