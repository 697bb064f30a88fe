//! Where connections go: the original (a `HOST:PORT`, usually the `gefyra-original-<mount>`
//! Service) and Stowaway's bridge port, dialled with a bridge's preamble first. Also the
//! pooled HTTP clients over those dials.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use http::uri::Authority;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long a name's addresses are used before it is resolved again: a ClusterIP rarely
/// changes, and resolving a Service name per connection (with the search domains) would
/// cost several DNS round trips each.
const RESOLVED_FOR: Duration = Duration::from_secs(5);

/// A `HOST:PORT` to dial, checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    text: String,
    authority: Authority,
}

impl FromStr for Address {
    type Err = String;

    fn from_str(text: &str) -> Result<Address, String> {
        let port = text
            .rsplit_once(':')
            .and_then(|(host, port)| (!host.is_empty()).then_some(port))
            .and_then(|port| port.parse::<u16>().ok())
            .filter(|port| *port != 0);
        let authority = Authority::from_str(text).ok().filter(|_| port.is_some());
        match authority {
            Some(authority) if authority.port_u16().is_some() => Ok(Address {
                text: text.to_string(),
                authority,
            }),
            _ => Err(format!("{text:?} is not HOST:PORT")),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Address {
    /// As a URI authority (a request's stand-in authority when it came without one).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

/// An address dialled with a connect timeout, its resolution kept for [`RESOLVED_FOR`].
#[derive(Debug)]
pub struct Upstream {
    address: Address,
    connect_timeout: Duration,
    resolved: Mutex<Option<(Instant, Arc<[SocketAddr]>)>>,
}

impl Upstream {
    pub fn new(address: Address, connect_timeout: Duration) -> Upstream {
        Upstream {
            address,
            connect_timeout,
            resolved: Mutex::new(None),
        }
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    async fn addresses(&self) -> io::Result<Arc<[SocketAddr]>> {
        if let Some((at, addresses)) =
            &*self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
            && at.elapsed() < RESOLVED_FOR
        {
            return Ok(Arc::clone(addresses));
        }
        let addresses: Arc<[SocketAddr]> =
            tokio::net::lookup_host(&self.address.text).await?.collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the name resolves to no address",
            ));
        }
        *self.resolved.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), Arc::clone(&addresses)));
        Ok(addresses)
    }

    /// A TCP connection (no Nagle delay) to the first address that answers in time.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let context = |error: io::Error| {
            io::Error::new(
                error.kind(),
                format!("connecting to {}: {error}", self.address),
            )
        };
        let addresses = self.addresses().await.map_err(context)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for address in addresses.iter() {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Ok(Err(error)) => last = error,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", self.connect_timeout),
                    )
                }
            }
        }
        Err(context(last))
    }

    /// A connection with `preamble` already sent (Stowaway's bridge port).
    pub async fn connect_with(&self, preamble: &[u8]) -> io::Result<TcpStream> {
        let mut stream = self.connect().await?;
        stream.write_all(preamble).await.map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("sending the bridge preamble to {}: {error}", self.address),
            )
        })?;
        Ok(stream)
    }
}

/// hyper-util's connector: every URI dials the same upstream (the request's authority is
/// the client's, kept as written), a bridge's preamble first.
#[derive(Clone, Debug)]
pub struct Dial {
    upstream: Arc<Upstream>,
    preamble: Option<Arc<[u8]>>,
}

impl tower_service::Service<Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let dial = self.clone();
        Box::pin(async move {
            let stream = match &dial.preamble {
                Some(preamble) => dial.upstream.connect_with(preamble).await?,
                None => dial.upstream.connect().await?,
            };
            Ok(TokioIo::new(stream))
        })
    }
}

/// Pooled clients to one destination: HTTP/1 for HTTP/1 requests, h2c (prior knowledge) for
/// HTTP/2 ones, so a gRPC call stays HTTP/2 end to end.
#[derive(Clone, Debug)]
pub struct Clients {
    pub http1: Client<Dial, Incoming>,
    pub http2: Client<Dial, Incoming>,
}

impl Clients {
    pub fn new(upstream: Arc<Upstream>, preamble: Option<Arc<[u8]>>) -> Clients {
        let dial = Dial { upstream, preamble };
        let builder = || {
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                // The request keeps its own Host (or none): nothing is added.
                .set_host(false);
            builder
        };
        Clients {
            http1: builder().build(dial.clone()),
            http2: builder()
                .http2_only(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .build(dial),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_host_and_port() {
        for good in [
            "gefyra-original-web.demo.svc:8080",
            "127.0.0.1:1",
            "[::1]:65535",
        ] {
            let address: Address = good.parse().expect(good);
            assert_eq!(address.to_string(), good);
        }
        for bad in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:65536",
            "host:http",
            "a b:80",
            "[::1]",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn connect_names_the_address_that_failed() {
        // A port nothing listens on: bind one, learn it, close it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        let upstream = Upstream::new(address.parse().expect("address"), Duration::from_secs(2));
        let error = upstream.connect().await.expect_err("nothing listens");
        assert!(
            error
                .to_string()
                .starts_with(&format!("connecting to {address}: ")),
            "{error}"
        );
    }
}
