//! The tiny test guest that stands in for a Windows guest in host tests:
//! a Debian kernel and an initramfs whose `/init` is this crate's static
//! binary (`src/main.rs`). This library is the host side: the wire protocol
//! ([`protocol`]), the initramfs writer ([`initramfs`]), finding a kernel
//! ([`kernel`]) and a client for the guest's test port ([`client`]).
//!
//! The initramfs is written in Rust (newc cpio, uncompressed), not with
//! Debian's `cpio`: the format is ~40 lines, the kernel takes it
//! uncompressed, the result is byte-for-byte reproducible (fixed owners,
//! modes and times), and the test needs no host package beyond QEMU
//! (`cpio` is not installed on the build machines).

pub mod client;
pub mod image;
pub mod initramfs;
pub mod kernel;

/// The guest's side of the test port, one text line per command and reply.
pub mod protocol {
    /// Name of the virtio-serial port the guest listens on (the supervisor
    /// adds it in test mode).
    pub const PORT_NAME: &str = "org.airlock.test.0";
    /// Printed on the console once `/init` runs.
    pub const ALIVE_BANNER: &str = "airlock-test-guest: alive";

    /// `ping` → `pong uptime_ms=<n>`.
    pub const PING: &str = "ping";
    /// `poweroff` → `ok powering off`, then ACPI power-off.
    pub const POWEROFF: &str = "poweroff";
    /// `reboot` → `ok rebooting`, then a reset (QEMU with `-no-reboot` exits).
    pub const REBOOT: &str = "reboot";
    /// `ignore-power-button` → `ok ignoring the power button`: from now on
    /// an ACPI power-button press does nothing (a hung guest, for tests of
    /// the host's bounded shutdown).
    pub const IGNORE_POWER_BUTTON: &str = "ignore-power-button";
    /// `bench <iterations>` → `bench iterations=<n> elapsed_us=<n>`: a fixed
    /// integer workload on one vCPU.
    pub const BENCH: &str = "bench";
    /// `pci` → `pci <class>:<vendor>:<device> ...` (hex, from sysfs): what
    /// hardware the guest sees.
    pub const PCI: &str = "pci";
    /// `hog <threads> <mib> <seconds>` → `ok hog ...` at once; then keeps
    /// `threads` vCPUs busy and `mib` MiB of memory touched for `seconds`.
    pub const HOG: &str = "hog";

    /// The benchmark workload: `iterations` rounds of an xorshift/multiply
    /// mix. Returns a value so the work cannot be optimised away.
    pub fn bench_work(iterations: u64) -> u64 {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut acc: u64 = 0;
        for i in 0..iterations {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            acc = acc.wrapping_add(x.wrapping_mul(i | 1));
        }
        acc
    }
}
