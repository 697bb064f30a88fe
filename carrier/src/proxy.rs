//! What a reverse proxy does to a request and its response on the way through: hop-by-hop
//! headers removed (RFC 9110 §7.6.1), an upgrade (WebSocket) carried through, a URI the
//! pooled client can key on, and the 502 that names what failed.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// What the router answers with: the upstream's body, or its own short text.
pub type Body = Either<Incoming, Full<Bytes>>;

/// Removed on every hop, besides what `Connection` names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` and
/// `Upgrade: ...`), carried through to the upstream when present.
pub fn upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    connection_tokens(headers)
        .any(|token| token.eq_ignore_ascii_case("upgrade"))
        .then(|| headers.get(UPGRADE).cloned())
        .flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Removes the hop-by-hop headers; with `upgrade`, puts back `Connection: upgrade` and that
/// `Upgrade`. `te: trailers` stays (gRPC needs it, and it is end-to-end in meaning).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let keeps_trailers = headers
        .get_all(TE)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(UPGRADE);
    if keeps_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if let Some(protocol) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
}

/// hyper-util's client keys its pool on, and needs, an absolute URI: an origin-form request
/// (`/path`) gets `http://<its Host>` (or `fallback` without one). The client sends HTTP/1
/// requests in origin form again and HTTP/2 ones with this authority, so a request leaves as
/// it came.
pub fn absolute_uri(request: &Request<Incoming>, fallback: &Authority) -> Uri {
    let uri = request.uri();
    if uri.scheme().is_some() && uri.authority().is_some() {
        return uri.clone();
    }
    let authority = request
        .headers()
        .get(HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .unwrap_or_else(|| fallback.clone());
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The request target the rules match against: path with query.
pub fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", PathAndQuery::as_str)
}

/// Whether the request is HTTP/2 (then it goes to the upstream as h2c).
pub fn is_http2(request: &Request<Incoming>) -> bool {
    request.version() == Version::HTTP_2
}

/// A short plain-text answer of the router's own.
pub fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body + "\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error and its causes on one line (`a: b: c`), each cause once.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
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

    fn named(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut map = headers(&[
            ("host", "web"),
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("proxy-authorization", "Basic x"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("upgrade", "websocket"),
            ("x-gefyra", "dev"),
        ]);
        strip_hop_by_hop(&mut map, None);
        assert_eq!(named(&map), ["host", "x-gefyra"]);

        let mut grpc = headers(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut grpc, None);
        assert_eq!(
            grpc.get(TE).map(HeaderValue::as_bytes),
            Some(&b"trailers"[..])
        );
    }

    #[test]
    fn an_upgrade_is_carried_through() {
        let mut map = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        let protocol = upgrade(&map);
        assert_eq!(
            protocol.as_ref().map(HeaderValue::as_bytes),
            Some(&b"websocket"[..])
        );
        strip_hop_by_hop(&mut map, protocol);
        assert_eq!(named(&map), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(map[CONNECTION], "upgrade");

        assert!(
            upgrade(&headers(&[("upgrade", "websocket")])).is_none(),
            "Connection must name it"
        );
        assert!(
            upgrade(&headers(&[("connection", "upgrade")])).is_none(),
            "no protocol"
        );
    }

    #[test]
    fn chains_read_as_one_line() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        assert_eq!(chain(&outer), "refused");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = Wrap(std::io::Error::other("connecting to x:1: refused"));
        assert_eq!(
            chain(&wrapped),
            "client error (Connect): connecting to x:1: refused"
        );
    }
}
