//! The URL source against a tiny HTTP server in the test: the first
//! response announces the whole bundle and drops the connection half-way;
//! the agent resumes with a Range request (If-Range on the ETag) and
//! installs the bundle. A changed file (new ETag) is fetched whole.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::*;

struct Server {
    url: String,
    /// `Range` / `If-Range` headers of each request, in order ("-" when absent).
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

/// Serves `body` with ETag `etag`; the first `drops` responses stop after half the body.
fn serve(body: Vec<u8>, etag: &'static str, drops: usize) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/updates/airlock_1.1.airlock",
        listener.local_addr().unwrap()
    );
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for (served, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut range, mut if_range) = ("-".to_string(), "-".to_string());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range:") {
                    range = v.trim().to_string();
                }
                if let Some(v) = lower.strip_prefix("if-range:") {
                    if_range = v.trim().to_string();
                }
            }
            seen.lock().unwrap().push((range.clone(), if_range.clone()));
            let start = range
                .strip_prefix("bytes=")
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            let start = match start {
                Some(s) if if_range == "-" || if_range == etag => s,
                _ => 0,
            };
            let head = if start > 0 {
                format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nETag: {etag}\r\nConnection: close\r\n\r\n", body.len() - start, body.len() - 1, body.len())
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {etag}\r\nConnection: close\r\n\r\n", body.len())
            };
            conn.write_all(head.as_bytes()).unwrap();
            let rest = &body[start..];
            if served < drops {
                let _ = conn.write_all(&rest[..rest.len() / 2]);
            } else {
                let _ = conn.write_all(rest);
            }
            let _ = conn.flush();
            let _ = conn.shutdown(std::net::Shutdown::Both);
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        }
    });
    Server { url, requests }
}

#[test]
fn download_resumes_after_a_dropped_connection_and_installs() {
    let s = Scene::new();
    let bundle =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    let server = serve(bundle.clone(), "\"v1\"", 1);
    let out = run(s
        .agent()
        .args(["apply", "--retry-delay", "0", "--url", &server.url]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("reboot pending"));
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0], ("-".to_string(), "-".to_string()));
    let half = bundle.len() / 2;
    assert_eq!(
        reqs[1],
        (format!("bytes={half}-"), "\"v1\"".to_string()),
        "resume must ask for the rest only"
    );
    assert!(s.path("esp/EFI/Linux/airlock_1.1+3.efi").exists());
    assert!(
        walk(&s.path("state/staging")).is_empty(),
        "download left in staging"
    );
}

#[test]
fn a_partial_download_is_resumed_by_the_next_run_or_restarted_if_the_file_changed() {
    let s = Scene::new();
    let bundle =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    // The server drops every response: the run gives up, keeping the part file.
    let server = serve(bundle.clone(), "\"v1\"", usize::MAX);
    let out = run(s
        .agent()
        .args(["apply", "--retry-delay", "0", "--url", &server.url]));
    assert_eq!(out.status.code(), Some(31), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gave up after"),
        "{}",
        text(&out)
    );
    let part = s.path("state/staging/airlock_1.1.airlock.part");
    let have = std::fs::metadata(&part).unwrap().len() as usize;
    assert!(
        have > bundle.len() / 2 && have < bundle.len(),
        "{have} of {}",
        bundle.len()
    );
    assert_eq!(
        std::fs::read(&part).unwrap(),
        bundle[..have],
        "the part file must be a prefix of the bundle"
    );

    // Another server with the same file resumes where the part ends.
    let same = serve(bundle.clone(), "\"v1\"", 0);
    let out = run(s
        .agent()
        .args(["apply", "--retry-delay", "0", "--url", &same.url]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(same.requests.lock().unwrap()[0].0, format!("bytes={have}-"));

    // A changed file (other ETag) is sent whole, not spliced onto the part.
    let s = Scene::new();
    let v1 = std::fs::read(s.bundle("v1.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    let first = serve(v1, "\"v1\"", usize::MAX);
    assert_eq!(
        run(s
            .agent()
            .args(["apply", "--retry-delay", "0", "--url", &first.url]))
        .status
        .code(),
        Some(31)
    );
    let v2 = std::fs::read(s.bundle(
        "v2.airlock",
        &BundleSpec {
            uki_len: 200_000,
            ..BundleSpec::new("1.1")
        },
        &["bob"],
    ))
    .unwrap();
    let changed = serve(v2, "\"v2\"", 0);
    let out = run(s
        .agent()
        .args(["apply", "--retry-delay", "0", "--url", &changed.url]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let reqs = changed.requests.lock().unwrap().clone();
    assert_eq!(reqs[0].1, "\"v1\"", "the old validator goes in If-Range");
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed by bob@example.org"));
}

#[test]
fn a_missing_file_fails_at_once() {
    let s = Scene::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/nope.airlock", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let out = run(s
        .agent()
        .args(["apply", "--retry-delay", "0", "--url", &url]));
    assert_eq!(out.status.code(), Some(31), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 404"),
        "{}",
        text(&out)
    );
}
