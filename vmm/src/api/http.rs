//! The HTTP/1.1 subset the API speaks: request parsing from a byte buffer and response encoding. No I/O here.
//!
//! Requests: a request line, headers, and a body of exactly `Content-Length` bytes (no chunked encoding). The request
//! line and headers together may be at most [`MAX_HEAD`] bytes (431 beyond), the body at most [`MAX_BODY`] bytes
//! (413 beyond). Lines end in CRLF; a bare LF is accepted too.

use std::fmt::Write as _;

/// The most bytes the request line and headers may take, including the blank line that ends them.
pub const MAX_HEAD: usize = 8 << 10;
/// The largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// A request the server cannot parse or will not accept, with the status to answer and a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    /// The HTTP status to answer with.
    pub status: u16,
    /// What is wrong, on one line.
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
}

/// The request line and headers of a request, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The method, e.g. `PUT`.
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// Bytes the head takes in the buffer, blank line included.
    pub head_len: usize,
    /// The body's length from `Content-Length` (0 without the header).
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The parsed head.
    pub head: Head,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// Bytes the whole request takes in the buffer.
    pub fn len(&self) -> usize {
        self.head.head_len + self.body.len()
    }

    /// Whether the request takes no bytes (never true for a parsed request).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The end of the head in `buf`: the offset just past the blank line, if there is one.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        let line = &buf[line_start..i];
        if line.is_empty() || line == b"\r" {
            return Some(i + 1);
        }
        line_start = i + 1;
    }
    None
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses the head at the start of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let Some(head_len) = head_end(buf) else {
        if buf.len() >= MAX_HEAD {
            return Err(HttpError::new(
                431,
                format!("the request line and headers exceed {MAX_HEAD} bytes; send less"),
            ));
        }
        return Ok(None);
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::new(
            431,
            format!("the request line and headers exceed {MAX_HEAD} bytes; send less"),
        ));
    }
    let text = std::str::from_utf8(&buf[..head_len])
        .map_err(|_| HttpError::bad("the request line or a header is not valid UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::bad(format!(
            "malformed request line '{}'; expected 'METHOD /path HTTP/1.1'",
            printable(request_line)
        )));
    };
    if !is_token(method) || !target.starts_with('/') || !version.starts_with("HTTP/") {
        return Err(HttpError::bad(format!(
            "malformed request line '{}'; expected 'METHOD /path HTTP/1.1'",
            printable(request_line)
        )));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => {
            return Err(HttpError::new(
                505,
                format!("{} is not supported; use HTTP/1.1", printable(version)),
            ))
        }
    };
    let path = target
        .split_once('?')
        .map_or(target, |(p, _)| p)
        .to_string();

    let mut content_length: Option<usize> = None;
    let mut connection_close = http10;
    let mut expect_continue = false;
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::bad(format!(
                "malformed header line '{}'; expected 'Name: value'",
                printable(line)
            )));
        };
        if !is_token(name) {
            return Err(HttpError::bad(format!(
                "malformed header name '{}'",
                printable(name)
            )));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|l| l != length) {
                return Err(HttpError::bad(
                    "conflicting Content-Length headers; send exactly one",
                ));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::new(
                501,
                "Transfer-Encoding is not supported; send the body with a Content-Length header",
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    connection_close = true;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    connection_close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::new(
                    417,
                    format!(
                        "Expect: {} is not supported; only 100-continue is",
                        printable(value)
                    ),
                ));
            }
            expect_continue = !http10;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(HttpError::new(
            413,
            format!("the body has {content_length} bytes; at most {MAX_BODY} are accepted"),
        ));
    }
    Ok(Some(Head {
        method: method.to_string(),
        path,
        head_len,
        content_length,
        keep_alive: !connection_close,
        expect_continue,
    }))
}

fn parse_content_length(value: &str) -> Result<usize, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::bad(format!(
            "Content-Length '{}' is not a byte count",
            printable(value)
        )));
    }
    // Too many digits for usize is certainly too large; saturating keeps the 413 path.
    Ok(value.parse::<usize>().unwrap_or(usize::MAX))
}

/// Parses one complete request at the start of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let end = head.head_len + head.content_length;
    if buf.len() < end {
        return Ok(None);
    }
    let body = buf[head.head_len..end].to_vec();
    Ok(Some(Request { head, body }))
}

/// `s` cut to 80 characters with control characters escaped, for quoting in a one-line message.
fn printable(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 80 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// The reason phrase for `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// The interim response that tells a client to send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<String>,
    /// The `Allow` header's value, for 405.
    pub allow: Option<String>,
}

impl Response {
    /// A 200 response with a JSON body.
    pub fn json(body: String) -> Self {
        Response {
            status: 200,
            body: Some(body),
            allow: None,
        }
    }

    /// A 204 response.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// An error response with body `{"error": message}`. A status outside 400..=599 becomes 500.
    pub fn error(status: u16, message: &str) -> Self {
        let status = if (400..=599).contains(&status) {
            status
        } else {
            500
        };
        let message = message.replace(['\r', '\n'], " ");
        Response {
            status,
            body: Some(serde_json::json!({ "error": message }).to_string()),
            allow: None,
        }
    }

    /// The bytes to send; `keep_alive` picks the `Connection` header.
    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        head.push_str("Server: atrium\r\n");
        if let Some(allow) = &self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        let body = self.body.as_deref().unwrap_or_default();
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if self.status != 204 {
            let _ = write!(head, "Content-Length: {}\r\n", body.len());
        }
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let _ = write!(head, "Connection: {connection}\r\n\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Request>, HttpError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn good_request_with_body() {
        let raw = "PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                   Content-Length: 19\r\n\r\n{\"desired_vcpus\":4}";
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.head.method, "PUT");
        assert_eq!(req.head.path, "/api/v1/vm.resize");
        assert_eq!(req.body, b"{\"desired_vcpus\":4}");
        assert!(req.head.keep_alive);
        assert!(!req.head.expect_continue);
        assert_eq!(req.len(), raw.len());
    }

    #[test]
    fn incomplete_until_the_whole_body_arrives() {
        let raw = "PUT /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(raw).unwrap().is_some());
        // The head alone is complete before the body arrives.
        let head = parse_head(&raw.as_bytes()[..raw.len() - 4])
            .unwrap()
            .unwrap();
        assert_eq!(head.content_length, 4);
    }

    #[test]
    fn bare_lf_query_and_header_case() {
        let req = parse("get /x?y=1 HTTP/1.0\nCONTENT-length:  2 \nconnection: Keep-Alive\n\nhi")
            .unwrap()
            .unwrap();
        assert_eq!(req.head.method, "get");
        assert_eq!(req.head.path, "/x");
        assert_eq!(req.body, b"hi");
        assert!(req.head.keep_alive);
    }

    #[test]
    fn connection_defaults_and_close() {
        let h = |s: &str| parse_head(s.as_bytes()).unwrap().unwrap();
        assert!(h("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!h("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!h("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(h("PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        assert!(!h("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn missing_content_length_means_no_body() {
        // The bytes after the head are the next request, which is garbage here.
        let raw = b"PUT /api/v1/vm.create HTTP/1.1\r\n\r\n{\"cpus\":1}";
        let req = parse_request(raw).unwrap().unwrap();
        assert!(req.body.is_empty());
        let rest = &raw[req.len()..];
        assert_eq!(rest, b"{\"cpus\":1}");
        // Not a request line yet (no line end): incomplete; with one, a 400.
        assert_eq!(parse_request(rest), Ok(None));
        let e = parse("{\"cpus\":1}\r\n\r\n").unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn bad_request_lines() {
        for line in [
            "GET\r\n\r\n",
            "GET /x\r\n\r\n",
            "GET  /x HTTP/1.1\r\n\r\n",
            "GET x HTTP/1.1\r\n\r\n",
            "G(T /x HTTP/1.1\r\n\r\n",
            "GET /x FTP/1.1\r\n\r\n",
            "GET /x HTTP/1.1 extra\r\n\r\n",
            "\r\n\r\n",
        ] {
            let e = parse(line).unwrap_err();
            assert_eq!(e.status, 400, "{line:?}");
            assert!(e.message.starts_with("malformed request line"), "{e}");
            assert!(!e.message.contains('\n') && !e.message.contains('\r'));
        }
        assert_eq!(parse("GET /x HTTP/2.0\r\n\r\n").unwrap_err().status, 505);
        assert_eq!(
            parse_request(b"GET /\xff HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn bad_headers() {
        let status = |s: &str| parse(s).unwrap_err().status;
        assert_eq!(status("GET / HTTP/1.1\r\nNoColon\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(status("PUT / HTTP/1.1\r\nExpect: tea\r\n\r\n"), 417);
        // Repeating the same length is allowed.
        assert!(parse("GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n").is_ok());
    }

    #[test]
    fn oversized_head() {
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        while raw.len() < MAX_HEAD {
            raw.push_str("X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        // Without the blank line yet: already too long.
        let e = parse(&raw).unwrap_err();
        assert_eq!(e.status, 431);
        raw.push_str("\r\n");
        assert_eq!(parse(&raw).unwrap_err().status, 431);
        // Just under the limit is fine.
        let mut ok = String::from("GET / HTTP/1.1\r\nX: ");
        ok.push_str(&"a".repeat(MAX_HEAD - ok.len() - 4));
        ok.push_str("\r\n\r\n");
        assert_eq!(ok.len(), MAX_HEAD);
        assert!(parse(&ok).unwrap().is_some());
    }

    #[test]
    fn oversized_body_is_rejected_from_the_head() {
        let raw = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let e = parse(&raw).unwrap_err();
        assert_eq!(e.status, 413);
        let huge = "PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge).unwrap_err().status, 413);
        let max = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n");
        assert_eq!(parse(&max), Ok(None));
    }

    #[test]
    fn pipelined_requests_parse_one_after_another() {
        let raw = b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /c HTTP/1.1\r\n\r\n";
        let mut rest: &[u8] = raw;
        let mut paths = Vec::new();
        while let Some(req) = parse_request(rest).unwrap() {
            paths.push(req.head.path.clone());
            rest = &rest[req.len()..];
        }
        assert_eq!(paths, ["/a", "/b", "/c"]);
        assert!(rest.is_empty());
    }

    #[test]
    fn messages_escape_control_characters() {
        let e = parse("GET /x\x01y HTTP/1.1 z\r\n\r\n").unwrap_err();
        assert!(e.message.contains("\\x01"), "{e}");
    }

    #[test]
    fn response_encoding() {
        let r = Response::json("{\"a\":1}".into()).encode(true);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: atrium\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\
             Connection: keep-alive\r\n\r\n{\"a\":1}"
        );
        let r = Response::no_content().encode(false);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 204 No Content\r\nServer: atrium\r\nConnection: close\r\n\r\n"
        );
        let mut e = Response::error(405, "use GET");
        e.allow = Some("GET".into());
        let text = String::from_utf8(e.encode(true)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"use GET\"}"));
    }

    #[test]
    fn error_responses_are_one_line_and_in_range() {
        let e = Response::error(200, "two\nlines");
        assert_eq!(e.status, 500);
        assert_eq!(e.body.as_deref(), Some("{\"error\":\"two lines\"}"));
    }
}
