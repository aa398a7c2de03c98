//! The URL source against a tiny HTTP server in the test. The agent first
//! reads the offered bundle's header (one request, closed after the header:
//! the running version, or an untrusted bundle, ends there). Then the
//! download: a response that announces the whole bundle and drops the
//! connection half-way is resumed with a Range request (If-Range on the
//! ETag) and the bundle installed. A changed file (new ETag) is fetched
//! whole.

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

/// `airlock-update apply --url URL` on `s`, no pause between attempts.
fn apply_from(s: &Scene, url: &str) -> std::process::Output {
    run(s
        .agent()
        .args(["apply", "--retry-delay", "0", "--url", url]))
}

#[test]
fn download_resumes_after_a_dropped_connection_and_installs() {
    let s = Scene::new();
    let bundle =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    // Two dropped responses: the header check's (it needs only the
    // header), then the download's first.
    let server = serve(bundle.clone(), "\"v1\"", 2);
    let out = apply_from(&s, &server.url);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("reboot pending"));
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert_eq!(reqs[0], ("-".to_string(), "-".to_string()));
    assert_eq!(reqs[1], ("-".to_string(), "-".to_string()));
    let half = bundle.len() / 2;
    assert_eq!(
        reqs[2],
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
    let out = apply_from(&s, &server.url);
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
    let out = apply_from(&s, &same.url);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(same.requests.lock().unwrap()[1].0, format!("bytes={have}-"));

    // A changed file (other ETag) is sent whole, not spliced onto the part.
    let s = Scene::new();
    let v1 = std::fs::read(s.bundle("v1.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    let first = serve(v1, "\"v1\"", usize::MAX);
    assert_eq!(apply_from(&s, &first.url).status.code(), Some(31));
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
    let out = apply_from(&s, &changed.url);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let reqs = changed.requests.lock().unwrap().clone();
    assert_eq!(reqs[1].1, "\"v1\"", "the old validator goes in If-Range");
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
    let out = apply_from(&s, &url);
    assert_eq!(out.status.code(), Some(31), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 404"),
        "{}",
        text(&out)
    );
}

/// The periodic check when the server offers what runs already: one
/// request, closed after the header; nothing downloaded or written.
#[test]
fn the_running_version_on_the_server_is_left_alone_after_its_header() {
    let s = Scene::new();
    let bundle =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    s.boot("1.1", 1);
    let before = s.snapshot();
    let server = serve(bundle, "\"v1\"", 0);
    let out = apply_from(&s, &server.url);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("offers airlock 1.1, which is running already; nothing to do"),
        "{}",
        text(&out)
    );
    assert_eq!(server.requests.lock().unwrap().len(), 1);
    assert_eq!(s.snapshot(), before, "something was written");
    assert!(!s.path("state/staging").exists(), "something was staged");
}

/// A bundle on the server signed by nobody trusted is refused from its
/// header: its payload is never downloaded, nothing is written, and the
/// refusal is the last result (IT's info page).
#[test]
fn an_untrusted_bundle_on_the_server_is_refused_before_its_payload() {
    let s = Scene::new();
    let bundle =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["mallory"])).unwrap();
    let before = s.snapshot();
    let server = serve(bundle, "\"v1\"", 0);
    let out = apply_from(&s, &server.url);
    assert_eq!(out.status.code(), Some(16), "{}", text(&out));
    assert_eq!(
        server.requests.lock().unwrap().len(),
        1,
        "downloaded after all"
    );
    assert_eq!(s.snapshot(), before, "something was written");
    assert!(!s.path("state/staging").exists(), "something was staged");
    let status = ok(s.agent().args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let last = &status["last"];
    assert_eq!(last["result"], "refused", "{status}");
    assert!(
        last["message"].as_str().unwrap_or("").contains(&server.url),
        "{status}"
    );
}

/// `--update-server` takes the URL from the appliance configuration; with
/// none configured there is nothing to do, and a bad one is named.
#[test]
fn the_update_server_comes_from_the_appliance_configuration() {
    let s = Scene::new();
    let shipped = s.path("appliance.toml");
    std::fs::write(
        &shipped,
        include_str!("../../../ci/test-agent/overlay/etc/airlock/appliance.toml"),
    )
    .unwrap();
    let machine = s.path("machine.toml");
    let agent = |s: &Scene| {
        let mut c = s.agent();
        c.args(["apply", "--update-server", "--appliance-config"])
            .arg(&shipped)
            .arg("--machine-settings")
            .arg(&machine);
        c
    };
    // The test PC's machine file without its update server.
    let test_pc = include_str!("../../../ci/test-agent/machine.toml");
    let without = test_pc.split("[network.update]").next().unwrap();
    std::fs::write(&machine, without).unwrap();
    let out = ok(&mut agent(&s));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("no update server in the appliance configuration"),
        "{}",
        text(&out)
    );
    std::fs::write(
        &machine,
        format!("{without}\n[network.update]\nurl = \"http://updates.example/airlock/current.airlock\"\nuplink = \"general\"\n"),
    )
    .unwrap();
    let out = run(&mut agent(&s));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("network.update.url"),
        "{}",
        text(&out)
    );
}

/// A version installed already (waiting for the next start), or marked bad
/// by a failed health gate on this PC, is not downloaded again; an older
/// one is refused from its header. One request each, nothing written.
#[test]
fn installed_failed_or_older_versions_end_at_the_header() {
    let s = Scene::new();
    let bundle =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    let server = serve(bundle, "\"v1\"", 0);
    let apply = |s: &Scene| apply_from(s, &server.url);
    let out = apply(&s);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(s.path("esp/EFI/Linux/airlock_1.1+3.efi").exists());
    let requests = || server.requests.lock().unwrap().len();
    let asked = requests();

    // Installed, not yet started.
    let before = s.snapshot();
    let out = apply(&s);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "offers airlock 1.1, which is installed already (airlock_1.1+3.efi) and starts at the next power-on; nothing to do"
        ),
        "{}",
        text(&out)
    );
    assert_eq!(requests(), asked + 1);
    assert_eq!(s.snapshot(), before);

    // Its tries used up by failed health gates: not installed again.
    std::fs::rename(
        s.path("esp/EFI/Linux/airlock_1.1+3.efi"),
        s.path("esp/EFI/Linux/airlock_1.1+0-3.efi"),
    )
    .unwrap();
    let before = s.snapshot();
    let out = apply(&s);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("which failed its health gate on this PC (airlock_1.1+0-3.efi, 3 tries)"),
        "{}",
        text(&out)
    );
    assert_eq!(requests(), asked + 2);
    assert_eq!(s.snapshot(), before);

    // A PC that runs a newer version: refused from the header.
    let s = Scene::new();
    let older =
        std::fs::read(s.bundle("src.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    let server = serve(older, "\"v1\"", 0);
    s.boot("1.2", 1);
    let before = s.snapshot();
    let out = apply_from(&s, &server.url);
    assert_eq!(out.status.code(), Some(21), "{}", text(&out));
    assert_eq!(
        server.requests.lock().unwrap().len(),
        1,
        "downloaded after all"
    );
    assert_eq!(s.snapshot(), before);
    assert!(!s.path("state/staging").exists(), "something was staged");
}

/// A server that serves something else than a bundle (an error page, a
/// truncated upload): refused from its first bytes, nothing written.
#[test]
fn garbage_on_the_server_is_refused_from_its_first_bytes() {
    let s = Scene::new();
    let before = s.snapshot();
    let server = serve(
        b"<html>503 Service Unavailable</html>\n".to_vec(),
        "\"x\"",
        0,
    );
    let out = apply_from(&s, &server.url);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    assert_eq!(server.requests.lock().unwrap().len(), 1);
    assert_eq!(s.snapshot(), before, "something was written");
    assert!(!s.path("state/staging").exists(), "something was staged");
}
