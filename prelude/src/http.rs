//! The transport under [`crate::Session`]: one JSON request, one JSON answer.
//!
//! `http://` URLs (the loopback server, an SSH tunnel) go through a small HTTP/1.1 client on
//! `std::net`, one connection per request. `https://` URLs (a server started with `--tls-cert`)
//! go through ureq with rustls, behind the crate's `tls` feature (on by default).
//!
//! Why not ureq for everything: every cell's crate depends on this one, and evcxr's
//! rust-analyzer loads the whole dependency graph before the first cell can run. ureq brings
//! url → idna → ICU and rustls → ring, about 60 crates; without them the prelude loads several
//! seconds sooner and each cell links less. The kernel and the REPL ask for the `tls` feature
//! only when `HEARTH_URL` is an `https://` URL.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// What a request came back with.
pub(crate) enum Reply {
    /// A 2xx answer's JSON body (`Null` when empty).
    Ok(Value),
    /// Any other status, with the body as JSON when it parses (`Null` otherwise).
    Status(u16, Value),
    /// Nothing usable came back: connection refused, reset, malformed answer.
    Transport(String),
    /// A 2xx answer whose body is not JSON (the request took effect: not retried).
    Decode(String),
}

/// Sends `method url+path` with the bearer `token` and an optional JSON `body`.
pub(crate) fn request(
    url: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
    connect_timeout: Duration,
) -> Reply {
    if let Some(rest) = url.strip_prefix("http://") {
        return plain(rest, method, path, token, body, connect_timeout)
            .unwrap_or_else(|e| Reply::Transport(e.to_string()));
    }
    if url.starts_with("https://") {
        return tls(url, method, path, token, body, connect_timeout);
    }
    Reply::Transport(format!("{url:?} is not an http:// or https:// URL"))
}

/// `rest` is the URL without its scheme: `host:port[/prefix]`.
fn plain(
    rest: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
    connect_timeout: Duration,
) -> std::io::Result<Reply> {
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = if authority.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut last = std::io::Error::other(format!("{authority} resolves to no address"));
    let mut stream = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, connect_timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or(last)?;
    stream.set_nodelay(true)?;
    let body = body.map(|b| b.to_string());
    let target = if prefix.is_empty() { path.to_string() } else { format!("/{}{path}", prefix.trim_end_matches('/')) };
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\nConnection: close\r\n");
    if let Some(b) = &body {
        head += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len());
    }
    head += "\r\n";
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_deref().unwrap_or_default().as_bytes());
    stream.write_all(&out)?;
    stream.flush()?;
    let (status, bytes) = read_response(BufReader::new(stream))?;
    Ok(reply(status, &bytes))
}

/// A response as a [`Reply`], whichever transport carried it: an empty body is `Null`.
fn reply(status: u16, body: &[u8]) -> Reply {
    let json =
        if body.iter().all(u8::is_ascii_whitespace) { Some(Value::Null) } else { serde_json::from_slice(body).ok() };
    match (status, json) {
        (200..=299, Some(v)) => Reply::Ok(v),
        (200..=299, None) => Reply::Decode(format!("HTTP {status} with a body that is not JSON")),
        (_, v) => Reply::Status(status, v.unwrap_or(Value::Null)),
    }
}

/// Reads a response: status, then the body by `Content-Length`, chunks, or until close.
fn read_response(mut r: impl BufRead) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("not an HTTP status line: {:?}", line.trim_end())))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the connection closed inside the headers"));
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| bad("a bad Content-Length"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("a bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?; // the CRLF after each chunk
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok((status, body))
}

#[cfg(feature = "tls")]
fn tls(url: &str, method: &str, path: &str, token: &str, body: Option<&Value>, connect_timeout: Duration) -> Reply {
    let agent = ureq::AgentBuilder::new().timeout_connect(connect_timeout).build();
    let req = agent.request(method, &format!("{url}{path}")).set("Authorization", &format!("Bearer {token}"));
    let res = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    match res {
        Ok(r) => {
            let status = r.status();
            r.into_string().map_or_else(|e| Reply::Transport(e.to_string()), |s| reply(status, s.as_bytes()))
        }
        Err(ureq::Error::Status(status, r)) => reply(status, r.into_string().unwrap_or_default().as_bytes()),
        Err(e) => Reply::Transport(e.to_string()),
    }
}

#[cfg(not(feature = "tls"))]
fn tls(url: &str, _: &str, _: &str, _: &str, _: Option<&Value>, _: Duration) -> Reply {
    Reply::Transport(format!("{url} is https: this build of hearth-prelude has no `tls` feature (cells get it when HEARTH_URL starts with https://)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_by_length_chunks_and_close() {
        let (s, b) = read_response(&b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}extra"[..]).unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{\"a\":1}"[..]));
        let (s, b) = read_response(&b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":2}\r\n0\r\n\r\n"[..]).unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"{\"a\":2}"[..]));
        let (s, b) = read_response(&b"HTTP/1.0 503 Busy\r\n\r\nbye"[..]).unwrap();
        assert_eq!((s, b.as_slice()), (503, &b"bye"[..]));
        assert!(read_response(&b"SSH-2.0-OpenSSH\r\n"[..]).is_err());
        assert!(read_response(&b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort"[..]).is_err());
    }
}
