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
    "clipboard: text copied in the general guest is pasted, sanitised, in the classified guest (P12)",
    "clipboard: nothing copied in the classified guest reaches the general guest (P13)",
    "clipboard: the audit log records every attempt, without content",
];

const AUDIT_LOG: &str = "/var/log/airlock/clipboard.log";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Asks `command` of the side's guest until `want` holds for its reply.
fn poll(vm: &mut Vm, side: &str, command: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<String> {
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
    Ok(airlock_test_guest::client::counters(&guest(vm, side, "vdagent-log")?))
}

fn check_gateway_process(vm: &mut Vm) -> Result<String> {
    let status = sh(vm, "airlockd status")?;
    let status: serde_json::Value = serde_json::from_str(status.trim()).with_context(|| format!("airlockd status: {status}"))?;
    ensure!(status["gateway"]["state"] == "running", "the gateway is not running: {status}");
    let pid = status["gateway"]["pid"].as_i64().context("no gateway pid")?;
    let context = sh(vm, &format!("tr -d '\\0' < /proc/{pid}/attr/current"))?;
    ensure!(context.contains(":airlock_gateway_t:"), "the gateway (pid {pid}) runs as {context:?}");
    let user = sh(vm, &format!("stat -c %U /proc/{pid}"))?.trim().to_string();
    ensure!(user == "airlock-gateway", "the gateway runs as user {user}");
    let cgroup = sh(vm, &format!("cut -d: -f3 /proc/{pid}/cgroup"))?.trim().to_string();
    ensure!(cgroup.ends_with("/gateway"), "the gateway is in cgroup {cgroup}");
    Ok(format!("pid {pid} user {user} {} cgroup {cgroup}", context.trim()))
}

/// The gateway announces itself to each guest once it is connected.
fn wait_connected(vm: &mut Vm) -> Result<()> {
    for side in ["general", "classified"] {
        poll(vm, side, "vdagent-log", Duration::from_secs(60), |l| {
            airlock_test_guest::client::counters(l).get("rx.announce-capabilities").is_some_and(|n| *n > 0)
        })
        .with_context(|| format!("the gateway never announced itself to the {side} guest"))?;
    }
    Ok(())
}

/// Copies `text` in the general guest; pastes in the classified guest until
/// `expected` arrives. Returns the seconds it took.
fn copy_and_paste(vm: &mut Vm, text: &str, expected: &str) -> Result<f64> {
    let start = Instant::now();
    let reply = guest(vm, "general", &format!("clip-set utf8 {}", b64(text)))?;
    ensure!(reply.starts_with("ok grabbed utf8"), "general clip-set: {reply}");
    let want = format!("clip utf8 {}", b64(expected));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The gateway offers the sanitised text with a grab; a paste is a request.
        poll(vm, "classified", "clip-grabs", Duration::from_secs(30), |l| l == "grabs utf8")?;
        guest(vm, "classified", "clip-request utf8")?;
        let last = poll(vm, "classified", "clip-received", Duration::from_secs(3), |l| l == want).or_else(|_| guest(vm, "classified", "clip-received"))?;
        if last == want {
            return Ok(start.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("{expected:?} did not arrive in the classified guest; it last received {last:?}");
        }
    }
}

fn check_general_to_classified(vm: &mut Vm) -> Result<String> {
    wait_connected(vm)?;
    let plain = copy_and_paste(vm, "hello from general\nline two", "hello from general\r\nline two")?;
    // A right-to-left override and an isolate are removed on the way.
    let bidi = copy_and_paste(vm, "invoice\u{202E}fdp.exe\u{2066} ok", "invoicefdp.exe ok")?;
    Ok(format!("text arrived with Windows line ends in {plain:.1}s; bidi overrides stripped ({bidi:.1}s)"))
}

fn check_classified_to_general(vm: &mut Vm) -> Result<String> {
    wait_connected(vm)?;
    let before = counters(vm, "general")?;
    let reply = guest(vm, "classified", &format!("clip-set utf8 {}", b64("classified secret")))?;
    ensure!(reply.starts_with("ok grabbed utf8"), "classified clip-set: {reply}");
    // The gateway's refusal shows in the audit log; then give it time to do anything wrong.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sh(vm, &format!("cat {AUDIT_LOG}"))?.contains("direction=classified->general") {
        ensure!(Instant::now() < deadline, "no classified->general record in {AUDIT_LOG}");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    let grabs = guest(vm, "general", "clip-grabs")?;
    let received = guest(vm, "general", "clip-received")?;
    let after = counters(vm, "general")?;
    ensure!(before == after, "the general guest received something after the copy in classified: {before:?} → {after:?}");
    ensure!(received != format!("clip utf8 {}", b64("classified secret")), "the classified text reached the general guest");
    // A paste in general is answered empty.
    guest(vm, "general", "clip-request utf8")?;
    let rx = before.get("rx.clipboard").copied().unwrap_or(0);
    poll(vm, "general", "vdagent-log", Duration::from_secs(20), |l| airlock_test_guest::client::counters(l).get("rx.clipboard").copied().unwrap_or(0) > rx)
        .context("the gateway did not answer the general guest's paste")?;
    let answered = guest(vm, "general", "clip-received")?;
    ensure!(!answered.contains(&b64("classified secret")), "the general guest's paste got the classified text");
    Ok(format!("general guest: {grabs}, {received} after the classified copy; its paste answered with {answered:?}"))
}

fn check_audit_log(vm: &mut Vm) -> Result<String> {
    let audit = sh(vm, &format!("cat {AUDIT_LOG}"))?;
    let accepted = audit.lines().filter(|l| l.contains("direction=general->classified") && l.contains("result=accepted")).count();
    let refused = audit.lines().filter(|l| l.contains("direction=classified->general") && l.contains("result=rejected")).count();
    ensure!(accepted >= 2 && refused >= 1, "expected ≥2 accepted general->classified and ≥1 rejected classified->general records:\n{audit}");
    for secret in ["hello", "invoice", "secret"] {
        ensure!(!audit.contains(secret), "content in the audit log:\n{audit}");
    }
    let label = sh(vm, &format!("stat -c '%U %a %C' {AUDIT_LOG}"))?;
    ensure!(label.contains("airlock_audit_log_t"), "{AUDIT_LOG}: {label}");
    Ok(format!("{accepted} accepted, {refused} refused; {}", label.trim()))
}

pub fn clipboard_checks(suite: &mut Suite, vm: &mut Vm) {
    suite.test(TESTS[0], || check_gateway_process(vm));
    suite.test(TESTS[1], || check_general_to_classified(vm));
    suite.test(TESTS[2], || check_classified_to_general(vm));
    suite.test(TESTS[3], || check_audit_log(vm));
}
