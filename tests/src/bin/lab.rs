//! Services and probes for the network lab (run inside network namespaces):
//!
//! - `lab serve --http ADDR --udp-echo ADDR --name NAME`: HTTP (`/` answers NAME,
//!   `/bytes/N` N bytes, `/slow/S` 160 KiB a second for S seconds, `/connections` how
//!   many TCP connections it accepted before this one) and UDP echo.
//! - `lab http URL`: GET, print the body.
//! - `lab download URL`: GET, print how many body bytes arrived.
//! - `lab upload URL N`: POST N bytes, print the server's count of what arrived
//!   (`/close-early`: the server stops reading after the first read and closes 2 s later).
//! - `lab udp ADDR MESSAGE [--from IP]`: one datagram, print the reply.
//! - `lab dns SERVER NAME`: an A query over UDP, print the first address.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};

const SLOW_CHUNK: usize = 16 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|at| args.get(at + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        Some("serve") => serve(
            flag("--http").context("--http ADDR")?.parse()?,
            flag("--udp-echo").context("--udp-echo ADDR")?.parse()?,
            flag("--name").unwrap_or_default(),
        ),
        Some("http") => {
            let (_, body) = get(args.get(1).context("a URL")?, Duration::from_secs(5))?;
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Some("upload") => {
            let count: usize = args.get(2).context("N")?.parse()?;
            let (_, body) = post(
                args.get(1).context("a URL")?,
                count,
                Duration::from_secs(120),
            )?;
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Some("hold") => {
            // Connects, stays idle for SECONDS, then asks: whether an idle flow survived.
            let url = args.get(1).context("a URL")?;
            let seconds: u64 = args.get(2).context("SECONDS")?.parse()?;
            let (address, host, path) = split_url(url)?;
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
            std::thread::sleep(Duration::from_secs(seconds));
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
            let (_, body) = read_response(stream)?;
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Some("latency") => {
            // COUNT requests one after another, each on a new connection: "p50_ms p99_ms".
            let url = args.get(1).context("a URL")?;
            let count: usize = args.get(2).context("COUNT")?.parse()?;
            let mut millis = Vec::with_capacity(count);
            for _ in 0..count {
                let started = std::time::Instant::now();
                get(url, Duration::from_secs(10))?;
                millis.push(started.elapsed().as_secs_f64() * 1e3);
            }
            millis.sort_by(f64::total_cmp);
            let at = |quantile: f64| {
                let index = ((millis.len() as f64 - 1.0) * quantile).round() as usize;
                millis.get(index).copied().unwrap_or(f64::NAN)
            };
            print!("{:.3} {:.3}", at(0.5), at(0.99));
            Ok(())
        }
        Some("download") => {
            let (_, body) = get(args.get(1).context("a URL")?, Duration::from_secs(120))?;
            print!("{}", body.len());
            Ok(())
        }
        Some("udp") => {
            let to: SocketAddr = args.get(1).context("ADDR")?.parse()?;
            let message = args.get(2).context("MESSAGE")?;
            let from: IpAddr = flag("--from")
                .map(|ip| ip.parse())
                .transpose()?
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let socket = UdpSocket::bind(SocketAddr::new(from, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(message.as_bytes(), to)?;
            let mut buffer = [0u8; 2048];
            let (length, _) = socket.recv_from(&mut buffer).context("no UDP reply")?;
            print!("{}", String::from_utf8_lossy(&buffer[..length]));
            Ok(())
        }
        Some("dns") => {
            let server: SocketAddr = args.get(1).context("SERVER")?.parse()?;
            let name = args.get(2).context("NAME")?;
            print!("{}", resolve(server, name)?);
            Ok(())
        }
        _ => bail!("usage: lab serve|http|hold|latency|download|udp|dns ... (see the source)"),
    }
}

fn serve(http: SocketAddr, udp: SocketAddr, name: String) -> Result<()> {
    let echo = UdpSocket::bind(udp)?;
    std::thread::spawn(move || {
        let mut buffer = [0u8; 65_536];
        while let Ok((length, from)) = echo.recv_from(&mut buffer) {
            let _ = echo.send_to(&buffer[..length], from);
        }
    });
    let listener = TcpListener::bind(http)?;
    for (accepted_before, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = answer(stream, &name, accepted_before);
        });
    }
    Ok(())
}

fn answer(mut stream: TcpStream, name: &str, accepted_before: usize) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let head = |length: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
    };
    if request_line.starts_with("POST /close-early") {
        // Reads a little, stops reading until every buffer on the way is full, then closes
        // with the rest unread (the kernel answers with a reset).
        let mut chunk = vec![0u8; 64 * 1024];
        let _ = reader.read(&mut chunk)?;
        std::thread::sleep(Duration::from_secs(2));
        return Ok(());
    }
    if request_line.starts_with("POST ") {
        // Counts what arrives.
        let mut received = 0usize;
        let mut chunk = vec![0u8; 64 * 1024];
        while received < content_length {
            let read = reader.read(&mut chunk)?;
            if read == 0 {
                break;
            }
            received += read;
        }
        let body = received.to_string();
        stream.write_all(head(body.len()).as_bytes())?;
        stream.write_all(body.as_bytes())?;
        return Ok(());
    }
    if path == "/connections" {
        let body = accepted_before.to_string();
        stream.write_all(head(body.len()).as_bytes())?;
        stream.write_all(body.as_bytes())?;
    } else if let Some(count) = path.strip_prefix("/bytes/") {
        let count: usize = count.parse()?;
        stream.write_all(head(count).as_bytes())?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = count;
        while left > 0 {
            let now = left.min(chunk.len());
            stream.write_all(&chunk[..now])?;
            left -= now;
        }
    } else if let Some(seconds) = path.strip_prefix("/slow/") {
        let chunks = seconds.parse::<usize>()? * 10;
        stream.write_all(head(chunks * SLOW_CHUNK).as_bytes())?;
        let chunk = vec![b'y'; SLOW_CHUNK];
        for _ in 0..chunks {
            stream.write_all(&chunk)?;
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        stream.write_all(head(name.len()).as_bytes())?;
        stream.write_all(name.as_bytes())?;
    }
    stream.flush()?;
    Ok(())
}

/// A POST of `count` bytes over plain TCP: (status, body).
fn post(url: &str, count: usize, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let (address, host, path) = split_url(url)?;
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {count}\r\nConnection: close\r\n\r\n"
    )?;
    let chunk = vec![b'z'; 64 * 1024];
    let mut left = count;
    while left > 0 {
        let now = left.min(chunk.len());
        stream.write_all(&chunk[..now])?;
        left -= now;
    }
    read_response(stream)
}

fn split_url(url: &str) -> Result<(SocketAddr, String, String)> {
    let rest = url.strip_prefix("http://").context("an http:// URL")?;
    let (host, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let address: SocketAddr = host.parse().context("a URL with ADDRESS:PORT")?;
    Ok((address, host.to_string(), path.to_string()))
}

/// A GET over plain TCP: (status, body); the body is read to the end of the connection.
fn get(url: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let (address, host, path) = split_url(url)?;
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    read_response(stream)
}

/// Status and body of a response read to the end of the connection (checked against its
/// Content-Length).
fn read_response(mut stream: TcpStream) -> Result<(u16, Vec<u8>)> {
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .context("an HTTP response")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("an HTTP status")?;
    let body = response[split + 4..].to_vec();
    if let Some(length) = head.lines().find_map(|line| {
        line.to_ascii_lowercase()
            .strip_prefix("content-length: ")
            .and_then(|value| value.trim().parse::<usize>().ok())
    }) && body.len() != length
    {
        bail!("the body ended after {} of {length} bytes", body.len());
    }
    Ok((status, body))
}

/// One A query over UDP; the first address in the answer.
fn resolve(server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    let id: u16 = 0x6a6b;
    let mut query = Vec::new();
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(&query, server)?;
    let mut reply = [0u8; 1500];
    let (length, _) = socket.recv_from(&mut reply).context("no DNS reply")?;
    let reply = &reply[..length];
    if reply.len() < 12 || reply[..2] != id.to_be_bytes() {
        bail!("not a reply to our query");
    }
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    if answers == 0 {
        bail!("no answer for {name}");
    }
    // Skip the question (it is ours: same length), then read answers.
    let mut at = query.len();
    for _ in 0..answers {
        // A compressed name pointer (2 bytes) or labels.
        if reply.get(at).is_some_and(|byte| byte & 0xc0 == 0xc0) {
            at += 2;
        } else {
            while reply.get(at).is_some_and(|byte| *byte != 0) {
                at += usize::from(reply[at]) + 1;
            }
            at += 1;
        }
        let record = reply.get(at..at + 10).context("a truncated answer")?;
        let kind = u16::from_be_bytes([record[0], record[1]]);
        let length = usize::from(u16::from_be_bytes([record[8], record[9]]));
        at += 10;
        if kind == 1 && length == 4 {
            let bytes = reply.get(at..at + 4).context("a truncated address")?;
            return Ok(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]));
        }
        at += length;
    }
    bail!("no A record for {name}")
}
