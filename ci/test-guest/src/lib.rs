//! The tiny test guest that stands in for a Windows guest in host tests:
//! a Debian kernel and an initramfs whose `/init` is this crate's static
//! binary (`src/main.rs`). This library is the host side: the wire protocol
//! ([`protocol`]), the initramfs writer ([`initramfs`]), finding a kernel
//! ([`kernel`]) and a client for the guest's test port ([`client`]); and the
//! guest's pure parts, unit-tested here: its SPICE vdagent clipboard agent
//! ([`agent`], on `com.redhat.spice.0`, with the workspace codec
//! `airlock-vdagent`), the display patterns it draws ([`pattern`]), the
//! log of keys it received ([`keys`]) and the pure parts of its network
//! probes ([`net`]).
//!
//! Besides the test port, the guest is a clipboard peer like the Windows
//! guests' agent (a host test or the gateway plays the host side on the
//! `com.redhat.spice.0` socket, the test port makes the guest copy and
//! paste and reports what it saw), and it draws known patterns on a
//! `-device VGA` display (kernel `bochs` DRM driver, fbdev `/dev/fb0`) for
//! screendump checks. It records the keys its keyboards deliver (QEMU's
//! PS/2 keyboard on the i8042, or a `virtio-keyboard-pci`; VNC or QMP
//! `send-key` on the host) for the kiosk's input tests. With a
//! `virtio-net-pci` NIC it takes a static
//! address and probes the network (TCP, UDP, ICMP; refused vs. dropped) for
//! the appliance's isolation tests.
//!
//! The initramfs is written in Rust (newc cpio, uncompressed), not with
//! Debian's `cpio`: the format is ~40 lines, the kernel takes it
//! uncompressed, the result is byte-for-byte reproducible (fixed owners,
//! modes and times), and the test needs no host package beyond QEMU
//! (`cpio` is not installed on the build machines).

pub mod agent;
pub mod client;
pub mod image;
pub mod initramfs;
pub mod kernel;
pub mod keys;
pub mod net;
pub mod pattern;

/// The guest's side of the test port, one text line per command and reply.
pub mod protocol {
    use airlock_vdagent::{msg_type, ClipboardType};

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

    /// Name of the virtio-serial port the guest's vdagent speaks on (as the
    /// Windows guests' spice-vdagent); see [`crate::agent`].
    pub const VDAGENT_PORT_NAME: &str = "com.redhat.spice.0";

    /// `clip-set <type> <base64>` → `ok grabbed <type> <n> bytes`: the guest
    /// takes its clipboard with that content (as on a copy in the guest) and
    /// sends `CLIPBOARD_GRAB` with that one type to the host. When no grab
    /// can be sent (the host is not connected or has not announced
    /// `CLIPBOARD_BY_DEMAND`) → `error not sent: <why>`, the content is kept.
    /// Types: see [`clip_type_name`].
    pub const CLIP_SET: &str = "clip-set";
    /// `clip-request <type>` → `ok requested <type>`: the guest sends
    /// `CLIPBOARD_REQUEST` for that type (as on a paste in the guest); the
    /// host's answer shows in `clip-received`. `error not sent: <why>` as
    /// for `clip-set`.
    pub const CLIP_REQUEST: &str = "clip-request";
    /// `clip-received` → `clip <type> <base64>`: the last `CLIPBOARD` the host
    /// sent, requested or not; `clip none` if none came yet or the last one
    /// was of type `NONE` (the host had nothing).
    pub const CLIP_RECEIVED: &str = "clip-received";
    /// `clip-grabs` → `grabs <type> <type> ...`: the types offered by the
    /// host's current `CLIPBOARD_GRAB`; `grabs none` if the host has not
    /// grabbed, or released, or the guest grabbed since.
    pub const CLIP_GRABS: &str = "clip-grabs";
    /// `vdagent-log` → `vdagent connected=<yes|no> rx.<message>=<n> ...
    /// tx.<message>=<n> ... errors=<n>`: messages received from and sent to
    /// the host since boot, per type ([`message_name`]; types never seen are
    /// left out; in type-number order), and input the codec refused. Refused messages of a known
    /// type number (file transfer, too large, malformed) count under `rx.`
    /// too. Parse with [`crate::client::counters`].
    pub const VDAGENT_LOG: &str = "vdagent-log";
    /// `draw bars` | `draw solid <rrggbb>` → `ok drew <pattern> <w>x<h>`:
    /// fills the framebuffer `/dev/fb0` (QEMU `-device VGA`) with a
    /// [`crate::pattern::Pattern`] and puts the console in graphics mode so
    /// nothing draws over it; `error ...` without a framebuffer.
    pub const DRAW: &str = "draw";
    /// `keys` → `ok keys <code>:<value> <code>:<value> ...`, or `ok keys`
    /// when none: the `EV_KEY` events every input device with keys
    /// delivered since boot or the last [`KEYS_CLEAR`], oldest first; evdev
    /// key codes (`linux/input-event-codes.h`: `KEY_A` = 30, `KEY_B` = 48,
    /// `KEY_ENTER` = 28, `BTN_LEFT` = 272) and values `1` (press) and `0`
    /// (release). Autorepeats (value 2) are left out, so the line depends
    /// on what was pressed, not on timing. At most
    /// [`crate::keys::KEPT`] events, the newest. `/init` reads every
    /// `/dev/input/event*` whose device has keys, from boot on, and looks
    /// for new ones every 500 ms (the i8042 keyboard exists at boot, a
    /// virtio keyboard or tablet once `virtio_input` binds it). Includes
    /// the ACPI power button (`KEY_POWER` = 116) and tablet buttons. Parse
    /// with [`crate::keys::parse_reply`].
    pub const KEYS: &str = "keys";
    /// `keys-clear` → `ok keys-clear`: empties the log of [`KEYS`].
    pub const KEYS_CLEAR: &str = "keys-clear";

    /// `net-up <address>/<prefix> <gateway>` →
    /// `ok net <ifname> <mac> <address>/<prefix>`: brings up `lo` and the
    /// first ethernet interface (waiting up to 5 s for the `virtio_net`
    /// driver to make one) with that IPv4 address, and makes the gateway the
    /// default route (replacing any earlier one). Static, like the
    /// appliance's guests (no DHCP). `error ...` when there is no ethernet
    /// interface or an ioctl fails.
    pub const NET_UP: &str = "net-up";
    /// `net-info` → `net iface=<name>,<mac>,<up|down>,<address/prefix|none>
    /// ... route=<dest/prefix>,<gateway|direct>,<dev> ...`: every interface
    /// (sorted by name) and the IPv4 routing table (`/proc/net/route`,
    /// `0.0.0.0/0` is the default route).
    pub const NET_INFO: &str = "net-info";
    /// `net-mac <mac>` → `ok mac <ifname> <mac>`: gives the ethernet
    /// interface of [`NET_UP`] another MAC address (`SIOCSIFHWADDR`; the
    /// virtio NIC takes it live), so that the guest sends from a MAC that is
    /// not its configured one — for the appliance's anti-spoofing tests.
    /// `net-mac` with the configured MAC puts it back.
    pub const NET_MAC: &str = "net-mac";
    /// `tcp-connect <ip> <port> <timeout_ms>` → `connected <local ip:port>`
    /// | `refused` (an RST or ICMP port-unreachable came back: a
    /// *rejecting* filter or a closed port) | `timeout` (nothing came back:
    /// a *dropping* filter) | `error <text>` (e.g. `error unreachable: ...`
    /// for ICMP host/net unreachable or no ARP answer from the gateway).
    /// The connection is closed at once.
    pub const TCP_CONNECT: &str = "tcp-connect";
    /// `tcp-listen <port>` → `ok listening <port>`: accepts TCP connections
    /// on `0.0.0.0:<port>` in the background, and answers each with one line,
    /// [`crate::net::banner`] (`airlock-test-guest <local ip> port <port> peer
    /// <peer ip:port>`: which guest answered, and whom it saw — after NAT, the
    /// translated address), then closes it. Listening again on the same port
    /// is `ok listening` too.
    pub const TCP_LISTEN: &str = "tcp-listen";
    /// `tcp-fetch <ip> <port> <timeout_ms>` → `line <text>`: connects and
    /// returns the first line the server sent (two-way data, not just a
    /// SYN-ACK); `refused` | `timeout` | `error <text>` as for
    /// [`TCP_CONNECT`]; `error connected, no line: <why>` when the
    /// connection stood but no line came within the time left.
    pub const TCP_FETCH: &str = "tcp-fetch";
    /// `udp-send <ip> <port> <text>` → `ok sent <n> bytes from <local
    /// ip:port>`: one datagram whose payload is the rest of the line
    /// (spaces kept), from a fresh socket.
    pub const UDP_SEND: &str = "udp-send";
    /// `udp-listen <port>` → `ok listening udp <port>`: receives datagrams
    /// on `0.0.0.0:<port>` in the background, keeps the last
    /// [`UDP_KEPT`] for [`UDP_RECEIVED`], and answers each with one datagram,
    /// [`crate::net::banner`] (so [`UDP_FETCH`] sees a DNS-like round trip).
    pub const UDP_LISTEN: &str = "udp-listen";
    /// `udp-received` → `udp <total> <port>:<source ip:port>/<payload> ...`:
    /// how many datagrams the listeners received since boot, then the last
    /// [`UDP_KEPT`], oldest first, each with the listening port, its source
    /// and its payload escaped by [`crate::net::escape`] (no spaces; parse
    /// with [`crate::net::parse_udp_received`]). `udp 0` when none came.
    pub const UDP_RECEIVED: &str = "udp-received";
    /// Datagrams [`UDP_RECEIVED`] reports.
    pub const UDP_KEPT: usize = 8;
    /// `udp-fetch <ip> <port> <timeout_ms> <text>` → `reply <source
    /// ip:port> <payload>`: sends one datagram and waits for the first
    /// answer; `refused` (ICMP port unreachable came back) | `timeout` |
    /// `error <text>`.
    pub const UDP_FETCH: &str = "udp-fetch";
    /// `icmp-ping <ip> <timeout_ms>` → `reply <ms> from <ip>` | `timeout` |
    /// `error <text>`: one ICMP echo request on an ICMP datagram socket
    /// (`/init` opens `net.ipv4.ping_group_range` to root). Not named `ping`:
    /// that is the test port's own liveness check.
    pub const ICMP_PING: &str = "icmp-ping";

    /// Clipboard type names on the test port: `utf8`, `png`, `bmp`, `tiff`,
    /// `jpg`, `file-list`, `none`, or `type-<n>` for any other number.
    pub fn clip_type_name(ty: ClipboardType) -> String {
        match ty {
            ClipboardType::None => "none".into(),
            ClipboardType::Utf8Text => "utf8".into(),
            ClipboardType::Png => "png".into(),
            ClipboardType::Bmp => "bmp".into(),
            ClipboardType::Tiff => "tiff".into(),
            ClipboardType::Jpg => "jpg".into(),
            ClipboardType::FileList => "file-list".into(),
            ClipboardType::Other(n) => format!("type-{n}"),
        }
    }

    /// The inverse of [`clip_type_name`].
    pub fn parse_clip_type(name: &str) -> Option<ClipboardType> {
        let n = match name {
            "none" => 0,
            "utf8" => 1,
            "png" => 2,
            "bmp" => 3,
            "tiff" => 4,
            "jpg" => 5,
            "file-list" => 6,
            other => other.strip_prefix("type-")?.parse().ok()?,
        };
        Some(ClipboardType::from_u32(n))
    }

    /// vdagent message names in `vdagent-log`: `VD_AGENT_*` in lower case
    /// with dashes (`clipboard-grab`), `type-<n>` for unknown numbers.
    pub fn message_name(t: u32) -> String {
        let name = match t {
            msg_type::MOUSE_STATE => "mouse-state",
            msg_type::MONITORS_CONFIG => "monitors-config",
            msg_type::REPLY => "reply",
            msg_type::CLIPBOARD => "clipboard",
            msg_type::DISPLAY_CONFIG => "display-config",
            msg_type::ANNOUNCE_CAPABILITIES => "announce-capabilities",
            msg_type::CLIPBOARD_GRAB => "clipboard-grab",
            msg_type::CLIPBOARD_REQUEST => "clipboard-request",
            msg_type::CLIPBOARD_RELEASE => "clipboard-release",
            msg_type::FILE_XFER_START => "file-xfer-start",
            msg_type::FILE_XFER_STATUS => "file-xfer-status",
            msg_type::FILE_XFER_DATA => "file-xfer-data",
            msg_type::CLIENT_DISCONNECTED => "client-disconnected",
            msg_type::MAX_CLIPBOARD => "max-clipboard",
            n => return format!("type-{n}"),
        };
        name.into()
    }

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

#[cfg(test)]
mod tests {
    use super::protocol::*;
    use airlock_vdagent::ClipboardType;

    #[test]
    fn clip_type_names_round_trip() {
        for n in 0..9 {
            let ty = ClipboardType::from_u32(n);
            assert_eq!(parse_clip_type(&clip_type_name(ty)), Some(ty), "{n}");
        }
        assert_eq!(parse_clip_type("utf8"), Some(ClipboardType::Utf8Text));
        assert_eq!(parse_clip_type("text"), None);
        assert_eq!(message_name(7), "clipboard-grab");
        assert_eq!(message_name(99), "type-99");
    }
}
