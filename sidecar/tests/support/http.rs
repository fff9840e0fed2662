//! A small HTTP/1.1 client for the review endpoint tests: one request per
//! connection, every header under the test's control (Origin, Cookie, CSRF), over
//! plain TCP or TLS. Every JSON answer to a `/v1` route is checked against the
//! route's schema in the OpenAPI document, so all tests keep the document honest.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

/// The OpenAPI document as served.
pub const OPENAPI: &str = include_str!("../../src/http/openapi.json");

/// `(METHOD, path template)` of every operation a test has called.
pub static CALLED: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client for one endpoint, with optional default headers.
#[derive(Clone, Debug)]
pub struct Client {
    pub base: String,
    pub headers: Vec<(String, String)>,
    /// PEM certificate to trust for `https` endpoints.
    pub ca: Option<Vec<u8>>,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            headers: Vec::new(),
            ca: None,
        }
    }

    /// The same client, sending `Authorization: Bearer <token>`.
    pub fn bearer(&self, token: &str) -> Self {
        self.with("Authorization", &format!("Bearer {token}"))
    }

    /// The same client with one more header.
    pub fn with(&self, name: &str, value: &str) -> Self {
        let mut client = self.clone();
        client.headers.push((name.to_owned(), value.to_owned()));
        client
    }

    pub fn get(&self, path: &str) -> Response {
        self.send("GET", path, &[], None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.send("POST", path, &[], Some(body.to_string().as_bytes()))
    }

    pub fn delete(&self, path: &str) -> Response {
        self.send("DELETE", path, &[], None)
    }

    /// Sends a request; a JSON body goes with `Content-Type: application/json`
    /// unless `headers` names another.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let (scheme, authority) = self.base.split_once("://").expect("a URL with a scheme");
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
        let mut all: Vec<(String, String)> = self.headers.clone();
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if body.is_some()
            && !all
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            all.push(("Content-Type".into(), "application/json".into()));
        }
        for (name, value) in &all {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.unwrap_or_default();
        request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);

        let tcp = TcpStream::connect(authority).expect("connect to the endpoint");
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let response = if scheme == "https" {
            let mut builder = native_tls::TlsConnector::builder();
            if let Some(ca) = &self.ca {
                builder.add_root_certificate(native_tls::Certificate::from_pem(ca).unwrap());
            }
            let connector = builder.build().unwrap();
            let mut tls = connector.connect("localhost", tcp).expect("TLS handshake");
            tls.write_all(&bytes).unwrap();
            read_response(tls)
        } else {
            let mut tcp = tcp;
            tcp.write_all(&bytes).unwrap();
            read_response(tcp)
        };
        check_against_openapi(method, path, &response);
        response
    }
}

fn read_response(stream: impl Read) -> Response {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (k, v) = trimmed.split_once(':').expect("a header");
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = header("content-length") {
        let mut chunk = vec![0; length.parse().unwrap()];
        reader.read_exact(&mut chunk).unwrap();
        body = chunk;
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        headers,
        body,
    }
}

/// The documented operation `(path template, operation)` for a request path.
pub fn operation<'d>(doc: &'d Value, method: &str, path: &str) -> Option<(&'d str, &'d Value)> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()?
        .iter()
        .find_map(|(template, item)| {
            let parts: Vec<&str> = template.split('/').collect();
            let matches = parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(&segments)
                    .all(|(t, s)| (t.starts_with('{') && !s.is_empty()) || t == s);
            let op = item.get(method.to_ascii_lowercase())?;
            matches.then_some((template.as_str(), op))
        })
}

/// Checks a response against the OpenAPI document: the route and status must be
/// documented, and a JSON body must match the status's schema.
fn check_against_openapi(method: &str, path: &str, response: &Response) {
    if !path.starts_with("/v1/") && path != "/healthz" {
        return;
    }
    let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
    let Some((template, op)) = operation(&doc, method, path) else {
        assert!(
            matches!(response.status, 404 | 405),
            "{method} {path} answered {} but is not in openapi.json",
            response.status
        );
        return;
    };
    CALLED
        .lock()
        .unwrap()
        .insert((method.to_owned(), template.to_owned()));
    let status = response.status.to_string();
    let mut documented = &op["responses"][&status];
    if let Some(reference) = documented["$ref"].as_str() {
        let pointer = reference.trim_start_matches('#');
        documented = doc.pointer(pointer).expect("a $ref openapi.json resolves");
    }
    assert!(
        !documented.is_null(),
        "{method} {template} answered {status}, which openapi.json does not list: {}",
        response.text()
    );
    let Some(media) = documented["content"].as_object() else {
        assert!(
            response.body.is_empty(),
            "{method} {template} {status}: undocumented body"
        );
        return;
    };
    let content_type = response.header("content-type").unwrap_or("");
    let (media_type, spec) = media.iter().next().unwrap();
    assert!(
        content_type.starts_with(media_type.as_str()),
        "{method} {template} {status}: content type {content_type}, documented {media_type}"
    );
    if media_type != "application/json" {
        return;
    }
    let mut schema = doc.clone();
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
    schema["$ref"] = spec["schema"].clone()["$ref"].clone();
    if schema["$ref"].is_null() {
        return; // An inline schema: `{"type": "object"}` for the document itself.
    }
    let validator = jsonschema::validator_for(&schema).expect("openapi schemas compile");
    let body = response.json();
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {template} {status} does not match openapi.json:\n{}\nbody: {body:#}",
        errors.join("\n")
    );
}

/// Reads a server-sent event stream until `accept` is true of the events so far
/// (each `(event, data)`), failing after `deadline`.
pub fn read_events(
    client: &Client,
    path: &str,
    deadline: Duration,
    mut on_event: impl FnMut(usize, &str, &str) -> bool,
) {
    let authority = client.base.split_once("://").unwrap().1;
    let mut tcp = TcpStream::connect(authority).unwrap();
    tcp.set_read_timeout(Some(deadline)).unwrap();
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n");
    for (k, v) in &client.headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).unwrap();
    let reader = BufReader::new(tcp);
    let (mut event, mut count) = (String::new(), 0);
    for line in reader.lines() {
        let line = line.expect("the event stream to go on until the expected event");
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            count += 1;
            if on_event(count, &event, data) {
                return;
            }
        }
    }
    panic!("the event stream ended early");
}
