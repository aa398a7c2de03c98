//! The clipboard gateway in the booted test image (P12, P13, P2): the
//! supervisor starts `airlock-gateway` as its own user in its own domain;
//! text copied in the general test guest can be pasted, sanitised, in the
//! classified one; nothing the classified guest copies reaches the general
//! guest; every attempt is in the audit log, without content.
//!
//! The nested test guests play the Windows guests' spice-vdagent
//! (ci/test-guest: `clip-set`, `clip-request`, `clip-received`, `vdagent-log`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;

use super::boot::sh;
use super::supervisor::guest;
use super::Suite;
use crate::Vm;

pub const TESTS: &[&str] = &[
    "clipboard: the gateway runs as airlock-gateway in airlock_gateway_t, in its own cgroup",
    "clipboard: text and an image copied in the general guest are pasted, sanitised, in the classified guest (P12)",
    "clipboard: nothing copied in the classified guest reaches the general guest (P13)",
    "clipboard: the audit log records every attempt, without content",
];

const AUDIT_LOG: &str = "/var/log/airlock/clipboard.log";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Asks `command` of the side's guest until `want` holds for its reply.
fn poll(
    vm: &mut Vm,
    side: &str,
    command: &str,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = guest(vm, side, command)?;
        if want(&reply) {
            return Ok(reply);
        }
        if Instant::now() > deadline {
            bail!("`{command}` in the {side} guest still says {reply:?} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn counters(vm: &mut Vm, side: &str) -> Result<std::collections::BTreeMap<String, u64>> {
    Ok(airlock_test_guest::client::counters(&guest(
        vm,
        side,
        "vdagent-log",
    )?))
}

fn check_gateway_process(vm: &mut Vm) -> Result<String> {
    let status = sh(vm, "airlockd status")?;
    let status: serde_json::Value = serde_json::from_str(status.trim())
        .with_context(|| format!("airlockd status: {status}"))?;
    ensure!(
        status["gateway"]["state"] == "running",
        "the gateway is not running: {status}"
    );
    let pid = status["gateway"]["pid"]
        .as_i64()
        .context("no gateway pid")?;
    let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
    ensure!(
        context.contains(":airlock_gateway_t:"),
        "the gateway (pid {pid}) runs as {context:?}"
    );
    let user = sh(vm, &format!("stat -c %U /proc/{pid}"))?
        .trim()
        .to_string();
    ensure!(user == "airlock-gateway", "the gateway runs as user {user}");
    let cgroup = sh(vm, &format!("cut -d: -f3 /proc/{pid}/cgroup"))?
        .trim()
        .to_string();
    ensure!(
        cgroup.ends_with("/gateway"),
        "the gateway is in cgroup {cgroup}"
    );
    Ok(format!(
        "pid {pid} user {user} {} cgroup {cgroup}",
        context.trim()
    ))
}

/// The gateway announces itself to each guest once it is connected.
fn wait_connected(vm: &mut Vm) -> Result<()> {
    for side in ["general", "classified"] {
        poll(vm, side, "vdagent-log", Duration::from_secs(60), |l| {
            airlock_test_guest::client::counters(l)
                .get("rx.announce-capabilities")
                .is_some_and(|n| *n > 0)
        })
        .with_context(|| format!("the gateway never announced itself to the {side} guest"))?;
    }
    Ok(())
}

/// Copies `data` of clipboard type `ty` (`utf8`, `png`) in the general
/// guest; pastes in the classified guest until what arrives passes
/// `accept`. Returns the seconds it took.
fn copy_and_paste(
    vm: &mut Vm,
    ty: &str,
    data: &[u8],
    accept: impl Fn(&[u8]) -> Result<()>,
) -> Result<f64> {
    let engine = base64::engine::general_purpose::STANDARD;
    let start = Instant::now();
    let reply = guest(
        vm,
        "general",
        &format!("clip-set {ty} {}", engine.encode(data)),
    )?;
    ensure!(
        reply.starts_with(&format!("ok grabbed {ty}")),
        "general clip-set: {reply}"
    );
    let prefix = format!("clip {ty} ");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        // The gateway offers the sanitised data with a grab; a paste is a request.
        poll(
            vm,
            "classified",
            "clip-grabs",
            Duration::from_secs(30),
            |l| l == format!("grabs {ty}"),
        )?;
        guest(vm, "classified", &format!("clip-request {ty}"))?;
        if let Ok(reply) = poll(
            vm,
            "classified",
            "clip-received",
            Duration::from_secs(3),
            |l| l.starts_with(&prefix) && l != last,
        ) {
            let bytes = engine
                .decode(reply[prefix.len()..].trim())
                .context("clip-received is not base64")?;
            match accept(&bytes) {
                Ok(()) => return Ok(start.elapsed().as_secs_f64()),
                Err(e) => last = format!("{reply} ({e:#})"),
            }
        }
        if Instant::now() > deadline {
            bail!("the {ty} copy did not arrive as expected in the classified guest; it last received {last:?}");
        }
    }
}

fn expect_text(expected: &'static str) -> impl Fn(&[u8]) -> Result<()> {
    move |got| {
        ensure!(
            got == expected.as_bytes(),
            "got {:?}, want {expected:?}",
            String::from_utf8_lossy(got)
        );
        Ok(())
    }
}

/// A 64×48 gradient: every pixel differs from its neighbours, so a
/// re-encoding that loses or shifts anything shows.
fn test_picture() -> image::RgbaImage {
    image::RgbaImage::from_fn(64, 48, |x, y| {
        image::Rgba([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8, 255])
    })
}

fn check_general_to_classified(vm: &mut Vm) -> Result<String> {
    wait_connected(vm)?;
    let plain = copy_and_paste(
        vm,
        "utf8",
        b"hello from general\nline two",
        expect_text("hello from general\r\nline two"),
    )?;
    // A right-to-left override and an isolate are removed on the way.
    let bidi = copy_and_paste(
        vm,
        "utf8",
        "invoice\u{202E}fdp.exe\u{2066} ok".as_bytes(),
        expect_text("invoicefdp.exe ok"),
    )?;
    // An image: decoded by the sanitiser and re-encoded as PNG, pixel for pixel.
    let picture = test_picture();
    let mut png = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let image = copy_and_paste(vm, "png", &png, |got| {
        let decoded = image::load_from_memory_with_format(got, image::ImageFormat::Png)
            .context("not a PNG")?
            .to_rgba8();
        ensure!(
            decoded.dimensions() == picture.dimensions(),
            "{:?} instead of {:?}",
            decoded.dimensions(),
            picture.dimensions()
        );
        ensure!(decoded.as_raw() == picture.as_raw(), "the pixels differ");
        Ok(())
    })?;
    Ok(format!(
        "text arrived with Windows line ends in {plain:.1}s; bidi overrides stripped ({bidi:.1}s); a {}x{} PNG arrived re-encoded, same pixels ({image:.1}s)",
        picture.width(),
        picture.height()
    ))
}

fn check_classified_to_general(vm: &mut Vm) -> Result<String> {
    wait_connected(vm)?;
    let before = counters(vm, "general")?;
    let reply = guest(
        vm,
        "classified",
        &format!("clip-set utf8 {}", b64("classified secret")),
    )?;
    ensure!(
        reply.starts_with("ok grabbed utf8"),
        "classified clip-set: {reply}"
    );
    // The gateway's refusal shows in the audit log; then give it time to do anything wrong.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sh(vm, &format!("cat {AUDIT_LOG}"))?.contains("direction=classified->general") {
        ensure!(
            Instant::now() < deadline,
            "no classified->general record in {AUDIT_LOG}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    let grabs = guest(vm, "general", "clip-grabs")?;
    let received = guest(vm, "general", "clip-received")?;
    let after = counters(vm, "general")?;
    ensure!(
        before == after,
        "the general guest received something after the copy in classified: {before:?} → {after:?}"
    );
    ensure!(
        received != format!("clip utf8 {}", b64("classified secret")),
        "the classified text reached the general guest"
    );
    // A paste in general is answered empty.
    guest(vm, "general", "clip-request utf8")?;
    let rx = before.get("rx.clipboard").copied().unwrap_or(0);
    poll(vm, "general", "vdagent-log", Duration::from_secs(20), |l| {
        airlock_test_guest::client::counters(l)
            .get("rx.clipboard")
            .copied()
            .unwrap_or(0)
            > rx
    })
    .context("the gateway did not answer the general guest's paste")?;
    let answered = guest(vm, "general", "clip-received")?;
    ensure!(
        !answered.contains(&b64("classified secret")),
        "the general guest's paste got the classified text"
    );
    Ok(format!("general guest: {grabs}, {received} after the classified copy; its paste answered with {answered:?}"))
}

fn check_audit_log(vm: &mut Vm) -> Result<String> {
    let audit = sh(vm, &format!("cat {AUDIT_LOG}"))?;
    let accepted = audit
        .lines()
        .filter(|l| l.contains("direction=general->classified") && l.contains("result=accepted"))
        .count();
    let refused = audit
        .lines()
        .filter(|l| l.contains("direction=classified->general") && l.contains("result=rejected"))
        .count();
    ensure!(accepted >= 3 && refused >= 1, "expected ≥3 accepted general->classified (2 texts, 1 image) and ≥1 rejected classified->general records:\n{audit}");
    for secret in ["hello", "invoice", "secret"] {
        ensure!(
            !audit.contains(secret),
            "content in the audit log:\n{audit}"
        );
    }
    let label = sh(vm, &format!("stat -c '%U %a %C' {AUDIT_LOG}"))?;
    ensure!(
        label.contains("airlock_audit_log_t"),
        "{AUDIT_LOG}: {label}"
    );
    Ok(format!(
        "{accepted} accepted, {refused} refused; {}",
        label.trim()
    ))
}

pub fn clipboard_checks(suite: &mut Suite, vm: &mut Vm) {
    suite.test(TESTS[0], || check_gateway_process(vm));
    suite.test(TESTS[1], || check_general_to_classified(vm));
    suite.test(TESTS[2], || check_classified_to_general(vm));
    suite.test(TESTS[3], || check_audit_log(vm));
}
