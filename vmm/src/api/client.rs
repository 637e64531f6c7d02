//! A minimal client for the API: one request per connection (`Connection: close`), JSON in and out. Used by
//! `atrium-remote` and the tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
/// The JSON value type answers come in.
pub use serde_json::Value;

use super::routes::PREFIX;

/// The largest answer the client reads.
const MAX_RESPONSE: u64 = 16 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the socket path.
    #[error("cannot connect to {}: {source}; is atrium running with --api-socket {}?", path.display(), path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The connection broke during the exchange.
    #[error("the connection to {} failed: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The server answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The answer is not the HTTP or JSON expected.
    #[error("the server's answer is not understood: {0}")]
    BadResponse(String),
    /// A request body could not be encoded.
    #[error("cannot encode the request as JSON: {0}")]
    Encode(String),
}

/// Encodes a request body as JSON.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value).map_err(|e| ClientError::Encode(e.to_string()))
}

/// Decodes an answer's JSON body into the documented type.
pub fn decode<T: DeserializeOwned>(value: Value) -> Result<T, ClientError> {
    serde_json::from_value(value)
        .map_err(|e| ClientError::BadResponse(format!("the JSON does not match the API: {e}")))
}

/// A client for one API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the server at `socket`; nothing is connected until a call.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls `method /api/v1/<endpoint>` with an optional JSON body. Returns the JSON body of a 200 answer, `None`
    /// for 204, and [`ClientError::Api`] for an error status.
    pub fn request(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<Option<Value>, ClientError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let io_error = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut message = format!(
            "{method} {PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Connection: close\r\n"
        );
        if let Some(body) = body {
            message.push_str("Content-Type: application/json\r\n");
            message.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        message.push_str("\r\n");
        let mut bytes = message.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        // A server refusing the request (say, a body too large) may close before reading all of it; its answer is
        // still there to read.
        if let Err(e) = stream.write_all(&bytes) {
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                return Err(io_error(e));
            }
        }
        let mut answer = Vec::new();
        let mut reader = stream.take(MAX_RESPONSE);
        if let Err(e) = reader.read_to_end(&mut answer) {
            // A reset after the answer (the server closed with part of the request unread) ends it like EOF.
            if answer.is_empty() || e.kind() != io::ErrorKind::ConnectionReset {
                return Err(io_error(e));
            }
        }
        parse_response(&answer)
    }
}

/// Splits a complete HTTP answer into status and body and turns it into the call's result.
fn parse_response(answer: &[u8]) -> Result<Option<Value>, ClientError> {
    let bad = |m: &str| ClientError::BadResponse(m.to_string());
    if answer.is_empty() {
        return Err(bad("the server closed the connection without answering"));
    }
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the HTTP headers"))?;
    let head =
        std::str::from_utf8(&answer[..head_end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status: u16 = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code
            .parse()
            .map_err(|_| bad("the status code is not a number"))?,
        _ => return Err(bad("malformed status line")),
    };
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| bad("Content-Length is not a number"))?,
                );
            }
        }
    }
    let rest = &answer[head_end + 4..];
    let body = match content_length {
        Some(n) => rest
            .get(..n)
            .ok_or_else(|| bad("the body is shorter than its Content-Length"))?,
        None => rest,
    };
    let json = if body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice::<Value>(body)
                .map_err(|e| ClientError::BadResponse(format!("the body is not JSON: {e}")))?,
        )
    };
    if (200..300).contains(&status) {
        return Ok(json);
    }
    let message = json
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let reason = super::http::reason(status);
            if reason.is_empty() {
                "the server reported an error".to_string()
            } else {
                reason.to_string()
            }
        });
    Err(ClientError::Api { status, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ok = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{\"a\": 1}",
        )
        .unwrap();
        assert_eq!(ok, Some(serde_json::json!({"a": 1})));
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(),
            None
        );
        let e = parse_response(
            b"HTTP/1.1 409 Conflict\r\nContent-Length: 22\r\n\r\n{\"error\":\"not booted\"}",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "not booted (HTTP 409)");
        let e = parse_response(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").unwrap_err();
        assert_eq!(e.to_string(), "Internal Server Error (HTTP 500)");
    }

    #[test]
    fn broken_answers() {
        for raw in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SMTP 200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\n\r\nnot json",
        ] {
            assert!(
                matches!(parse_response(raw), Err(ClientError::BadResponse(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn unreachable_socket_says_what_to_do() {
        let client = ApiClient::new("/nonexistent/atrium.sock");
        let e = client.request("GET", "vmm.ping", None).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
        assert!(e
            .to_string()
            .ends_with("is atrium running with --api-socket /nonexistent/atrium.sock?"));
    }
}
