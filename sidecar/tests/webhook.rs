//! The review webhook end to end: the real `airlock` binary posting to a real HTTP
//! listener on the loopback interface, run by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::{self, Receiver};

use serde_json::{Value, json};
use support::{DEADLINE, Sandbox, eventually, insert_customer, intent};

/// One request the listener received.
#[derive(Debug)]
struct Received {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Value,
}

/// A webhook receiver on 127.0.0.1: answers the given statuses in turn, then 200,
/// and hands every request it read to the returned channel.
fn receiver(statuses: &[u16]) -> (u16, Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    let mut statuses: VecDeque<u16> = statuses.iter().copied().collect();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_owned();
            let path = parts.next().unwrap_or_default().to_owned();
            let mut length = 0usize;
            let mut content_type = None;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    break;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    match name.trim().to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "content-type" => content_type = Some(value.trim().to_owned()),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let status = statuses.pop_front().unwrap_or(200);
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
            let _ = stream.flush();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if tx
                .send(Received {
                    method,
                    path,
                    content_type,
                    body,
                })
                .is_err()
            {
                return;
            }
        }
    });
    (port, rx)
}

fn next(rx: &Receiver<Received>, sb: &Sandbox) -> Received {
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("no webhook request arrived; log:\n{}", sb.log()))
}

fn delete(id: &str, run: &str, customer: i64, reason: &str) -> Value {
    let mut intent = intent(
        id,
        run,
        json!({"op": "delete", "table": "customers", "key": {"id": customer}}),
    );
    intent["reason"] = json!(reason);
    intent
}

fn sandbox(webhook: String) -> Sandbox {
    let mut sb = Sandbox::new();
    rusqlite::Connection::open(sb.target())
        .unwrap()
        .execute_batch("INSERT INTO customers (id, name) VALUES (1, 'Ada'), (2, 'Grace');")
        .unwrap();
    sb.env.push(("AIRLOCK_REVIEW__WEBHOOK".into(), webhook));
    sb.env.push((
        "AIRLOCK_REVIEW__PUBLIC_URL".into(),
        "https://review.example/".into(),
    ));
    sb
}

#[test]
fn an_intent_entering_review_is_announced_once_with_a_link() {
    let (port, rx) = receiver(&[]);
    let mut sb = sandbox(format!("http://127.0.0.1:{port}/hook"));
    sb.start();

    // Allowed: applied, and no message.
    sb.submit_json(&insert_customer("ok-1", "run-a", 10, "Lin"));
    sb.outcome_in("ok-1", "applied");

    let reason = "clean up <!channel> & <https://evil.example|click here>\nnow";
    sb.submit_json(&delete("del-1", "run-b", 1, reason));
    let outcome = sb.outcome_in("del-1", "awaiting_review");

    let request = next(&rx, &sb);
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hook");
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    let body = &request.body;
    let data = &body["airlock"];
    assert_eq!(data["event"], "review", "{body:#}");
    assert_eq!(data["id"], "del-1");
    assert_eq!(data["run"], "run-b");
    assert_eq!(data["target"], "default");
    assert_eq!(data["digest"], outcome["digest"]);
    assert_eq!(
        data["reason"], reason,
        "the data carries the reason as it is"
    );
    assert_eq!(
        data["reasons"],
        json!(["deletes from customers need human review"])
    );
    assert_eq!(data["approvals"], 1);
    assert_eq!(data["deadline"], outcome["review"]["expires_at"]);
    assert_eq!(data["url"], "https://review.example/#/intent/del-1");

    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("https://review.example/#/intent/del-1"),
        "{text}"
    );
    assert!(text.contains("del-1") && text.contains("run-b"), "{text}");
    assert!(
        text.contains("deletes from customers need human review"),
        "{text}"
    );
    assert!(
        text.contains(
            "clean up &lt;!channel&gt; &amp; &lt;https://evil.example|click here&gt; now"
        ),
        "{text}"
    );
    assert!(!text.contains('<') && !text.contains('>'), "{text}");

    assert!(sb.stop().success());
    let more: Vec<Received> = rx.try_iter().collect();
    assert!(
        more.is_empty(),
        "one message only (none for the allowed intent): {more:?}"
    );
}

#[test]
fn server_errors_are_retried() {
    let (port, rx) = receiver(&[500, 503]);
    let mut sb = sandbox(format!("http://127.0.0.1:{port}/hook"));
    sb.start();
    sb.submit_json(&delete("del-2", "run-c", 2, "retired customer"));
    sb.outcome_in("del-2", "awaiting_review");

    let first = next(&rx, &sb);
    let second = next(&rx, &sb);
    let third = next(&rx, &sb);
    for request in [&first, &second, &third] {
        assert_eq!(request.body["airlock"]["id"], "del-2", "{request:?}");
        assert_eq!(request.body, first.body);
    }
    let log = eventually("the delivery to be logged", || {
        let log = sb.log();
        log.contains("webhook message delivered").then_some(log)
    });
    assert!(log.contains("webhook delivery failed; retrying"), "{log}");
    assert!(sb.stop().success());
    assert!(rx.try_iter().next().is_none(), "no fourth attempt");
}

#[test]
fn a_webhook_that_is_down_holds_nothing_back_and_its_secret_is_not_logged() {
    // A port nobody listens on any more.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut sb = sandbox(format!(
        "http://127.0.0.1:{port}/services/T000/B000/XSECRETX?token=QSECRETQ"
    ));
    sb.start();
    sb.submit_json(&delete("del-3", "run-d", 1, "duplicate record"));
    let outcome = sb.outcome_in("del-3", "awaiting_review");
    let digest = outcome["digest"].as_str().unwrap();

    let out = sb.cli(&["approve", "del-3", "--as", "alice", "--digest", digest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sb.outcome_in("del-3", "applied");
    assert_eq!(
        sb.rows("SELECT id FROM customers ORDER BY id"),
        vec![vec![json!(2)]]
    );

    let log = eventually("the webhook to give up", || {
        let log = sb.log();
        log.contains("webhook delivery failed; giving up")
            .then_some(log)
    });
    assert!(log.contains(&format!("http://127.0.0.1:{port}")), "{log}");
    assert!(sb.stop().success());
    let log = sb.log();
    assert!(
        !log.contains("XSECRETX") && !log.contains("QSECRETQ"),
        "the webhook's path and query are secrets:\n{log}"
    );
}
