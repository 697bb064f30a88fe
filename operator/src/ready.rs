//! `gefyra-operator check-ready URL...`: the chart's `helm test`. The image has no shell
//! and no HTTP client, so the operator binary asks the components' /readyz itself.

use std::time::Duration;

use anyhow::bail;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// How long one request may take before it counts as no answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Waits (at most `timeout` for all) until every URL answers with a 2xx status, asking
/// each again every second; fails naming the first URL that did not and its last answer.
pub async fn check_ready(urls: &[hyper::Uri], timeout: Duration) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let deadline = Instant::now() + timeout;
    for url in urls {
        loop {
            let answer = match tokio::time::timeout(REQUEST_TIMEOUT, client.get(url.clone())).await
            {
                Ok(Ok(response)) if response.status().is_success() => {
                    println!("{url}: {}", response.status());
                    break;
                }
                Ok(Ok(response)) => format!("HTTP {}", response.status()),
                Ok(Err(error)) => format!("{error}"),
                Err(_) => format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            };
            if Instant::now() + RETRY_EVERY > deadline {
                bail!(
                    "{url} is not ready after {} s (last: {answer}); see the component's Pod and log",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers 503 twice, then 200: check-ready waits for it; a port where
    /// nothing listens fails with its URL named.
    #[tokio::test]
    async fn waits_for_success_and_names_what_never_answers() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let routes = axum::Router::new().route(
            "/readyz",
            axum::routing::get(move || {
                let counter = counter.clone();
                async move {
                    if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, routes).await });
        let ready: hyper::Uri = format!("http://127.0.0.1:{port}/readyz").parse().unwrap();
        check_ready(std::slice::from_ref(&ready), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 3);

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nowhere: hyper::Uri = format!(
            "http://127.0.0.1:{}/readyz",
            closed.local_addr().unwrap().port()
        )
        .parse()
        .unwrap();
        drop(closed);
        let error = check_ready(&[ready, nowhere.clone()], Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(&nowhere.to_string()), "{error}");
        assert!(error.contains("not ready after 2 s"), "{error}");
    }
}
