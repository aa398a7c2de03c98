//! Integration test (QEMU, TCG, no root): the test guest boots from a Debian
//! kernel and our initramfs, answers on its port, runs the benchmark, and
//! powers the VM off on command (QEMU exits 0 by itself).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_test_guest::client::Client;
use airlock_test_guest::image;

#[test]
fn boots_answers_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::prepare(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "test guest: kernel {} (from {}), initramfs {} bytes, modules {:?}",
        img.kernel.vmlinuz.display(),
        img.kernel.source,
        std::fs::metadata(&img.initrd).unwrap().len(),
        img.modules
    );
    let sock = dir.path().join("test.sock");
    let serial = dir.path().join("serial.log");
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "192", "-smp", "1"])
        .args(["-no-reboot", "-display", "none", "-kernel"])
        .arg(&img.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&img.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", serial.display()))
        .args(["-serial", "chardev:con", "-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!("socket,id=test,path={},server=on,wait=off", sock.display()))
        .args(["-device", "virtserialport,bus=vser0.0,chardev=test,name=org.airlock.test.0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 runs (install qemu-system-x86)");
    let result = (|| -> Result<(), String> {
        let mut client = Client::connect(&sock, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let pong = client.wait_alive(Duration::from_secs(90)).map_err(|e| e.to_string())?;
        eprintln!("alive after {:.1} s: {pong}", start.elapsed().as_secs_f64());
        let bench = client.command("bench 2000000", Duration::from_secs(60)).map_err(|e| e.to_string())?;
        eprintln!("{bench}");
        if !bench.starts_with("bench iterations=2000000 elapsed_us=") {
            return Err(format!("unexpected bench reply {bench:?}"));
        }
        let reply = client.command("poweroff", Duration::from_secs(10)).map_err(|e| e.to_string())?;
        if reply != "ok powering off" {
            return Err(format!("unexpected poweroff reply {reply:?}"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = qemu.try_wait().unwrap() {
                return if status.success() { Ok(()) } else { Err(format!("QEMU ended with {status} after poweroff")) };
            }
            if Instant::now() > deadline {
                return Err("QEMU still runs 30 s after the guest's poweroff".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let _ = qemu.kill();
    let _ = qemu.wait();
    if let Err(e) = result {
        panic!("{e}\nserial console:\n{}", std::fs::read_to_string(&serial).unwrap_or_default());
    }
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(console.contains("airlock-test-guest: alive"), "{console}");
}
