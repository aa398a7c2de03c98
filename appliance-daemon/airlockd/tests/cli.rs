//! The binary's configuration handling, as a user meets it (no root, no QEMU).

use std::process::Command;

fn airlockd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_airlockd"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SHIPPED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../overlay/etc/airlock/appliance.toml"
);

#[test]
fn shipped_config_checks_and_prints_both_command_lines() {
    let (code, out, err) = airlockd(&[
        "check",
        "--config",
        SHIPPED,
        "--provision",
        "/nonexistent/appliance.toml",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"test_mode\": false"), "{out}");
    for side in ["classified", "general"] {
        let (code, out, err) = airlockd(&[
            "cmdline",
            "--side",
            side,
            "--config",
            SHIPPED,
            "--provision",
            "/nonexistent",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.starts_with("/usr/bin/qemu-system-x86_64 -name airlock-"),
            "{out}"
        );
        assert!(out.contains("-sandbox on,obsolete=deny"), "{out}");
    }
}

#[test]
fn run_refuses_a_bad_config_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("appliance.toml");
    let text = std::fs::read_to_string(SHIPPED).unwrap().replacen(
        "devices = [\"tablet\"]",
        "devices = [\"tablet\", \"usb\"]",
        1,
    );
    let line = text
        .lines()
        .position(|l| l.starts_with("devices") && l.contains("\"usb\""))
        .unwrap()
        + 1;
    std::fs::write(&bad, text).unwrap();
    // `run` refuses before touching anything: no root needed to see it.
    let (code, _, err) = airlockd(&[
        "run",
        "--config",
        bad.to_str().unwrap(),
        "--provision",
        "/nonexistent",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("appliance.toml, line {line}: `guest.classified.devices`: \"usb\": the classified guest may not have a USB controller")),
        "{err}"
    );
    // A provisioning file that tries to add a device is refused the same way.
    let prov = dir.path().join("prov.toml");
    std::fs::write(
        &prov,
        "[guest.general]\nmemory_mib = 2048\ndevices = [\"usb\"]\n",
    )
    .unwrap();
    let (code, _, err) = airlockd(&[
        "check",
        "--config",
        SHIPPED,
        "--provision",
        prov.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("prov.toml, line 3: `guest.general.devices`: may only be set in the shipped configuration"), "{err}");
}
