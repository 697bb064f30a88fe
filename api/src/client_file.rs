//! The client file an admin hands a developer: Gefyra 2.x's format, byte for byte as its
//! CLI writes it (Python's `json.dumps`: keys in a fixed order, `", "` and `": "` between
//! items, non-ASCII escaped), so files from either tool work with both.

use std::io;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize};

use crate::client::Provider;
use crate::connection::Endpoint;

/// One client file. `token` and `ca_crt` stay base64, as Gefyra copies them.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct ClientFile {
    pub client_id: String,
    pub kubernetes_server: String,
    pub provider: String,
    pub namespace: String,
    /// `host:port` of Stowaway's WireGuard endpoint.
    pub gefyra_server: String,
    pub token: Option<String>,
    pub ca_crt: Option<String>,
    pub registry: Option<String>,
    /// A string, as Gefyra writes it; numbers are accepted when reading.
    #[serde(default, deserialize_with = "text_or_number")]
    pub wireguard_mtu: Option<String>,
    /// Absent in Gefyra's format (`token` is the client's own bearer token);
    /// [`TOKEN_MINTER`] when `token` may only mint short-lived tokens for the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The `credential` of a short-lived client file.
pub const TOKEN_MINTER: &str = "token-minter";

impl std::fmt::Debug for ClientFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in a log line.
        f.debug_struct("ClientFile")
            .field("client_id", &self.client_id)
            .field("kubernetes_server", &self.kubernetes_server)
            .field("namespace", &self.namespace)
            .field("gefyra_server", &self.gefyra_server)
            .finish_non_exhaustive()
    }
}

fn text_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrNumber {
        Text(String),
        Number(u64),
    }
    Ok(
        Option::<TextOrNumber>::deserialize(deserializer)?.map(|value| match value {
            TextOrNumber::Text(text) => text,
            TextOrNumber::Number(number) => number.to_string(),
        }),
    )
}

/// What is wrong with a client file, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientFileError {
    #[error("it is not a Gefyra client file (JSON): {0}")]
    NotJson(String),
    #[error("`{field}` is empty")]
    Empty { field: &'static str },
    #[error("`{field}` {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

/// The credentials a client file carries, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct FileCredentials {
    pub token: String,
    /// PEM, as a kubeconfig's `certificate-authority-data` holds it (base64 of this).
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for FileCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileCredentials { .. }")
    }
}

impl ClientFile {
    /// Parses and checks a client file: every field the CLI relies on must be usable.
    pub fn parse(text: &str) -> Result<Self, ClientFileError> {
        let file: Self = serde_json::from_str(text)
            .map_err(|error| ClientFileError::NotJson(error.to_string()))?;
        for (field, value) in [
            ("client_id", &file.client_id),
            ("kubernetes_server", &file.kubernetes_server),
            ("namespace", &file.namespace),
            ("gefyra_server", &file.gefyra_server),
        ] {
            if value.trim().is_empty() {
                return Err(ClientFileError::Empty { field });
            }
        }
        if serde_json::from_value::<Provider>(file.provider.clone().into()).is_err() {
            return Err(ClientFileError::Invalid {
                field: "provider",
                problem: format!("is {:?}; only \"stowaway\" is supported", file.provider),
            });
        }
        if !(file.kubernetes_server.starts_with("https://")
            || file.kubernetes_server.starts_with("http://"))
        {
            return Err(ClientFileError::Invalid {
                field: "kubernetes_server",
                problem: format!("{:?} is not an http(s) URL", file.kubernetes_server),
            });
        }
        file.endpoint()?;
        file.credentials()?;
        file.mtu()?;
        if let Some(credential) = &file.credential
            && credential != TOKEN_MINTER
        {
            return Err(ClientFileError::Invalid {
                field: "credential",
                problem: format!("is {credential:?}; this CLI knows only \"{TOKEN_MINTER}\""),
            });
        }
        Ok(file)
    }

    /// Whether `token` is only a token minter's (short-lived credentials via `get-token`).
    pub fn is_short_lived(&self) -> bool {
        self.credential.as_deref() == Some(TOKEN_MINTER)
    }

    /// Stowaway's endpoint from `gefyra_server`: a host name or IP address and a port, so
    /// nothing else can reach the WireGuard configuration written from it.
    pub fn endpoint(&self) -> Result<Endpoint, ClientFileError> {
        self.gefyra_server
            .parse()
            .map_err(|problem| ClientFileError::Invalid {
                field: "gefyra_server",
                problem,
            })
    }

    /// The decoded token and CA certificate.
    pub fn credentials(&self) -> Result<FileCredentials, ClientFileError> {
        let decode = |field: &'static str, value: &Option<String>| {
            let value = value.as_deref().ok_or(ClientFileError::Empty { field })?;
            STANDARD
                .decode(value.trim())
                .map_err(|_| ClientFileError::Invalid {
                    field,
                    problem: "is not base64 (it is copied from the client's serviceAccountData)"
                        .into(),
                })
        };
        let token = String::from_utf8(decode("token", &self.token)?)
            .ok()
            .filter(|token| !token.trim().is_empty())
            .ok_or(ClientFileError::Invalid {
                field: "token",
                problem: "does not hold a bearer token".into(),
            })?;
        let ca_pem = decode("ca_crt", &self.ca_crt)?;
        if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(ClientFileError::Invalid {
                field: "ca_crt",
                problem: "does not hold a PEM certificate".into(),
            });
        }
        Ok(FileCredentials {
            token: token.trim().to_string(),
            ca_pem,
        })
    }

    /// The MTU the tunnel should use, if the admin set one.
    pub fn mtu(&self) -> Result<Option<u16>, ClientFileError> {
        let Some(mtu) = self.wireguard_mtu.as_deref() else {
            return Ok(None);
        };
        match mtu.trim().parse::<u16>() {
            Ok(value) if value >= 576 => Ok(Some(value)),
            _ => Err(ClientFileError::Invalid {
                field: "wireguard_mtu",
                problem: format!("{mtu:?} is not an MTU (a number from 576 to 65535)"),
            }),
        }
    }

    /// The file as Gefyra's CLI writes it (no trailing newline).
    pub fn to_gefyra_json(&self) -> String {
        let mut bytes = Vec::new();
        let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, PythonJson);
        self.serialize(&mut serializer)
            .expect("a client file serializes to JSON");
        String::from_utf8(bytes).expect("escaped JSON is ASCII")
    }
}

/// `json.dumps` with its defaults: `", "` and `": "` separators, `ensure_ascii=True`.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for character in fragment.chars() {
            if (' '..='~').contains(&character) {
                writer.write_all(&[character as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn file() -> ClientFile {
        ClientFile {
            client_id: "0123456789abcdef0123456789abcdef".into(),
            kubernetes_server: "https://127.0.0.1:6443".into(),
            provider: "stowaway".into(),
            namespace: "gefyra".into(),
            gefyra_server: "203.0.113.7:31820".into(),
            token: Some(STANDARD.encode("eyJhbGciOi.token")),
            ca_crt: Some(STANDARD.encode(CA)),
            registry: None,
            wireguard_mtu: None,
            credential: None,
        }
    }

    #[test]
    fn written_exactly_as_gefyras_json_dumps_writes_it() {
        // What Python 3 prints for json.dumps(GefyraClientConfig(...).__dict__).
        let expected = format!(
            "{{\"client_id\": \"0123456789abcdef0123456789abcdef\", \"kubernetes_server\": \"https://127.0.0.1:6443\", \
             \"provider\": \"stowaway\", \"namespace\": \"gefyra\", \"gefyra_server\": \"203.0.113.7:31820\", \
             \"token\": \"{}\", \"ca_crt\": \"{}\", \"registry\": null, \"wireguard_mtu\": null}}",
            STANDARD.encode("eyJhbGciOi.token"),
            STANDARD.encode(CA)
        );
        assert_eq!(file().to_gefyra_json(), expected);
        let mut other = file();
        other.registry = Some("régistry\u{7f}\u{1F600}\n".into());
        other.wireguard_mtu = Some("1380".into());
        let json = other.to_gefyra_json();
        assert!(
            json.ends_with(
                r#""registry": "r\u00e9gistry\u007f\ud83d\ude00\n", "wireguard_mtu": "1380"}"#
            ),
            "{json}"
        );
    }

    #[test]
    fn short_lived_files_are_marked_after_gefyras_keys() {
        let mut short = file();
        short.credential = Some(TOKEN_MINTER.into());
        let json = short.to_gefyra_json();
        assert!(
            json.ends_with(r#""wireguard_mtu": null, "credential": "token-minter"}"#),
            "{json}"
        );
        assert!(ClientFile::parse(&json).unwrap().is_short_lived());
        assert!(
            !ClientFile::parse(&file().to_gefyra_json())
                .unwrap()
                .is_short_lived()
        );
        let unknown = json.replace("token-minter", "magic");
        assert!(
            ClientFile::parse(&unknown)
                .unwrap_err()
                .to_string()
                .contains("`credential`")
        );
    }

    #[test]
    fn parses_what_it_writes_and_decodes_the_credentials() {
        let parsed = ClientFile::parse(&file().to_gefyra_json()).unwrap();
        assert_eq!(parsed, file());
        let credentials = parsed.credentials().unwrap();
        assert_eq!(credentials.token, "eyJhbGciOi.token");
        assert_eq!(credentials.ca_pem, CA.as_bytes());
        assert_eq!(parsed.endpoint().unwrap().to_string(), "203.0.113.7:31820");
        assert!(!format!("{parsed:?} {credentials:?}").contains("token\""));
        assert!(!format!("{credentials:?}").contains("eyJ"));
    }

    #[test]
    fn numbers_for_the_mtu_and_unknown_keys_are_accepted() {
        let mut json: serde_json::Value = serde_json::from_str(&file().to_gefyra_json()).unwrap();
        json["wireguard_mtu"] = 1380.into();
        json["future_key"] = "kept out".into();
        let parsed = ClientFile::parse(&json.to_string()).unwrap();
        assert_eq!(parsed.mtu().unwrap(), Some(1380));
    }

    #[test]
    fn bad_files_name_the_field() {
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut json = serde_json::to_value(file()).unwrap();
            change(&mut json);
            ClientFile::parse(&json.to_string())
                .unwrap_err()
                .to_string()
        };
        assert!(
            ClientFile::parse("not json")
                .unwrap_err()
                .to_string()
                .contains("not a Gefyra client file")
        );
        assert!(with(&|j| j["token"] = "%%%".into()).contains("`token` is not base64"));
        assert!(with(&|j| j["token"] = serde_json::Value::Null).contains("`token` is empty"));
        assert!(
            with(&|j| j["ca_crt"] = STANDARD.encode("hello").into())
                .contains("`ca_crt` does not hold a PEM")
        );
        assert!(with(&|j| j["gefyra_server"] = "203.0.113.7".into()).contains("`gefyra_server`"));
        assert!(with(&|j| j["gefyra_server"] = "host:99999".into()).contains("HOST:PORT"));
        assert!(with(&|j| j["provider"] = "carrier".into()).contains("`provider`"));
        assert!(with(&|j| j["client_id"] = "".into()).contains("`client_id` is empty"));
        assert!(with(&|j| j["kubernetes_server"] = "127.0.0.1".into()).contains("http(s) URL"));
        assert!(with(&|j| j["wireguard_mtu"] = "12".into()).contains("`wireguard_mtu`"));
        assert!(
            with(&|j| {
                j.as_object_mut().unwrap().remove("namespace");
            })
            .contains("namespace")
        );
    }
}
