//! A GefyraBridge's routing contract: its `portMappings` and the rules in its
//! `providerParameter`, parsed and validated once (for the admission refusal, the operator's
//! status and the router alike) and compiled into a matcher the router asks per request.
//!
//! The wire format is Gefyra 2.x carrier2's:
//! `providerParameter: {rules: [{match: [{matchHeader: {name, value, type}} | {matchPath: {path, type}}, ..]}, ..]}`.
//! A request matches a bridge if ANY rule matches; a rule matches if ALL its entries hold.
//! Semantics follow carrier2 (gefyrahq/gefyra `carrier2/src/matching.rs`):
//! - `type` is `exact`, `prefix` or `regex`; absent means `exact`.
//! - A regex is unanchored (`is_match`): write `^`/`$` to anchor it.
//! - `matchPath` is tested against the request's path *with* its query (`/a?b=c`), as
//!   carrier2 does: a regex may select on a query parameter, and `exact` `/a` does not match
//!   `/a?b=c`.
//! - `matchHeader` holds if one header line satisfies both name and value, so any value of a
//!   repeated header may match. For `exact` and `prefix` the name is a header name compared
//!   case-insensitively and `type` applies to the value; for `regex` both name and value are
//!   regexes (carrier2's behaviour), the name one case-insensitive.
//!
//! Unlike carrier2 nothing here panics: every value is written by a client and hostile, so
//! sizes are bounded, unknown keys refused, and regexes compiled with small size limits (the
//! `regex` crate then matches in time linear in the input).

use std::fmt;

use regex::bytes::{Regex, RegexBuilder};
use serde_json::{Map, Value};

/// The label on a GefyraBridge naming its GefyraBridgeMount: the mount's router selects its
/// bridges by it.
pub use crate::bridge::MOUNT_LABEL as BRIDGE_MOUNT_LABEL;
/// The only `state` whose bridge is routed.
pub const ROUTED_STATE: &str = "ACTIVE";

pub const MAX_RULES: usize = 16;
pub const MAX_MATCHES_PER_RULE: usize = 8;
pub const MAX_PORT_MAPPINGS: usize = 16;
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Header values of `exact` and `prefix` entries.
pub const MAX_VALUE_LEN: usize = 1024;
/// Paths of `exact` and `prefix` entries.
pub const MAX_PATH_LEN: usize = 2048;
/// Any regex, header name, header value or path.
pub const MAX_REGEX_LEN: usize = 512;
/// The compiled program and the lazy DFA's cache of one regex: small enough that 16 rules of
/// 8 entries stay a few dozen MiB at worst, large enough for any pattern a person writes.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Group nesting; the crate's default (250) is more than any routing rule needs.
const REGEX_NEST_LIMIT: u32 = 32;

/// What is wrong with a bridge's `providerParameter` or `portMappings`, and where: `at` is the
/// field path (`providerParameter.rules[2].match[0].matchHeader.value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    at: String,
    problem: String,
}

impl RuleError {
    fn new(at: &str, problem: impl Into<String>) -> RuleError {
        RuleError {
            at: at.to_string(),
            problem: problem.into(),
        }
    }

    /// The field path of the offending value.
    pub fn at(&self) -> &str {
        &self.at
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.problem)
    }
}

impl std::error::Error for RuleError {}

/// One entry of `portMappings`: `"<local>:<remote>"`, the port on the developer's machine and
/// the container port in the cluster whose traffic is bridged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub local: u16,
    pub remote: u16,
}

/// Parses `portMappings`: at least one and at most [`MAX_PORT_MAPPINGS`] entries, each
/// `local:remote` with ports in 1..=65535, every remote port bridged once.
pub fn port_mappings(values: &[String]) -> Result<Vec<PortMapping>, RuleError> {
    if values.is_empty() {
        return Err(RuleError::new(
            "portMappings",
            "at least one \"<local port>:<container port>\" mapping is needed",
        ));
    }
    if values.len() > MAX_PORT_MAPPINGS {
        return Err(RuleError::new(
            "portMappings",
            format!(
                "{} mappings, at most {MAX_PORT_MAPPINGS} are allowed",
                values.len()
            ),
        ));
    }
    let mut mappings: Vec<PortMapping> = Vec::with_capacity(values.len());
    for (index, value) in values.iter().enumerate() {
        let at = format!("portMappings[{index}]");
        let mapping = value
            .split_once(':')
            .and_then(|(local, remote)| Some((port(local)?, port(remote)?)))
            .map(|(local, remote)| PortMapping { local, remote })
            .ok_or_else(|| {
                RuleError::new(
                    &at,
                    "must be \"<local port>:<container port>\", both in 1..=65535 (e.g. \"8080:80\")",
                )
            })?;
        if let Some(earlier) = mappings.iter().position(|m| m.remote == mapping.remote) {
            return Err(RuleError::new(
                &at,
                format!(
                    "container port {} is already mapped by portMappings[{earlier}]",
                    mapping.remote
                ),
            ));
        }
        mappings.push(mapping);
    }
    Ok(mappings)
}

/// A decimal port in 1..=65535, digits only (no sign, no spaces).
fn port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|port| *port != 0)
}

/// A bridge's compiled rules. Empty: the bridge takes all traffic of its ports (raw TCP).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// All entries must hold.
#[derive(Debug, Clone)]
struct Rule {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
enum Entry {
    Header(HeaderMatch),
    Path(ValueMatch),
}

#[derive(Debug, Clone)]
enum HeaderMatch {
    /// `exact`/`prefix`: a header name (ASCII lower case) and a test of its value.
    Named { name: String, value: ValueMatch },
    /// `regex`: one header line whose name matches `name` and whose value matches `value`.
    Pattern { name: Regex, value: Regex },
}

#[derive(Debug, Clone)]
enum ValueMatch {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    Regex(Regex),
}

impl ValueMatch {
    fn holds(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(expected) => value == expected.as_slice(),
            ValueMatch::Prefix(prefix) => value.starts_with(prefix),
            ValueMatch::Regex(regex) => regex.is_match(value),
        }
    }
}

#[derive(Clone, Copy)]
enum MatchType {
    Exact,
    Prefix,
    Regex,
}

impl Rules {
    /// Validates and compiles a bridge's `providerParameter`. Absent, `null`, `{}` or an
    /// empty/`null` `rules` list: no rules (all traffic).
    pub fn compile(provider_parameter: Option<&Value>) -> Result<Rules, RuleError> {
        const AT: &str = "providerParameter";
        let parameter = match provider_parameter {
            None | Some(Value::Null) => return Ok(Rules::default()),
            Some(Value::Object(parameter)) => parameter,
            Some(other) => return Err(not_a(AT, "an object", other)),
        };
        only_keys(parameter, AT, &["rules"])?;
        let rules = match parameter.get("rules") {
            None | Some(Value::Null) => return Ok(Rules::default()),
            Some(Value::Array(rules)) => rules,
            Some(other) => return Err(not_a(&format!("{AT}.rules"), "a list", other)),
        };
        if rules.len() > MAX_RULES {
            return Err(RuleError::new(
                &format!("{AT}.rules"),
                format!("{} rules, at most {MAX_RULES} are allowed", rules.len()),
            ));
        }
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, rule)| compile_rule(rule, &format!("{AT}.rules[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rules { rules })
    }

    /// No rules: the bridge takes all traffic of its ports, any protocol.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a request goes to this bridge: any rule whose entries all hold. Rule-less
    /// rules match every request.
    ///
    /// `path_and_query` is the request target's path with its query (`/a/b?c=d`).
    /// `headers` yields the request's header lines as (name, value) each time it is called
    /// (a header entry walks them once); it allocates nothing, e.g. for an `http::HeaderMap`:
    /// `|| map.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))`.
    pub fn matches<'h, F, I>(&self, path_and_query: &str, headers: F) -> bool
    where
        F: Fn() -> I,
        I: Iterator<Item = (&'h str, &'h [u8])>,
    {
        self.rules.is_empty()
            || self.rules.iter().any(|rule| {
                rule.entries.iter().all(|entry| match entry {
                    Entry::Path(test) => test.holds(path_and_query.as_bytes()),
                    Entry::Header(HeaderMatch::Named { name, value }) => {
                        headers().any(|(n, v)| n.eq_ignore_ascii_case(name) && value.holds(v))
                    }
                    Entry::Header(HeaderMatch::Pattern { name, value }) => {
                        headers().any(|(n, v)| name.is_match(n.as_bytes()) && value.is_match(v))
                    }
                })
            })
    }
}

fn compile_rule(rule: &Value, at: &str) -> Result<Rule, RuleError> {
    let rule = match rule {
        Value::Object(rule) => rule,
        other => return Err(not_a(at, "an object with a \"match\" list", other)),
    };
    only_keys(rule, at, &["match"])?;
    let at_match = format!("{at}.match");
    let entries = match rule.get("match") {
        Some(Value::Array(entries)) => entries,
        None => return Err(RuleError::new(&at_match, "is missing")),
        Some(other) => return Err(not_a(&at_match, "a list", other)),
    };
    if entries.is_empty() {
        // An empty AND would match every request; a bridge for all traffic has no rules.
        return Err(RuleError::new(
            &at_match,
            "is empty: a rule needs at least one matchHeader or matchPath (a bridge without rules takes all traffic)",
        ));
    }
    if entries.len() > MAX_MATCHES_PER_RULE {
        return Err(RuleError::new(
            &at_match,
            format!(
                "{} entries, at most {MAX_MATCHES_PER_RULE} are allowed",
                entries.len()
            ),
        ));
    }
    let entries = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| compile_entry(entry, &format!("{at_match}[{index}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule { entries })
}

fn compile_entry(entry: &Value, at: &str) -> Result<Entry, RuleError> {
    const EXPECTED: &str = "an object with exactly one of matchHeader or matchPath";
    let entry = match entry {
        Value::Object(entry) => entry,
        other => return Err(not_a(at, EXPECTED, other)),
    };
    only_keys(entry, at, &["matchHeader", "matchPath"])?;
    let mut keys = entry.iter();
    match (keys.next(), keys.next()) {
        (Some((key, value)), None) => {
            let at = format!("{at}.{key}");
            let fields = match value {
                Value::Object(fields) => fields,
                other => return Err(not_a(&at, "an object", other)),
            };
            if key == "matchHeader" {
                compile_header(fields, &at).map(Entry::Header)
            } else {
                compile_path(fields, &at).map(Entry::Path)
            }
        }
        _ => Err(RuleError::new(at, format!("must be {EXPECTED}"))),
    }
}

fn compile_header(fields: &Map<String, Value>, at: &str) -> Result<HeaderMatch, RuleError> {
    only_keys(fields, at, &["name", "value", "type"])?;
    let match_type = match_type(fields, at)?;
    let at_name = format!("{at}.name");
    let at_value = format!("{at}.value");
    let name = required_string(fields, "name", at)?;
    let value = required_string(fields, "value", at)?;
    match match_type {
        MatchType::Regex => Ok(HeaderMatch::Pattern {
            name: regex(name, &at_name, true)?,
            value: regex(value, &at_value, false)?,
        }),
        MatchType::Exact | MatchType::Prefix => {
            if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN {
                return Err(RuleError::new(
                    &at_name,
                    format!("must be 1 to {MAX_HEADER_NAME_LEN} characters"),
                ));
            }
            if !name.bytes().all(is_token_char) {
                return Err(RuleError::new(
                    &at_name,
                    "is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)",
                ));
            }
            if value.len() > MAX_VALUE_LEN {
                return Err(RuleError::new(
                    &at_value,
                    format!("is longer than {MAX_VALUE_LEN} bytes"),
                ));
            }
            if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(RuleError::new(
                    &at_value,
                    "contains a control character, which no header value can hold",
                ));
            }
            let bytes = value.as_bytes().to_vec();
            Ok(HeaderMatch::Named {
                name: name.to_ascii_lowercase(),
                value: match match_type {
                    MatchType::Exact => ValueMatch::Exact(bytes),
                    _ => ValueMatch::Prefix(bytes),
                },
            })
        }
    }
}

fn compile_path(fields: &Map<String, Value>, at: &str) -> Result<ValueMatch, RuleError> {
    only_keys(fields, at, &["path", "type"])?;
    let match_type = match_type(fields, at)?;
    let path = required_string(fields, "path", at)?;
    let at_path = format!("{at}.path");
    match match_type {
        MatchType::Regex => regex(path, &at_path, false).map(ValueMatch::Regex),
        MatchType::Exact | MatchType::Prefix => {
            if path.len() > MAX_PATH_LEN {
                return Err(RuleError::new(
                    &at_path,
                    format!("is longer than {MAX_PATH_LEN} bytes"),
                ));
            }
            // A request path starts with "/": anything else could never match.
            if !path.starts_with('/') {
                return Err(RuleError::new(&at_path, "must start with \"/\""));
            }
            if !path.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(RuleError::new(
                    &at_path,
                    "must be printable ASCII without spaces, as a request path is (percent-encode the rest)",
                ));
            }
            let bytes = path.as_bytes().to_vec();
            Ok(match match_type {
                MatchType::Exact => ValueMatch::Exact(bytes),
                _ => ValueMatch::Prefix(bytes),
            })
        }
    }
}

fn match_type(fields: &Map<String, Value>, at: &str) -> Result<MatchType, RuleError> {
    let at = format!("{at}.type");
    match fields.get("type") {
        None | Some(Value::Null) => Ok(MatchType::Exact),
        Some(Value::String(kind)) => match kind.as_str() {
            "exact" => Ok(MatchType::Exact),
            "prefix" => Ok(MatchType::Prefix),
            "regex" => Ok(MatchType::Regex),
            _ => Err(RuleError::new(&at, "must be one of exact, prefix, regex")),
        },
        Some(other) => Err(not_a(&at, "a string (exact, prefix or regex)", other)),
    }
}

fn required_string<'v>(
    fields: &'v Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<&'v str, RuleError> {
    let at = format!("{at}.{key}");
    match fields.get(key) {
        Some(Value::String(value)) => Ok(value),
        None | Some(Value::Null) => Err(RuleError::new(&at, "is missing")),
        Some(other) => Err(not_a(&at, "a string", other)),
    }
}

fn regex(pattern: &str, at: &str, case_insensitive: bool) -> Result<Regex, RuleError> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(RuleError::new(
            at,
            format!("the regex is longer than {MAX_REGEX_LEN} bytes"),
        ));
    }
    RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
        .map_err(|error| {
            RuleError::new(
                at,
                format!("the regex does not compile: {}", one_line(&error)),
            )
        })
}

/// A regex error on one line (a syntax error's display spans several, with a caret).
fn one_line(error: &regex::Error) -> String {
    let text = error.to_string();
    match text.lines().find_map(|line| line.strip_prefix("error: ")) {
        Some(reason) => reason.to_string(),
        None => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn only_keys(object: &Map<String, Value>, at: &str, allowed: &[&str]) -> Result<(), RuleError> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        None => Ok(()),
        Some(key) => Err(RuleError::new(
            at,
            format!(
                "unknown key {:?} (allowed: {})",
                truncated(key),
                allowed.join(", ")
            ),
        )),
    }
}

/// A client-written key, shortened so that an error message stays a line.
fn truncated(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn not_a(at: &str, expected: &str, found: &Value) -> RuleError {
    let found = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    RuleError::new(at, format!("must be {expected}, not {found}"))
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(parameter: Value) -> Result<Rules, RuleError> {
        Rules::compile(Some(&parameter))
    }

    fn refusal(parameter: Value) -> String {
        compile(parameter).expect_err("refused").to_string()
    }

    fn rules(entries: Value) -> Rules {
        compile(json!({"rules": [{"match": entries}]})).expect("compiles")
    }

    fn header(name: &str, value: &str, kind: &str) -> Value {
        json!({"matchHeader": {"name": name, "value": value, "type": kind}})
    }

    fn path(path: &str, kind: &str) -> Value {
        json!({"matchPath": {"path": path, "type": kind}})
    }

    /// Whether `rules` match a request with this target and these header lines.
    fn hit(rules: &Rules, target: &str, headers: &[(&str, &str)]) -> bool {
        rules.matches(target, || {
            headers
                .iter()
                .map(|(name, value)| (*name, value.as_bytes()))
        })
    }

    #[test]
    fn absent_null_or_empty_rules_take_all_traffic() {
        for parameter in [
            None,
            Some(json!(null)),
            Some(json!({})),
            Some(json!({"rules": null})),
            Some(json!({"rules": []})),
        ] {
            let rules = Rules::compile(parameter.as_ref()).expect("compiles");
            assert!(rules.is_empty(), "{parameter:?}");
            assert!(hit(&rules, "/anything", &[]), "{parameter:?}");
        }
        assert!(!rules(json!([path("/", "prefix")])).is_empty());
    }

    #[test]
    fn header_exact_prefix_and_names_case_insensitive() {
        let exact = rules(json!([header("X-Gefyra", "dev", "exact")]));
        assert!(hit(&exact, "/", &[("x-gefyra", "dev")]));
        assert!(hit(&exact, "/", &[("X-GEFYRA", "dev")]));
        assert!(!hit(&exact, "/", &[("x-gefyra", "dev2")]));
        assert!(
            !hit(&exact, "/", &[("x-gefyra", "Dev")]),
            "values are case-sensitive"
        );
        assert!(!hit(&exact, "/", &[("x-gefyra-other", "dev")]));
        assert!(!hit(&exact, "/", &[]));

        let prefix = rules(json!([header("x-gefyra", "dev", "prefix")]));
        assert!(hit(&prefix, "/", &[("x-gefyra", "dev")]));
        assert!(hit(&prefix, "/", &[("x-gefyra", "developer")]));
        assert!(!hit(&prefix, "/", &[("x-gefyra", "de")]));
        assert!(!hit(&prefix, "/", &[("x-gefyra2", "dev")]));
    }

    #[test]
    fn header_type_defaults_to_exact() {
        let rules = rules(json!([{"matchHeader": {"name": "x-gefyra", "value": "dev"}}]));
        assert!(hit(&rules, "/", &[("x-gefyra", "dev")]));
        assert!(!hit(&rules, "/", &[("x-gefyra", "developer")]));
    }

    #[test]
    fn any_value_of_a_repeated_header_may_match() {
        let rules = rules(json!([header("x-gefyra", "dev", "exact")]));
        assert!(hit(
            &rules,
            "/",
            &[
                ("x-gefyra", "other"),
                ("accept", "*/*"),
                ("X-Gefyra", "dev")
            ]
        ));
    }

    #[test]
    fn header_regex_matches_name_and_value_of_one_line_unanchored() {
        let rules = rules(json!([header(
            "x-gefyra-[a-z0-9]*",
            "michael[1-9]{0,2}$",
            "regex"
        )]));
        assert!(hit(&rules, "/", &[("x-gefyra-from123", "michael")]));
        assert!(hit(&rules, "/", &[("X-Gefyra-From", "michael12")]));
        assert!(!hit(&rules, "/", &[("x-gefyra-from", "michael123")]));
        assert!(!hit(&rules, "/", &[("g-gefyra", "michael")]));
        // Name and value must hold on the same line.
        assert!(!hit(
            &rules,
            "/",
            &[("x-gefyra-a", "nobody"), ("other", "michael")]
        ));
        // Unanchored, as carrier2's `is_match`.
        assert!(hit(&rules, "/", &[("my-x-gefyra-a", "not-michael")]));
    }

    #[test]
    fn path_exact_prefix_and_regex_see_the_query() {
        let exact = rules(json!([path("/api", "exact")]));
        assert!(hit(&exact, "/api", &[]));
        assert!(!hit(&exact, "/api/", &[]));
        assert!(!hit(&exact, "/api?x=1", &[]));

        let prefix = rules(json!([path("/api", "prefix")]));
        assert!(hit(&prefix, "/api", &[]));
        assert!(hit(&prefix, "/api/v1?x=1", &[]));
        assert!(!hit(&prefix, "/ap", &[]));
        assert!(!hit(&prefix, "/other/api", &[]));

        let regex = rules(json!([path("^/[a-z0-9-.]{2,}/michael", "regex")]));
        assert!(hit(&regex, "/my-path/michael", &[]));
        assert!(!hit(&regex, "/m/michael", &[]));
        let query = rules(json!([path("x-gefyra=michael", "regex")]));
        assert!(hit(&query, "/my-path/?x-gefyra=michael", &[]));
        assert!(!hit(&query, "/my-path/?x-gefyra=joe", &[]));
    }

    #[test]
    fn all_entries_of_a_rule_must_hold() {
        let rules = rules(json!([
            header("x-gefyra", "dev", "exact"),
            path("/api", "prefix")
        ]));
        assert!(hit(&rules, "/api/x", &[("x-gefyra", "dev")]));
        assert!(!hit(&rules, "/web", &[("x-gefyra", "dev")]));
        assert!(!hit(&rules, "/api/x", &[]));
    }

    #[test]
    fn any_rule_may_match() {
        let rules = compile(json!({"rules": [
            {"match": [header("x-gefyra", "dev", "exact")]},
            {"match": [path("/always", "prefix")]},
        ]}))
        .expect("compiles");
        assert!(hit(&rules, "/", &[("x-gefyra", "dev")]));
        assert!(hit(&rules, "/always/here", &[]));
        assert!(!hit(&rules, "/", &[("x-gefyra", "prod")]));
    }

    #[test]
    fn each_refusal_names_the_field_and_the_problem() {
        let cases = [
            (
                json!("rules"),
                "providerParameter: must be an object, not a string",
            ),
            (
                json!({"rules": [], "extra": 1}),
                "providerParameter: unknown key \"extra\" (allowed: rules)",
            ),
            (
                json!({"rules": {}}),
                "providerParameter.rules: must be a list, not an object",
            ),
            (
                json!({"rules": [[]]}),
                "providerParameter.rules[0]: must be an object with a \"match\" list, not a list",
            ),
            (
                json!({"rules": [{}]}),
                "providerParameter.rules[0].match: is missing",
            ),
            (
                json!({"rules": [{"match": [], "x": 1}]}),
                "providerParameter.rules[0]: unknown key \"x\" (allowed: match)",
            ),
            (
                json!({"rules": [{"match": []}]}),
                "providerParameter.rules[0].match: is empty",
            ),
            (
                json!({"rules": [{"match": [{}]}]}),
                "providerParameter.rules[0].match[0]: must be an object with exactly one of matchHeader or matchPath",
            ),
            (
                json!({"rules": [{"match": [{"matchPath": {"path": "/"}, "matchHeader": {"name": "a", "value": "b"}}]}]}),
                "providerParameter.rules[0].match[0]: must be an object with exactly one of",
            ),
            (
                json!({"rules": [{"match": [{"matchQuery": {}}]}]}),
                "providerParameter.rules[0].match[0]: unknown key \"matchQuery\"",
            ),
            (
                json!({"rules": [{"match": [{"matchPath": "/"}]}]}),
                "providerParameter.rules[0].match[0].matchPath: must be an object, not a string",
            ),
            (
                json!({"rules": [{"match": [{"matchHeader": {"name": "a", "value": "b", "negate": true}}]}]}),
                "providerParameter.rules[0].match[0].matchHeader: unknown key \"negate\"",
            ),
            (
                json!({"rules": [{"match": [{"matchHeader": {"value": "b"}}]}]}),
                "providerParameter.rules[0].match[0].matchHeader.name: is missing",
            ),
            (
                json!({"rules": [{"match": [{"matchHeader": {"name": "a"}}]}]}),
                "providerParameter.rules[0].match[0].matchHeader.value: is missing",
            ),
            (
                json!({"rules": [{"match": [{"matchPath": {"type": "prefix"}}]}]}),
                "providerParameter.rules[0].match[0].matchPath.path: is missing",
            ),
            (
                json!({"rules": [{"match": [{"matchPath": {"path": 5}}]}]}),
                "providerParameter.rules[0].match[0].matchPath.path: must be a string, not a number",
            ),
            (
                json!({"rules": [{"match": [path("/", "glob")]}]}),
                "providerParameter.rules[0].match[0].matchPath.type: must be one of exact, prefix, regex",
            ),
            (
                json!({"rules": [{"match": [{"matchPath": {"path": "/", "type": ["exact"]}}]}]}),
                "providerParameter.rules[0].match[0].matchPath.type: must be a string",
            ),
            (
                json!({"rules": [{"match": [path("api", "prefix")]}]}),
                "providerParameter.rules[0].match[0].matchPath.path: must start with \"/\"",
            ),
            (
                json!({"rules": [{"match": [path("/a b", "exact")]}]}),
                "providerParameter.rules[0].match[0].matchPath.path: must be printable ASCII",
            ),
            (
                json!({"rules": [{"match": [header("x gefyra", "dev", "exact")]}]}),
                "providerParameter.rules[0].match[0].matchHeader.name: is not an HTTP header name",
            ),
            (
                json!({"rules": [{"match": [header("", "dev", "prefix")]}]}),
                "providerParameter.rules[0].match[0].matchHeader.name: must be 1 to 256 characters",
            ),
            (
                json!({"rules": [{"match": [header("x", "a\r\nb", "exact")]}]}),
                "providerParameter.rules[0].match[0].matchHeader.value: contains a control character",
            ),
            (
                json!({"rules": [{"match": [path("/", "exact")]}, {"match": [header("x", "(", "regex")]}]}),
                "providerParameter.rules[1].match[0].matchHeader.value: the regex does not compile: unclosed group",
            ),
            (
                json!({"rules": [{"match": [header("x[", "a", "regex")]}]}),
                "providerParameter.rules[0].match[0].matchHeader.name: the regex does not compile",
            ),
        ];
        for (parameter, expected) in cases {
            let message = refusal(parameter.clone());
            assert!(
                message.starts_with(expected),
                "{parameter}\n  got:      {message}\n  expected: {expected}"
            );
        }
    }

    #[test]
    fn lengths_and_counts_are_bounded() {
        let too_many_rules: Vec<Value> = (0..=MAX_RULES)
            .map(|_| json!({"match": [path("/", "prefix")]}))
            .collect();
        assert_eq!(
            refusal(json!({"rules": too_many_rules})),
            "providerParameter.rules: 17 rules, at most 16 are allowed"
        );
        let at_most: Vec<Value> = (0..MAX_RULES)
            .map(|_| json!({"match": vec![path("/", "prefix"); MAX_MATCHES_PER_RULE]}))
            .collect();
        compile(json!({"rules": at_most})).expect("the limits themselves are allowed");
        assert_eq!(
            refusal(
                json!({"rules": [{"match": vec![path("/", "prefix"); MAX_MATCHES_PER_RULE + 1]}]})
            ),
            "providerParameter.rules[0].match: 9 entries, at most 8 are allowed"
        );

        let long = |n: usize| "a".repeat(n);
        let cases = [
            (
                header(&long(MAX_HEADER_NAME_LEN + 1), "v", "exact"),
                "matchHeader.name: must be 1 to 256 characters",
            ),
            (
                header("x", &long(MAX_VALUE_LEN + 1), "exact"),
                "matchHeader.value: is longer than 1024 bytes",
            ),
            (
                header("x", &long(MAX_REGEX_LEN + 1), "regex"),
                "matchHeader.value: the regex is longer than 512 bytes",
            ),
            (
                header(&long(MAX_REGEX_LEN + 1), "v", "regex"),
                "matchHeader.name: the regex is longer than 512 bytes",
            ),
            (
                path(&format!("/{}", long(MAX_PATH_LEN)), "prefix"),
                "matchPath.path: is longer than 2048 bytes",
            ),
            (
                path(&long(MAX_REGEX_LEN + 1), "regex"),
                "matchPath.path: the regex is longer than 512 bytes",
            ),
        ];
        for (entry, expected) in cases {
            assert_eq!(
                refusal(json!({"rules": [{"match": [entry]}]})),
                format!("providerParameter.rules[0].match[0].{expected}")
            );
        }
        rules(json!([header(
            &long(MAX_HEADER_NAME_LEN),
            &long(MAX_VALUE_LEN),
            "exact"
        )]));
        rules(json!([path(
            &format!("/{}", long(MAX_PATH_LEN - 1)),
            "exact"
        )]));
    }

    #[test]
    fn hostile_inputs_are_refused_without_panic() {
        // A repetition whose program would be huge: refused by the size limit, quickly.
        let message = refusal(json!({"rules": [{"match": [path("(a{1000}){1000}", "regex")]}]}));
        assert!(message.contains("the regex does not compile"), "{message}");
        let message =
            refusal(json!({"rules": [{"match": [header("x", "\\w{1000}\\w{1000}", "regex")]}]}));
        assert!(message.contains("the regex does not compile"), "{message}");
        let nested = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(
            refusal(json!({"rules": [{"match": [path(&nested, "regex")]}]}))
                .contains("does not compile")
        );

        // Ten thousand rules: refused by count before any is compiled.
        let many: Vec<Value> = (0..10_000)
            .map(|_| json!({"match": [path("(a{1000}){1000}", "regex")]}))
            .collect();
        assert!(refusal(json!({"rules": many})).contains("10000 rules"));

        // Deep JSON where a string belongs (serde_json's own limit is 128 levels).
        let deep: Value = serde_json::from_str(&format!("{}1{}", "[".repeat(120), "]".repeat(120)))
            .expect("parses");
        for parameter in [
            json!({"rules": deep.clone()}),
            json!({"rules": [deep.clone()]}),
            json!({"rules": [{"match": deep.clone()}]}),
            json!({"rules": [{"match": [{"matchPath": {"path": deep.clone()}}]}]}),
            json!({"rules": [{"match": [{"matchHeader": {"name": "x", "value": deep.clone()}}]}]}),
        ] {
            refusal(parameter);
        }

        // Every non-string type where a string belongs, and non-objects where objects belong.
        for odd in [
            json!(null),
            json!(true),
            json!(1.5),
            json!(-1),
            json!([]),
            json!({}),
        ] {
            refusal(
                json!({"rules": [{"match": [{"matchHeader": {"name": odd.clone(), "value": "v"}}]}]}),
            );
            refusal(
                json!({"rules": [{"match": [{"matchHeader": {"name": "x", "value": odd.clone()}}]}]}),
            );
            refusal(json!({"rules": [{"match": [odd.clone()]}]}));
            if !odd.is_null() && !odd.is_object() && !odd.is_array() {
                refusal(json!({"rules": odd.clone()}));
                refusal(odd.clone());
            }
        }

        // A long unknown key is shortened in the message.
        let key = "k".repeat(10_000);
        let message = refusal(json!({ key: 1 }));
        assert!(message.len() < 200, "{message}");

        // Non-ASCII and invalid UTF-8 in requests never panic.
        let rules = rules(json!([header("x", "ü.*", "regex"), path("^/ü", "regex")]));
        assert!(hit(&rules, "/üx", &[("x", "üü")]));
        assert!(!rules.matches("/ü", || [("x", &b"\xff\xfe"[..])].into_iter()));
    }

    #[test]
    fn port_mappings_parse_and_refuse() {
        let values = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            port_mappings(&values(&["8080:80", "9000:9000"])).expect("parses"),
            vec![
                PortMapping {
                    local: 8080,
                    remote: 80
                },
                PortMapping {
                    local: 9000,
                    remote: 9000
                }
            ]
        );
        assert_eq!(
            port_mappings(&values(&["1:65535", "1:1"])).expect("one local port may take two"),
            vec![
                PortMapping {
                    local: 1,
                    remote: 65535
                },
                PortMapping {
                    local: 1,
                    remote: 1
                }
            ]
        );
        let refused = |v: &[&str]| port_mappings(&values(v)).expect_err("refused").to_string();
        assert!(refused(&[]).starts_with("portMappings: at least one"));
        for bad in [
            "80",
            "0:80",
            "80:0",
            "65536:80",
            "80:65536",
            "+80:80",
            " 80:80",
            "80:80:80",
            ":80",
            "80:",
            "x:y",
            "-1:80",
            "99999999999999999999:1",
        ] {
            assert!(
                refused(&["1:1", bad])
                    .starts_with("portMappings[1]: must be \"<local port>:<container port>\""),
                "{bad}"
            );
        }
        assert_eq!(
            refused(&["8080:80", "8081:80"]),
            "portMappings[1]: container port 80 is already mapped by portMappings[0]"
        );
        let many: Vec<String> = (1..=17).map(|p| format!("{p}:{p}")).collect();
        assert_eq!(
            port_mappings(&many).expect_err("refused").to_string(),
            "portMappings: 17 mappings, at most 16 are allowed"
        );
    }
}
