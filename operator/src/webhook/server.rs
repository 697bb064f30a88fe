//! The webhook's TLS listener, bounded: whoever reaches the port (the API server, but also
//! any peer routed to it) costs at most one connection slot of [`Limits::connections`],
//! each for a bounded time and a bounded body. A connection carries one review: one that
//! does not finish its TLS handshake, its headers or its request in time is closed; a body
//! larger than a review is refused from its headers (413) without being read; past the
//! cap, connections wait in the kernel's accept queue, unread. The API server fails open
//! (`failurePolicy: Ignore`) when it cannot get an answer in time, and the operator's own
//! check still decides.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::PATH;
use super::certificate::CertificateResolver;

/// What one sender may cost the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// To finish the TLS handshake after the connection is accepted.
    pub handshake: Duration,
    /// To send the request's headers, once the handshake is done.
    pub headers: Duration,
    /// To send the body, once the headers are in, and be answered; the connection as a
    /// whole (after the handshake) ends within `headers + request`.
    pub request: Duration,
    /// The largest body read (an AdmissionReview of a GefyraClient is a few KiB).
    pub body: usize,
    /// Connections served at once; more wait to be accepted.
    pub connections: usize,
}

impl Limits {
    /// The API server waits 5 s (the configuration's `timeoutSeconds`) for an answer, so a
    /// real review is done well within each of these.
    pub const DEFAULT: Self = Self {
        handshake: Duration::from_secs(5),
        headers: Duration::from_secs(5),
        request: Duration::from_secs(10),
        body: 64 * 1024,
        connections: 64,
    };
}

/// Answers a review body with the review's answer (JSON).
pub type Answer = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// TLS with the certificate `resolver` holds at each handshake, HTTP/1.1 only.
pub fn tls_acceptor(
    resolver: Arc<CertificateResolver>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves reviews at [`PATH`] on `listener` within `limits`, forever.
pub async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: Limits,
    answer: Answer,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        // A connection is accepted only with a slot for it: the rest wait, unread.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, say: wait a little rather than spin.
                warn!(%error, "accepting a webhook connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let answer = answer.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return debug!(%error, "a webhook TLS handshake failed"),
                Err(_) => return debug!("a webhook TLS handshake took too long; closed"),
            };
            serve_connection(TokioIo::new(stream), limits, answer).await;
        });
    }
}

/// One connection's review, within `limits`. One review a connection: the API server
/// sends a review only when a client asks for a subnet, and a connection kept idle could
/// be closed by the webhook just as the API server reuses it.
async fn serve_connection<IO>(io: TokioIo<IO>, limits: Limits, answer: Answer)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let answer = answer.clone();
        async move { Ok::<_, Infallible>(respond(request, limits, &answer).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(limits.headers)
        // Headers of a review are a few hundred bytes (hyper's default buffer is 408 KiB).
        .max_buf_size(16 * 1024)
        .max_headers(32)
        .serve_connection(io, service);
    // The whole connection's deadline, too: an answer the sender does not read holds it.
    match tokio::time::timeout(limits.headers + limits.request, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "a webhook connection ended"),
        Err(_) => debug!("a webhook connection outlived its deadline; closed"),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, "text/plain".parse().expect("a valid header"));
    response
}

/// The same, and the connection closed after it (its body, if any, is never read).
fn closing(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = plain(status, text);
    response
        .headers_mut()
        .insert(CONNECTION, "close".parse().expect("a valid header"));
    response
}

/// Whether the headers announce a body larger than `limit`.
pub fn announced_too_large(request: &Request<impl hyper::body::Body>, limit: usize) -> bool {
    request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length > limit as u64)
}

async fn respond(
    request: Request<Incoming>,
    limits: Limits,
    answer: &Answer,
) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return closing(
            StatusCode::NOT_FOUND,
            "not found; the webhook answers at /validate-subnet",
        );
    }
    if request.method() != Method::POST {
        return closing(StatusCode::METHOD_NOT_ALLOWED, "send the review with POST");
    }
    let too_large = || {
        closing(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the review is larger than {} bytes", limits.body),
        )
    };
    if announced_too_large(&request, limits.body) {
        return too_large();
    }
    let body = Limited::new(request.into_body(), limits.body).collect();
    match tokio::time::timeout(limits.request, body).await {
        Err(_) => closing(
            StatusCode::REQUEST_TIMEOUT,
            "the review took too long to send",
        ),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => too_large(),
        Ok(Err(error)) => closing(
            StatusCode::BAD_REQUEST,
            &format!("reading the review failed: {error}"),
        ),
        Ok(Ok(body)) => {
            let mut response = Response::new(Full::new(Bytes::from(answer(&body.to_bytes()))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                "application/json".parse().expect("a valid header"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::webhook::certificate;

    const SHORT: Limits = Limits {
        handshake: Duration::from_millis(300),
        headers: Duration::from_millis(300),
        request: Duration::from_millis(600),
        body: 1024,
        connections: 4,
    };

    struct Webhook {
        address: SocketAddr,
        connector: tokio_rustls::TlsConnector,
    }

    async fn start(limits: Limits) -> Webhook {
        let tls = certificate::generate(&["127.0.0.1".into()], jiff::Timestamp::now()).unwrap();
        let resolver = Arc::new(CertificateResolver::new(&tls).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let answer: Answer =
            Arc::new(|body: &[u8]| format!("{{\"read\":{}}}", body.len()).into_bytes());
        tokio::spawn(serve(
            listener,
            tls_acceptor(resolver).unwrap(),
            limits,
            answer,
        ));
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes())
        {
            roots.add(certificate.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Webhook {
            address,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    impl Webhook {
        async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
            let stream = TcpStream::connect(self.address).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            self.connector.connect(name, stream).await.unwrap()
        }

        /// A new connection that has sent `request`.
        async fn sent(&self, request: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
            let mut stream = self.tls().await;
            stream.write_all(request).await.unwrap();
            stream
        }

        /// All the webhook answers `request` with, once it closes the connection (within
        /// 2 s).
        async fn answer_then_close(&self, request: &[u8]) -> String {
            let mut stream = self.sent(request).await;
            until_closed(&mut stream, Duration::from_secs(2))
                .await
                .expect("closed")
        }
    }

    /// Everything the server sends until it closes, or `None` if it is still open after
    /// `limit`.
    async fn until_closed(
        stream: &mut (impl AsyncRead + Unpin),
        limit: Duration,
    ) -> Option<String> {
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => received.extend_from_slice(&buffer[..read]),
                }
            }
        })
        .await
        .ok()?;
        Some(String::from_utf8_lossy(&received).into_owned())
    }

    fn head(length: usize) -> String {
        format!("POST {PATH} HTTP/1.1\r\nhost: webhook\r\ncontent-length: {length}\r\n\r\n")
    }

    #[tokio::test]
    async fn a_review_within_the_limits_is_answered() {
        let webhook = start(SHORT).await;
        let mut stream = webhook.tls().await;
        stream.write_all(head(3).as_bytes()).await.unwrap();
        stream.write_all(b"abc").await.unwrap();
        let mut buffer = [0u8; 4096];
        let read = stream.read(&mut buffer).await.unwrap();
        let answer = String::from_utf8_lossy(&buffer[..read]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("{\"read\":3}"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_larger_than_a_review_is_refused_from_its_headers_unread() {
        let webhook = start(SHORT).await;
        let answer = webhook.answer_then_close(head(2_000_000).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        // Sent without a length (chunked): cut off at the limit.
        let chunk = format!("400\r\n{}\r\n", "x".repeat(0x400));
        let chunked = format!(
            "POST {PATH} HTTP/1.1\r\nhost: webhook\r\ntransfer-encoding: chunked\r\n\r\n{}",
            chunk.repeat(3)
        );
        let answer = webhook.answer_then_close(chunked.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test]
    async fn a_connection_carries_one_review() {
        // Timeouts far longer than the test waits: the close comes from the answer.
        let webhook = start(Limits {
            headers: Duration::from_secs(30),
            request: Duration::from_secs(30),
            ..SHORT
        })
        .await;
        let two = format!("{}{}", head(0), head(0));
        let answer = webhook.answer_then_close(two.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    }

    #[tokio::test]
    async fn slow_handshakes_headers_and_bodies_are_closed_in_time() {
        let webhook = start(SHORT).await;
        let limit = Duration::from_secs(2);
        // Never says hello.
        let mut silent = TcpStream::connect(webhook.address).await.unwrap();
        assert!(until_closed(&mut silent, limit).await.is_some());
        // Never finishes its headers.
        let mut slow = webhook
            .sent(format!("POST {PATH} HTTP/1.1\r\nhost: webhook\r\n").as_bytes())
            .await;
        assert!(until_closed(&mut slow, limit).await.is_some());
        // Never finishes its body.
        let answer = webhook
            .answer_then_close(format!("{}{{", head(100)).as_bytes())
            .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_unread_and_are_served_when_a_slot_frees() {
        let webhook = start(SHORT).await;
        // Every slot taken by a sender that never says hello.
        let mut silent = Vec::new();
        for _ in 0..SHORT.connections {
            silent.push(TcpStream::connect(webhook.address).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = tokio::time::Instant::now();
        // The next one waits for a slot (its handshake has not started), then is served.
        let mut waiting = webhook.tls().await;
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        waiting.write_all(head(0).as_bytes()).await.unwrap();
        let mut buffer = [0u8; 1024];
        let read = waiting.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let webhook = start(SHORT).await;
        let answer = webhook
            .answer_then_close(b"GET /metrics HTTP/1.1\r\nhost: webhook\r\n\r\n")
            .await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        let answer = webhook
            .answer_then_close(format!("GET {PATH} HTTP/1.1\r\nhost: webhook\r\n\r\n").as_bytes())
            .await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    }
}
