//! `airlock-update apply` against a file-backed appliance (see
//! `common/mod.rs`): the refusal matrix, each refused with its own exit
//! code before a byte is written (disk image and ESP compared byte for
//! byte, disk mtime too); a successful update A → B and the next one B → A;
//! interruptions at two points that leave the ESP as it was, then a retry
//! that succeeds; the drop directory; an update stick; reboot when idle;
//! status.

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;

use common::*;

/// Applies `bundle` and expects a refusal with `code`, one line on stderr
/// naming `reason`, and nothing changed on the disk or the ESP.
fn refused(s: &Scene, bundle: &std::path::Path, code: i32, reason: &str) {
    let before = s.snapshot();
    let out = s.apply(bundle, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{reason}: {}", text(&out));
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("airlock-update: refused: ") && last.contains(reason),
        "expected {reason:?} in the last line: {}",
        text(&out)
    );
    assert_eq!(
        s.snapshot(),
        before,
        "{reason}: the disk or the ESP changed"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path("state/state.json")).unwrap()).unwrap();
    assert_eq!(state["last"]["result"], "refused", "{reason}");
}

#[test]
fn refusal_matrix_writes_nothing() {
    let mut s = Scene::new();
    let good = BundleSpec::new("1.1");

    refused(
        &s,
        &s.bundle("wrong-key.airlock", &good, &["mallory"]),
        16,
        "none of the bundle's 1 signature(s) is by a trusted key",
    );
    refused(
        &s,
        &s.bundle("unsigned.airlock", &good, &[]),
        16,
        "not signed",
    );

    s.threshold = 2;
    refused(
        &s,
        &s.bundle("one-of-two.airlock", &good, &["alice"]),
        17,
        "only 1 distinct trusted key(s) signed, 2 needed",
    );
    s.threshold = 1;

    let signed = s.bundle("good.airlock", &good, &["alice"]);
    let bytes = std::fs::read(&signed).unwrap();
    let (m, payload) = s.manifest(&good);
    let manifest_len = m.to_json().len();

    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 1000;
    corrupt[last] ^= 0x01;
    std::fs::write(s.path("payload-byte.airlock"), &corrupt).unwrap();
    refused(
        &s,
        &s.path("payload-byte.airlock"),
        19,
        "artifact uki is corrupted",
    );

    let mut corrupt = bytes.clone();
    corrupt[16 + manifest_len / 2] ^= 0x20;
    std::fs::write(s.path("manifest-byte.airlock"), &corrupt).unwrap();
    refused(
        &s,
        &s.path("manifest-byte.airlock"),
        15,
        "does not match the manifest",
    );

    std::fs::write(s.path("truncated.airlock"), &bytes[..bytes.len() - 100]).unwrap();
    refused(&s, &s.path("truncated.airlock"), 11, "truncated");
    std::fs::write(s.path("header-only.airlock"), &bytes[..40]).unwrap();
    refused(&s, &s.path("header-only.airlock"), 11, "truncated");

    let mut junk = bytes.clone();
    junk.extend_from_slice(b"\0junk");
    std::fs::write(s.path("junk.airlock"), &junk).unwrap();
    refused(&s, &s.path("junk.airlock"), 12, "bytes after its payload");

    refused(
        &s,
        &s.bundle("downgrade.airlock", &BundleSpec::new("0.9"), &["alice"]),
        21,
        "not newer than the running 1.0",
    );
    refused(
        &s,
        &s.bundle("reinstall.airlock", &BundleSpec::new("1.0"), &["alice"]),
        21,
        "not newer",
    );

    std::fs::create_dir_all(s.path("state")).unwrap();
    std::fs::write(s.path("state/state.json"), "{\"security_epoch\": 3}").unwrap();
    refused(
        &s,
        &s.bundle(
            "epoch.airlock",
            &BundleSpec {
                epoch: 2,
                ..BundleSpec::new("1.1")
            },
            &["alice"],
        ),
        22,
        "security epoch 2 is below the stored 3",
    );
    std::fs::write(s.path("state/state.json"), "{\"security_epoch\": 1}").unwrap();

    let fedora = BundleSpec {
        compatible: "airlock-fedora-x86_64".into(),
        ..BundleSpec::new("1.1")
    };
    refused(
        &s,
        &s.bundle("compatible.airlock", &fedora, &["alice"]),
        20,
        "the bundle is for \"airlock-fedora-x86_64\"",
    );

    // Absurd sizes: a manifest length of 4 GiB in the header; an artifact
    // larger than its slot partition (2 MiB); an artifact of 17 GiB.
    let mut absurd = bytes.clone();
    absurd[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(s.path("absurd-manifest.airlock"), &absurd).unwrap();
    refused(
        &s,
        &s.path("absurd-manifest.airlock"),
        13,
        "manifest of 4294967295 is absurd",
    );
    let big = BundleSpec {
        root_len: (3 * MIB) as usize,
        ..BundleSpec::new("1.1")
    };
    refused(
        &s,
        &s.bundle("too-big.airlock", &big, &["alice"]),
        23,
        "artifact root has 3145728 bytes, its slot only 2097152",
    );
    let mut huge = m.clone();
    huge.artifacts[0].size = 17 << 30;
    let hb = huge.to_json();
    let mut out = airlock_bundle::format::RawHeader {
        manifest: hb.clone(),
        signatures: vec![s.sign(&hb, "alice")],
    }
    .encode()
    .unwrap();
    out.extend_from_slice(&payload);
    std::fs::write(s.path("huge.airlock"), out).unwrap();
    refused(&s, &s.path("huge.airlock"), 18, "outside 1..=");

    std::fs::write(
        s.path("not-a-bundle.airlock"),
        b"\x7fELF and so on, not a bundle",
    )
    .unwrap();
    refused(
        &s,
        &s.path("not-a-bundle.airlock"),
        10,
        "not an airlock bundle",
    );

    // And the good one is accepted after all of that.
    let out = s.apply(&signed, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn update_a_to_b_then_b_to_a() {
    let s = Scene::new();
    let slot_a_before = s.partition_sha256(2, 2 * MIB);
    let spec = BundleSpec::new("1.1");
    let out = s.apply(&s.bundle("1.1.airlock", &spec, &["bob"]), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1.1 installed in slot B as airlock_1.1+3.efi")
            && stdout.trim_end().ends_with("reboot pending"),
        "{stdout}"
    );

    // Slot B holds the new root and verity, named as the builder names them.
    let (m, _) = s.manifest(&spec);
    let hash = |k: airlock_bundle::ArtifactKind| m.artifact(k).unwrap().clone();
    let (root, verity, uki) = (
        hash(airlock_bundle::ArtifactKind::Root),
        hash(airlock_bundle::ArtifactKind::Verity),
        hash(airlock_bundle::ArtifactKind::Uki),
    );
    assert_eq!(s.partition_sha256(4, root.size), root.sha256);
    assert_eq!(s.partition_sha256(5, verity.size), verity.sha256);
    let (ru, vu) = uuids(&root_hash_for("1.1"));
    assert_eq!(s.label_and_uuid(4), ("root_airlock_1.1".to_string(), ru));
    assert_eq!(s.label_and_uuid(5), ("verity_airlock_1.1".to_string(), vu));
    // Slot A untouched, old entry kept as the fallback, new one counting.
    assert_eq!(s.partition_sha256(2, 2 * MIB), slot_a_before);
    assert_eq!(s.label_and_uuid(2).0, "root_airlock_1.0");
    let esp: Vec<String> = walk(&s.path("esp/EFI/Linux"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(esp, ["airlock_1.0.efi", "airlock_1.1+3.efi"]);
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            std::fs::read(s.path("esp/EFI/Linux/airlock_1.1+3.efi")).unwrap()
        )),
        uki.sha256
    );
    assert!(
        walk(&s.path("state/staging")).is_empty(),
        "staged UKI left behind"
    );

    // Status before the reboot: booted A, B on trial.
    let out = ok(s.agent().args(["status", "--json"]));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["slots"][0]["booted"], true);
    assert_eq!(st["slots"][1]["image"], "airlock_1.1");
    assert_eq!(st["slots"][1]["entry"], "airlock_1.1+3.efi");
    assert_eq!(
        st["slots"][1]["blessing"],
        "on trial (3 tries left, 0 used)"
    );
    assert_eq!(st["last"]["result"], "applied");

    // The machine boots B; while it is on trial, no further update.
    s.boot("1.1", 1);
    std::fs::rename(
        s.path("esp/EFI/Linux/airlock_1.1+3.efi"),
        s.path("esp/EFI/Linux/airlock_1.1+2-1.efi"),
    )
    .unwrap();
    let out = s.apply(
        &s.bundle("1.2.airlock", &BundleSpec::new("1.2"), &["alice"]),
        &[],
    );
    assert_eq!(out.status.code(), Some(24), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("airlock_1.1+2-1.efi is still on trial"));

    // Blessed (systemd-bless-boot drops the counter): 1.2 goes to slot A,
    // whose old entry goes first; slot B is untouched.
    std::fs::rename(
        s.path("esp/EFI/Linux/airlock_1.1+2-1.efi"),
        s.path("esp/EFI/Linux/airlock_1.1.efi"),
    )
    .unwrap();
    let slot_b = s.partition_sha256(4, 2 * MIB);
    let out = s.apply(&s.path("1.2.airlock"), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("slot A"));
    assert_eq!(s.partition_sha256(4, 2 * MIB), slot_b);
    assert_eq!(s.label_and_uuid(2).0, "root_airlock_1.2");
    let esp: Vec<String> = walk(&s.path("esp/EFI/Linux"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(esp, ["airlock_1.1.efi", "airlock_1.2+3.efi"]);
    let text_status = String::from_utf8_lossy(&ok(s.agent().arg("status")).stdout).into_owned();
    assert!(
        text_status
            .contains("slot A: airlock_1.2 (partitions 2+3), entry airlock_1.2+3.efi: on trial"),
        "{text_status}"
    );
    assert!(
        text_status.contains("slot B: airlock_1.1, booted"),
        "{text_status}"
    );
}

#[test]
fn interrupted_slot_write_leaves_the_esp_and_slot_a_alone_and_a_retry_succeeds() {
    let s = Scene::new();
    let bundle = s.bundle("1.1.airlock", &BundleSpec::new("1.1"), &["alice"]);
    let esp_before = s.snapshot().esp;
    let slot_a = s.partition_sha256(2, 2 * MIB);
    for point in [
        &["--fail-slot-write-after", "1000000"][..],
        &["--fail-before-uki"][..],
    ] {
        let out = s.apply(&bundle, point);
        assert_eq!(out.status.code(), Some(1), "{point:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("fail point"),
            "{}",
            text(&out)
        );
        assert_eq!(s.snapshot().esp, esp_before, "{point:?}: the ESP changed");
        assert_eq!(
            s.partition_sha256(2, 2 * MIB),
            slot_a,
            "{point:?}: slot A changed"
        );
        assert_eq!(s.label_and_uuid(2).0, "root_airlock_1.0");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.path("state/state.json")).unwrap()).unwrap();
        assert_eq!(state["last"]["result"], "failed");
    }
    // After the slot write stopped, slot B is labelled empty: nothing claims it.
    let out = s.apply(&bundle, &["--fail-slot-write-after", "1000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(s.label_and_uuid(4).0, "_empty");
    let out = s.apply(&bundle, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(s.path("esp/EFI/Linux/airlock_1.1+3.efi").exists());
    assert_eq!(s.label_and_uuid(4).0, "root_airlock_1.1");
}

#[test]
fn drop_directory_takes_the_newest_bundle_and_retires_it() {
    let s = Scene::new();
    std::fs::create_dir(s.path("drop")).unwrap();
    let out = run(s.agent().args(["apply", "--drop-dir"]).arg(s.path("drop")));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let b = s.bundle(
        "drop/airlock_1.1.airlock",
        &BundleSpec::new("1.1"),
        &["alice"],
    );
    let out = run(s.agent().args(["apply", "--drop-dir"]).arg(s.path("drop")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!b.exists() && s.path("drop/airlock_1.1.airlock.applied").exists());
    s.bundle(
        "drop/airlock_0.5.airlock",
        &BundleSpec::new("0.5"),
        &["alice"],
    );
    let out = run(s.agent().args(["apply", "--drop-dir"]).arg(s.path("drop")));
    assert_eq!(out.status.code(), Some(21), "{}", text(&out));
    assert!(s.path("drop/airlock_0.5.airlock.refused").exists());
}

/// A "stick" as the agent sees a USB disk: a file standing for the whole
/// disk, the bundle from byte 0 and the rest of the disk after it.
fn stick(s: &Scene, name: &str, bundle: &[u8], disk_len: usize) -> std::path::PathBuf {
    let mut bytes = bundle.to_vec();
    // What a used stick holds after the bundle: anything, never read.
    bytes.extend((0..disk_len.saturating_sub(bundle.len())).map(|i| (i * 7 + 3) as u8));
    let path = s.path(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn update_stick_is_applied_from_its_first_bytes_and_other_disks_are_left_alone() {
    let s = Scene::new();
    let apply_stick = |disk: &std::path::Path| run(s.agent().args(["apply", "--stick"]).arg(disk));
    let staged = || {
        if s.path("state/staging").exists() {
            walk(&s.path("state/staging")).len()
        } else {
            0
        }
    };

    // Any other USB disk: left alone, exit 0, nothing written.
    let before = s.snapshot();
    let other = stick(&s, "other-disk", b"", 4 * MIB as usize);
    let out = apply_stick(&other);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no update bundle on this disk; left alone"),
        "{}",
        text(&out)
    );
    assert_eq!(s.snapshot(), before);

    // Untrusted: refused from the header, nothing copied to /var.
    let good =
        std::fs::read(s.bundle("good.airlock", &BundleSpec::new("1.1"), &["alice"])).unwrap();
    let evil =
        std::fs::read(s.bundle("evil.airlock", &BundleSpec::new("1.1"), &["mallory"])).unwrap();
    let untrusted = stick(&s, "untrusted-stick", &evil, evil.len() + 3 * MIB as usize);
    let out = apply_stick(&untrusted);
    assert_eq!(out.status.code(), Some(16), "{}", text(&out));
    assert_eq!(s.snapshot(), before);
    assert_eq!(staged(), 0, "an untrusted stick was copied");

    // Pulled out (or written short): the copy is shorter than the bundle.
    let short = stick(&s, "short-stick", &good[..good.len() - 4096], 0);
    let out = apply_stick(&short);
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    assert_eq!(s.snapshot(), before);
    assert_eq!(staged(), 0, "a partial copy was left");

    // A good stick: the bytes after the bundle are not part of it.
    let good_stick = stick(&s, "good-stick", &good, good.len() + 3 * MIB as usize);
    let out = apply_stick(&good_stick);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("update stick with airlock 1.1 signed by alice@example.org"),
        "{}",
        text(&out)
    );
    assert!(s.path("esp/EFI/Linux/airlock_1.1+3.efi").exists());
    assert_eq!(s.label_and_uuid(4).0, "root_airlock_1.1");
    assert_eq!(staged(), 0, "the staged copy was kept");

    // Left in after the update, once its version runs: nothing to do.
    s.boot("1.1", 1);
    let before = s.snapshot();
    let out = apply_stick(&good_stick);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("carries airlock 1.1, which is running already; nothing to do"),
        "{}",
        text(&out)
    );
    assert_eq!(s.snapshot(), before);
}

#[test]
fn reboot_when_idle_waits_for_both_guests_off() {
    let s = Scene::new();
    let marker = s.path("rebooted");
    std::fs::write(
        s.path("update.toml"),
        format!("reboot_command = [\"touch\", \"{}\"]\n", marker.display()),
    )
    .unwrap();
    let listener = UnixListener::bind(s.path("control.sock")).unwrap();
    let bundle = s.bundle("1.1.airlock", &BundleSpec::new("1.1"), &["alice"]);
    let mut child = s
        .agent()
        .arg("--config")
        .arg(s.path("update.toml"))
        .args(["apply", "--reboot-when-idle", "--file"])
        .arg(&bundle)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    writeln!(
        conn,
        r#"{{"event":"status","phase":"running","ready":true,"both_off":false}}"#
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!marker.exists(), "rebooted while guests run");
    assert!(child.try_wait().unwrap().is_none());
    writeln!(
        conn,
        r#"{{"event":"status","phase":"powering-off","ready":false,"both_off":true}}"#
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(marker.exists(), "no reboot after both guests were off");
}

#[test]
fn check_verifies_without_writing() {
    let s = Scene::new();
    let before = s.snapshot();
    let good = s.bundle("1.1.airlock", &BundleSpec::new("1.1"), &["alice"]);
    let out = ok(s.agent().arg("check").arg(&good));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid bundle airlock 1.1"));
    let bad = s.bundle("bad.airlock", &BundleSpec::new("1.1"), &["mallory"]);
    assert_eq!(
        run(s.agent().arg("check").arg(&bad)).status.code(),
        Some(16)
    );
    assert_eq!(s.snapshot(), before);
}

/// The block-device path: the disk attached as a loop device, so sfdisk
/// edits a real block device and the agent writes through partition nodes
/// (opened `O_EXCL`, cache dropped before the read-back). Where the kernel
/// does not scan loop partitions (containers), each slot partition is a
/// loop device of its own over the same byte range, linked where sfdisk
/// says the node is. Needs root: `cargo test -p airlock-update -- --ignored`.
#[test]
#[ignore = "needs root and loop devices"]
fn update_through_a_loop_device() {
    struct Cleanup(Vec<String>, Vec<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for l in &self.1 {
                let _ = std::fs::remove_file(l);
            }
            for d in self.0.iter().rev() {
                let _ = std::process::Command::new("losetup")
                    .args(["--detach", d])
                    .status();
            }
        }
    }
    let attach = |args: &[String]| {
        String::from_utf8_lossy(
            &ok(std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .args(args))
            .stdout,
        )
        .trim()
        .to_string()
    };
    let s = Scene::new();
    let disk = s.path("disk.img").display().to_string();
    let dev = attach(&["--partscan".into(), disk.clone()]);
    let mut cleanup = Cleanup(vec![dev.clone()], Vec::new());
    std::thread::sleep(std::time::Duration::from_millis(500));
    for n in [2u32, 3, 4, 5] {
        let node = std::path::PathBuf::from(format!("{dev}p{n}"));
        if !node.exists() {
            let (off, size) = s.partition("disk.img", n);
            let part = attach(&[
                "--offset".into(),
                off.to_string(),
                "--sizelimit".into(),
                size.to_string(),
                disk.clone(),
            ]);
            cleanup.0.push(part.clone());
            std::os::unix::fs::symlink(&part, &node).unwrap();
            cleanup.1.push(node);
        }
    }
    let spec = BundleSpec::new("1.1");
    let bundle = s.bundle("1.1.airlock", &spec, &["alice"]);
    let (m, _) = s.manifest(&spec);
    // A slot partition in use (held exclusively, as a mount would) is not written.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
            .open(format!("{dev}p4"))
            .unwrap();
        let esp = s.snapshot().esp;
        let out = run(s
            .agent_on(std::path::Path::new(&dev))
            .args(["apply", "--file"])
            .arg(&bundle));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("busy"),
            "{}",
            text(&out)
        );
        assert_eq!(s.snapshot().esp, esp);
    }
    let out = run(s
        .agent_on(std::path::Path::new(&dev))
        .args(["apply", "--file"])
        .arg(&bundle));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let root = m.artifact(airlock_bundle::ArtifactKind::Root).unwrap();
    let bytes = std::fs::read(format!("{dev}p4")).unwrap();
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            &bytes[..root.size as usize]
        )),
        root.sha256
    );
    assert_eq!(s.label_and_uuid(4).0, "root_airlock_1.1");
    assert!(s.path("esp/EFI/Linux/airlock_1.1+3.efi").exists());
    drop(cleanup);
}
