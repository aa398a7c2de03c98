//! The appliance configuration: two guests (`[guest.classified]`,
//! `[guest.general]`), the supervisor's own settings (`[supervisor]`) and
//! the clipboard gateway the supervisor runs (`[clipboard]`).
//!
//! Read in three stages: each file is parsed strictly into a raw layer
//! (`deny_unknown_fields`, every value keeps its span), the shipped file
//! (`/etc/airlock/appliance.toml`, read-only root) and the provisioning file
//! (`/var/lib/airlock/provision/appliance.toml`, writable `/var`) are merged
//! with the later one winning, and the result is validated into [`Config`].
//! Every error names the file, the line and the key.
//!
//! The provisioning file sits on the writable data partition, so it may only
//! set machine-specific values (disk, memory, vCPUs, limits, MAC address); it
//! can never add a device, change the accelerator, the firmware, the user a
//! guest runs as, anything of the supervisor or of the clipboard. Device allow-lists are
//! refused, not filtered: the classified guest may never have a USB
//! controller, CD/DVD drive, sound device (P11); no guest gets a floppy,
//! parallel or serial port, or a shared folder.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The shipped configuration, on the read-only root.
pub const SHIPPED_CONFIG: &str = "/etc/airlock/appliance.toml";
/// Machine-specific values written at provisioning, on `/var`.
/// Powers the host off through the service manager's own socket: the
/// supervisor's SELinux domain may start the power units, not talk to
/// logind over D-Bus (which `systemctl poweroff` tries first, and fails on).
pub const DEFAULT_POWEROFF_COMMAND: &[&str] = &[
    "/usr/bin/systemctl",
    "--no-block",
    "--job-mode=replace-irreversibly",
    "start",
    "poweroff.target",
];
pub const PROVISION_CONFIG: &str = "/var/lib/airlock/provision/appliance.toml";

/// Longest path a unix socket address can hold (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Memory QEMU itself needs above the guest's RAM; `memory_max_mib` must
/// leave at least this much room or the guest is killed while booting.
pub const QEMU_OVERHEAD_MIB: u64 = 64;
/// Default headroom of the memory ceiling above the guest's RAM.
const DEFAULT_MEMORY_HEADROOM_MIB: u64 = 512;

/// Which of the two domains a guest belongs to (shared with the network
/// crate, which names bridges, taps and users after it).
pub use airlock_network::Side;

/// A device a guest may be given (its allow-list names these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    /// Absolute pointer (`virtio-tablet-pci`); no USB involved.
    Tablet,
    /// A USB controller (`qemu-xhci`) with a USB tablet on it.
    Usb,
    /// An empty, read-only CD/DVD drive.
    Cdrom,
    /// Sound output (HD audio, playback only).
    Sound,
    /// Sound output and input (HD audio duplex).
    SoundCapture,
    Floppy,
    Parallel,
    /// A serial port (e.g. for a serial printer).
    Serial,
    /// A host folder shared into the guest.
    SharedFolder,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Tablet => "tablet",
            Device::Usb => "usb",
            Device::Cdrom => "cdrom",
            Device::Sound => "sound",
            Device::SoundCapture => "sound-capture",
            Device::Floppy => "floppy",
            Device::Parallel => "parallel",
            Device::Serial => "serial",
            Device::SharedFolder => "shared-folder",
        }
    }

    /// Why `side` may not have this device, or `None` if it may.
    pub fn refusal(self, side: Side) -> Option<&'static str> {
        match (self, side) {
            (Device::Floppy | Device::Parallel | Device::Serial, _) => {
                Some("airlock gives no guest a floppy drive, parallel or serial port (removable media and printing stay outside)")
            }
            (Device::SharedFolder, _) => Some("airlock never shares a host folder with a guest (no file ever crosses)"),
            (Device::Usb, Side::Classified) => Some("the classified guest may not have a USB controller (P11: no removable media)"),
            (Device::Cdrom, Side::Classified) => Some("the classified guest may not have a CD/DVD drive (P11: no removable media)"),
            (Device::Sound | Device::SoundCapture, Side::Classified) => {
                Some("the classified guest may not have a sound device (P11: no sound capture)")
            }
            (Device::Tablet | Device::Usb | Device::Cdrom | Device::Sound | Device::SoundCapture, _) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    /// Emulation; only with `supervisor.test_mode` (the kiosk says so plainly
    /// on a real PC without KVM instead of crawling).
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// What the guest's real-time clock counts (Windows expects local time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rtc {
    Localtime,
    Utc,
}

// ---------------------------------------------------------------- raw layer

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    supervisor: Option<RawSupervisor>,
    guest: Option<RawGuests>,
    clipboard: Option<RawClipboard>,
    machine: Option<RawMachine>,
    /// Validated by `airlock_network` (after merging the layers).
    network: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    hostname: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    run_dir: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    log_dir: Option<Spanned<String>>,
    qemu: Option<Spanned<String>>,
    swtpm: Option<Spanned<String>>,
    gateway: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    strict_limits: Option<Spanned<bool>>,
    poweroff_command: Option<Spanned<Vec<String>>>,
    shutdown_timeout_secs: Option<Spanned<u64>>,
    control_group: Option<Spanned<String>>,
    display_group: Option<Spanned<String>>,
    test_mode: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClipboard {
    enabled: Option<Spanned<bool>>,
    user: Option<Spanned<String>>,
    max_bytes: Option<Spanned<u64>>,
    max_image_dimension: Option<Spanned<u64>>,
    max_image_pixels: Option<Spanned<u64>>,
    request_timeout_ms: Option<Spanned<u64>>,
    sanitiser_timeout_ms: Option<Spanned<u64>>,
    confirm: Option<Spanned<bool>>,
    confirm_timeout_ms: Option<Spanned<u64>>,
    confirm_group: Option<Spanned<String>>,
    limits: Option<RawClipboardLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClipboardLimits {
    cpu_percent: Option<Spanned<u32>>,
    memory_max_mib: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuests {
    classified: Option<RawGuest>,
    general: Option<RawGuest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    disk: Option<Spanned<String>>,
    disk_format: Option<Spanned<DiskFormat>>,
    memory_mib: Option<Spanned<u64>>,
    vcpus: Option<Spanned<u32>>,
    accel: Option<Spanned<Accel>>,
    user: Option<Spanned<String>>,
    rtc: Option<Spanned<Rtc>>,
    devices: Option<Spanned<Vec<Spanned<Device>>>>,
    limits: Option<RawLimits>,
    firmware: Option<RawFirmware>,
    network: Option<RawNetwork>,
    test_boot: Option<RawTestBoot>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    cpu_percent: Option<Spanned<u32>>,
    memory_max_mib: Option<Spanned<u64>>,
    io_read_bps: Option<Spanned<u64>>,
    io_write_bps: Option<Spanned<u64>>,
    io_read_iops: Option<Spanned<u64>>,
    io_write_iops: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFirmware {
    code: Option<Spanned<String>>,
    vars_template: Option<Spanned<String>>,
    vars: Option<Spanned<String>>,
    tpm: Option<Spanned<bool>>,
    secure_boot: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    enabled: Option<Spanned<bool>>,
    tap: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestBoot {
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    append: Option<Spanned<String>>,
}

// ---------------------------------------------------------------- validated

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub supervisor: Supervisor,
    pub classified: Guest,
    pub general: Guest,
    /// The clipboard gateway (`[clipboard]`).
    pub clipboard: Clipboard,
    /// The PC itself (`[machine]`).
    pub machine: Machine,
    /// The `[network]` section (`airlock_network`), if configured.
    #[serde(skip)]
    pub network: Option<airlock_network::NetworkConfig>,
}

impl Config {
    pub fn guest(&self, side: Side) -> &Guest {
        match side {
            Side::Classified => &self.classified,
            Side::General => &self.general,
        }
    }
}

/// Settings of the PC itself, usually provisioned per PC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// Set at boot by `airlock-hostname.service`; `None` keeps the image's
    /// `/etc/hostname`.
    pub hostname: Option<String>,
}

/// Where the supervisor puts the guests' cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum CgroupRoot {
    /// The supervisor's own (delegated) cgroup, from `/proc/self/cgroup`.
    Auto,
    /// An explicit cgroup v2 directory (tests).
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Supervisor {
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub qemu: PathBuf,
    pub swtpm: PathBuf,
    /// The clipboard gateway; its sanitiser is `airlock-sanitiser` beside it.
    pub gateway: PathBuf,
    pub cgroup: CgroupRoot,
    /// Refuse to start a guest whose configured limits cannot all be applied.
    pub strict_limits: bool,
    /// Run when both guests have powered themselves off.
    pub poweroff_command: Vec<String>,
    /// How long a host shutdown waits for the guests after ACPI power-down.
    pub shutdown_timeout: Duration,
    /// Group that may connect to the control socket (kiosk, update agent).
    pub control_group: String,
    /// The kiosk's group: after each start of a guest's QEMU its display
    /// socket (alone) is handed to this group, `0660`.
    pub display_group: String,
    /// Test images and host tests: TCG allowed, kernel boot allowed, a logged
    /// serial console and the test agent port.
    pub test_mode: bool,
}

impl Supervisor {
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }
}

/// The clipboard gateway (`airlock-gateway`, one way general → classified,
/// P12/P13): whether the supervisor runs it, as whom, and the limits it is
/// given on its command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clipboard {
    pub enabled: bool,
    /// The unprivileged user the gateway (and its sanitiser) runs as.
    pub user: String,
    /// Largest clipboard item taken from the general guest, and largest
    /// sanitised text, bytes (`--max-bytes`).
    pub max_bytes: u32,
    /// Largest image width and height, pixels.
    pub max_image_dimension: u32,
    /// Largest image area, pixels.
    pub max_image_pixels: u64,
    /// How long the general guest has to send the data it offered.
    pub request_timeout_ms: u64,
    /// Wall-clock limit of one sanitiser run.
    pub sanitiser_timeout_ms: u64,
    /// Confirm mode: each transfer waits for the user's key in the kiosk.
    pub confirm: bool,
    /// Confirm mode: how long the user has.
    pub confirm_timeout_ms: u64,
    /// Confirm mode: the group shared by the gateway and the kiosk (and
    /// nobody else): the confirm socket's directory (`0710`) and the socket
    /// (`0660`) are given to it. A missing group is logged, and both stay
    /// the gateway's user's alone (no kiosk can confirm).
    pub confirm_group: String,
    /// The gateway's cgroup (`gateway`): gateway and sanitiser together.
    pub cpu_percent: u32,
    pub memory_max_mib: u64,
}

impl Clipboard {
    /// The gateway's defaults (`airlock-gateway --help`), enabled.
    pub fn defaults() -> Clipboard {
        Clipboard {
            enabled: true,
            user: "airlock-gateway".into(),
            max_bytes: 32 << 20,
            max_image_dimension: 16384,
            max_image_pixels: 40_000_000,
            request_timeout_ms: 2000,
            sanitiser_timeout_ms: 15000,
            confirm: false,
            confirm_timeout_ms: 30000,
            confirm_group: "airlock-confirm".into(),
            cpu_percent: 100,
            memory_max_mib: 2048,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Guest {
    pub side: Side,
    pub disk: PathBuf,
    pub disk_format: DiskFormat,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub accel: Accel,
    /// The unprivileged user QEMU runs as.
    pub user: String,
    pub rtc: Rtc,
    /// The allow-list, in configuration order, without duplicates.
    pub devices: Vec<Device>,
    pub limits: Limits,
    pub boot: Boot,
    /// A vTPM (swtpm, state in the disk directory) for Windows 11.
    pub tpm: bool,
    pub network: Option<Network>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// `cpu.max` quota as a percentage of one CPU (200 = two CPUs' worth).
    pub cpu_percent: u32,
    /// `memory.max`, MiB.
    pub memory_max_mib: u64,
    pub io: IoLimits,
}

/// Disk bandwidth (bytes/s) and operations per second; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IoLimits {
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

impl IoLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == IoLimits::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Boot {
    /// UEFI (OVMF) from the guest's disk: production.
    Firmware(Firmware),
    /// Direct kernel boot: test guests only.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        append: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Firmware {
    pub code: PathBuf,
    /// Copied to `vars` the first time the guest starts.
    pub vars_template: PathBuf,
    /// The guest's own UEFI variable store, next to its disk.
    pub vars: PathBuf,
    /// Secure-boot firmware (`OVMF_CODE_4M.secboot.fd` with the `.ms`
    /// variable template): QEMU must then restrict the flash to SMM.
    pub secure_boot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    pub tap: String,
    pub bridge: String,
    pub mac: Option<String>,
}

// ---------------------------------------------------------------- errors

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, an unknown key or a value of the wrong type; toml's message
    /// already names the line, column and key.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}, line {line}: `{key}`: {message}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{file}: `{key}` is missing: {message}")]
    Missing {
        file: String,
        key: String,
        message: String,
    },
}

// ---------------------------------------------------------------- loading

/// One parsed file.
struct Layer {
    file: String,
    text: String,
    raw: RawFile,
    /// The provisioning layer (restricted keys).
    provisioning: bool,
}

impl Layer {
    fn parse(file: &str, text: &str, provisioning: bool) -> Result<Layer, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Ok(Layer {
            file: file.to_owned(),
            text: text.to_owned(),
            raw,
            provisioning,
        })
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    /// The span of the line that opens table `header` (e.g. `supervisor`,
    /// `guest.general.firmware`), or of its first dotted key.
    fn table_span(&self, header: &str) -> Range<usize> {
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim_start();
            let table = t
                .strip_prefix('[')
                .map(|r| r.trim_start_matches('[').trim_start());
            let hit = match table {
                Some(rest) => {
                    rest.starts_with(header) && rest[header.len()..].starts_with([']', '.', ' '])
                }
                None => t.starts_with(header) && t[header.len()..].starts_with(['.', ' ', '=']),
            };
            if hit {
                return offset..offset;
            }
            offset += line.len();
        }
        0..0
    }

    /// The span of the line that sets dotted key `key` (found under its
    /// table's header), or of the table's header.
    fn key_span(&self, key: &str) -> Range<usize> {
        let Some((table, leaf)) = key.rsplit_once('.') else {
            return self.table_span(key);
        };
        let start = self.table_span(table).start;
        let mut offset = start;
        for (i, line) in self.text[start..].split_inclusive('\n').enumerate() {
            let t = line.trim_start();
            if i > 0 && t.starts_with('[') {
                break;
            }
            if t.starts_with(leaf) && t[leaf.len()..].trim_start().starts_with('=') {
                return offset..offset;
            }
            offset += line.len();
        }
        start..start
    }

    fn invalid(&self, span: &Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.line(span),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn guest(&self, side: Side) -> Option<&RawGuest> {
        let guests = self.raw.guest.as_ref()?;
        match side {
            Side::Classified => guests.classified.as_ref(),
            Side::General => guests.general.as_ref(),
        }
    }
}

/// A value and the layer it came from.
struct Found<'a, T> {
    value: &'a T,
    layer: &'a Layer,
    span: Range<usize>,
}

impl<T> Found<'_, T> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.layer.invalid(&self.span, key, message)
    }
}

/// The last layer that sets a value wins.
fn pick<'a, T: 'a>(
    layers: &'a [Layer],
    get: impl Fn(&'a Layer) -> Option<&'a Spanned<T>>,
) -> Option<Found<'a, T>> {
    layers.iter().rev().find_map(|layer| {
        get(layer).map(|s| Found {
            value: s.get_ref(),
            layer,
            span: s.span(),
        })
    })
}

/// Reads the shipped configuration and, if it exists, the provisioning file.
pub fn load(shipped: &Path, provisioning: Option<&Path>) -> Result<Config, ConfigError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })
    };
    let shipped_text = read(shipped)?;
    let mut texts = vec![(shipped.display().to_string(), shipped_text, false)];
    if let Some(path) = provisioning {
        match std::fs::read_to_string(path) {
            Ok(text) => texts.push((path.display().to_string(), text, true)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    file: path.display().to_string(),
                    source,
                })
            }
        }
    }
    let refs: Vec<(&str, &str, bool)> = texts
        .iter()
        .map(|(f, t, p)| (f.as_str(), t.as_str(), *p))
        .collect();
    parse_layers(&refs)
}

/// Parses and validates a single configuration text (no provisioning layer).
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    parse_layers(&[(file, text, false)])
}

/// Parses and validates layers `(file name, text, is_provisioning)`, later
/// layers overriding earlier ones.
pub fn parse_layers(texts: &[(&str, &str, bool)]) -> Result<Config, ConfigError> {
    let layers = texts
        .iter()
        .map(|(f, t, p)| Layer::parse(f, t, *p))
        .collect::<Result<Vec<_>, _>>()?;
    for layer in layers.iter().filter(|l| l.provisioning) {
        check_provisioning_keys(layer)?;
    }
    let supervisor = resolve_supervisor(&layers)?;
    let mut classified = resolve_guest(&layers, Side::Classified, &supervisor)?;
    let mut general = resolve_guest(&layers, Side::General, &supervisor)?;
    let network = resolve_network(&layers)?;
    let clipboard = resolve_clipboard(&layers, &supervisor, [&classified.user, &general.user])?;
    let machine = Machine {
        hostname: match pick(&layers, |l| l.raw.machine.as_ref()?.hostname.as_ref()) {
            None => None,
            Some(f) => Some(
                check_hostname(f.value)
                    .map_err(|why| f.invalid("machine.hostname", why))?
                    .to_owned(),
            ),
        },
    };
    if let Some(net) = &network {
        for guest in [&mut classified, &mut general] {
            match_network(&layers, guest, net)?;
        }
    }
    if !supervisor.test_mode && classified.user == general.user {
        let found = pick(&layers, |l| l.guest(Side::General)?.user.as_ref());
        let message = "both guests would run as the same user; each side needs its own";
        return Err(match found {
            Some(f) => f.invalid("guest.general.user", message),
            None => ConfigError::Missing {
                file: layers[0].file.clone(),
                key: "guest.general.user".into(),
                message: message.into(),
            },
        });
    }
    Ok(Config {
        supervisor,
        classified,
        general,
        clipboard,
        machine,
        network,
    })
}

/// The `[clipboard]` section: every value checked against the range the
/// gateway accepts, each error naming its key.
fn resolve_clipboard(
    layers: &[Layer],
    sup: &Supervisor,
    guest_users: [&String; 2],
) -> Result<Clipboard, ConfigError> {
    fn clip(l: &Layer) -> Option<&RawClipboard> {
        l.raw.clipboard.as_ref()
    }
    fn lim(l: &Layer) -> Option<&RawClipboardLimits> {
        clip(l)?.limits.as_ref()
    }
    let d = Clipboard::defaults();
    let number = |key: &str,
                  default: u64,
                  range: std::ops::RangeInclusive<u64>,
                  unit: &str,
                  get: fn(&RawClipboard) -> Option<&Spanned<u64>>| {
        match pick(layers, |l| get(clip(l)?)) {
            None => Ok(default),
            Some(f) if !range.contains(f.value) => Err(f.invalid(
                &format!("clipboard.{key}"),
                format!(
                    "{} is outside {}..={}{unit}",
                    f.value,
                    range.start(),
                    range.end()
                ),
            )),
            Some(f) => Ok(*f.value),
        }
    };
    let enabled = pick(layers, |l| clip(l)?.enabled.as_ref()).is_none_or(|f| *f.value);
    let user = match pick(layers, |l| clip(l)?.user.as_ref()) {
        None => d.user,
        Some(f) => {
            check_name(f.value).map_err(|why| f.invalid("clipboard.user", why))?;
            if f.value == "root" {
                return Err(f.invalid("clipboard.user", "the gateway never runs as root"));
            }
            f.value.clone()
        }
    };
    if enabled && !sup.test_mode && guest_users.contains(&&user) {
        let message = format!("{user:?} is a guest's user; the gateway needs its own (so no guest's QEMU can reach the other guest's vdagent socket)");
        return Err(match pick(layers, |l| clip(l)?.user.as_ref()) {
            Some(f) => f.invalid("clipboard.user", message),
            None => ConfigError::Missing {
                file: layers[0].file.clone(),
                key: "clipboard.user".into(),
                message,
            },
        });
    }
    let max_bytes = number(
        "max_bytes",
        d.max_bytes.into(),
        1..=i32::MAX as u64,
        " bytes",
        |c| c.max_bytes.as_ref(),
    )? as u32;
    let max_image_dimension = number(
        "max_image_dimension",
        d.max_image_dimension.into(),
        1..=65535,
        " pixels",
        |c| c.max_image_dimension.as_ref(),
    )? as u32;
    let max_image_pixels = number(
        "max_image_pixels",
        d.max_image_pixels,
        1..=100_000_000,
        " pixels",
        |c| c.max_image_pixels.as_ref(),
    )?;
    let request_timeout_ms = number(
        "request_timeout_ms",
        d.request_timeout_ms,
        100..=60_000,
        " ms",
        |c| c.request_timeout_ms.as_ref(),
    )?;
    let sanitiser_timeout_ms = number(
        "sanitiser_timeout_ms",
        d.sanitiser_timeout_ms,
        100..=120_000,
        " ms",
        |c| c.sanitiser_timeout_ms.as_ref(),
    )?;
    let confirm = pick(layers, |l| clip(l)?.confirm.as_ref()).is_some_and(|f| *f.value);
    let confirm_timeout_ms = number(
        "confirm_timeout_ms",
        d.confirm_timeout_ms,
        1000..=600_000,
        " ms",
        |c| c.confirm_timeout_ms.as_ref(),
    )?;
    if !confirm {
        if let Some(f) = pick(layers, |l| clip(l)?.confirm_timeout_ms.as_ref()) {
            return Err(f.invalid(
                "clipboard.confirm_timeout_ms",
                "only means something with clipboard.confirm = true",
            ));
        }
        if let Some(f) = pick(layers, |l| clip(l)?.confirm_group.as_ref()) {
            return Err(f.invalid(
                "clipboard.confirm_group",
                "only means something with clipboard.confirm = true",
            ));
        }
    }
    let confirm_group = match pick(layers, |l| clip(l)?.confirm_group.as_ref()) {
        None => d.confirm_group,
        Some(f) => {
            check_name(f.value).map_err(|why| f.invalid("clipboard.confirm_group", why))?;
            // Its members reach the confirm socket; a group that already
            // means something else would widen that (the kiosk's group owns
            // the guests' display sockets).
            let taken = [
                ("root", "root's"),
                (
                    sup.display_group.as_str(),
                    "the guests' display sockets' group (supervisor.display_group)",
                ),
                (
                    sup.control_group.as_str(),
                    "the control socket's group (supervisor.control_group)",
                ),
                (guest_users[0].as_str(), "a guest's user's group"),
                (guest_users[1].as_str(), "a guest's user's group"),
            ];
            if let Some((_, what)) = taken.iter().find(|(name, _)| name == f.value) {
                return Err(f.invalid(
                    "clipboard.confirm_group",
                    format!("{:?} is {what}; the confirm socket needs a group of its own (gateway and kiosk only)", f.value),
                ));
            }
            f.value.clone()
        }
    };
    let cpu_percent = match pick(layers, |l| lim(l)?.cpu_percent.as_ref()) {
        None => d.cpu_percent,
        Some(f) if !(1..=25_600).contains(f.value) => {
            return Err(f.invalid(
                "clipboard.limits.cpu_percent",
                format!("{} is outside 1..=25600 (percent of one CPU)", f.value),
            ))
        }
        Some(f) => *f.value,
    };
    let memory_max_mib = match pick(layers, |l| lim(l)?.memory_max_mib.as_ref()) {
        None => d.memory_max_mib,
        Some(f) if !(128..=1_048_576).contains(f.value) => {
            return Err(f.invalid(
                "clipboard.limits.memory_max_mib",
                format!("{} MiB is outside 128..=1048576", f.value),
            ))
        }
        Some(f) => *f.value,
    };
    Ok(Clipboard {
        enabled,
        user,
        max_bytes,
        max_image_dimension,
        max_image_pixels,
        request_timeout_ms,
        sanitiser_timeout_ms,
        confirm,
        confirm_timeout_ms,
        confirm_group,
        cpu_percent,
        memory_max_mib,
    })
}

/// The `[network]` section: parsed straight from its file when only one
/// layer has it (so syntax errors keep their line), else from the merged
/// tables (the provisioning file may only add uplinks).
fn resolve_network(
    layers: &[Layer],
) -> Result<Option<airlock_network::NetworkConfig>, ConfigError> {
    use airlock_network::ConfigError as NetError;
    let with: Vec<&Layer> = layers.iter().filter(|l| l.raw.network.is_some()).collect();
    let map_err = |layer: &Layer, e: NetError| match e {
        NetError::Syntax(message) => ConfigError::Parse {
            file: layer.file.clone(),
            message,
        },
        NetError::Invalid { key, message } => {
            let key = if key.starts_with("network.") {
                key
            } else {
                format!("network.{key}")
            };
            ConfigError::Invalid {
                file: layer.file.clone(),
                line: layer.line(&layer.key_span(&key)),
                key,
                message,
            }
        }
    };
    match with.as_slice() {
        [] => Ok(None),
        [layer] => airlock_network::NetworkConfig::from_appliance_toml(&layer.text)
            .map(Some)
            .map_err(|e| map_err(layer, e)),
        _ => {
            let mut merged = toml::Value::Table(Default::default());
            for layer in &with {
                merge(&mut merged, layer.raw.network.clone().expect("filtered"));
            }
            let last = with.last().expect("two or more");
            let mut doc = toml::map::Map::new();
            doc.insert("network".into(), merged);
            let text =
                toml::to_string(&toml::Value::Table(doc)).map_err(|e| ConfigError::Parse {
                    file: last.file.clone(),
                    message: e.to_string(),
                })?;
            airlock_network::NetworkConfig::from_appliance_toml(&text)
                .map(Some)
                .map_err(|e| {
                    let files = with
                        .iter()
                        .map(|l| l.file.as_str())
                        .collect::<Vec<_>>()
                        .join(" + ");
                    match e {
                        NetError::Syntax(message) => ConfigError::Parse {
                            file: files,
                            message,
                        },
                        NetError::Invalid { key, message } => {
                            let key = if key.starts_with("network.") {
                                key
                            } else {
                                format!("network.{key}")
                            };
                            // The layer that set the bad value (the last one wins),
                            // named with its line; a value missing from all of them
                            // names the files together.
                            match with.iter().rev().find(|l| {
                                l.raw
                                    .network
                                    .as_ref()
                                    .is_some_and(|n| sets_dotted(n, &key["network.".len()..]))
                            }) {
                                Some(layer) => layer.invalid(&layer.key_span(&key), &key, message),
                                None => ConfigError::Missing {
                                    file: files,
                                    key,
                                    message,
                                },
                            }
                        }
                    }
                })
        }
    }
}

/// Whether `table` sets the dotted key `key` (e.g. `classified.uplink.address`).
fn sets_dotted(table: &toml::Value, key: &str) -> bool {
    key.split('.')
        .try_fold(table, |t, part| t.get(part))
        .is_some()
}

/// Deep merge of TOML tables; `over` wins.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// With a `[network]` section, the guest's NIC is the tap the topology
/// creates and carries the MAC address the ruleset allows.
fn match_network(
    layers: &[Layer],
    guest: &mut Guest,
    net: &airlock_network::NetworkConfig,
) -> Result<(), ConfigError> {
    let side = guest.side;
    let Some(nic) = &mut guest.network else {
        return Ok(());
    };
    let net_side = match side {
        Side::Classified => airlock_network::Side::Classified,
        Side::General => airlock_network::Side::General,
    };
    let fail = |field: &str, message: String| {
        let key = format!("guest.{side}.network.{field}");
        match layers
            .iter()
            .rev()
            .find(|l| l.guest(side).and_then(|g| g.network.as_ref()).is_some())
        {
            Some(layer) => layer.invalid(&layer.key_span(&key), &key, message),
            None => ConfigError::Missing {
                file: layers[0].file.clone(),
                key,
                message,
            },
        }
    };
    if nic.tap != net_side.tap() {
        return Err(fail(
            "tap",
            format!(
                "{:?}: with [network] configured the guest's tap is {:?}",
                nic.tap,
                net_side.tap()
            ),
        ));
    }
    if nic.bridge != net_side.bridge() {
        return Err(fail(
            "bridge",
            format!(
                "{:?}: with [network] configured the side's bridge is {:?}",
                nic.bridge,
                net_side.bridge()
            ),
        ));
    }
    let mac = net.segment(net_side).guest_mac.to_string();
    match &nic.mac {
        Some(m) if *m != mac => {
            return Err(fail("mac", format!("{m} differs from network.{side}.guest_mac {mac}, the only address the ruleset lets through")))
        }
        _ => nic.mac = Some(mac),
    }
    Ok(())
}

/// The provisioning file may only set machine-specific values.
fn check_provisioning_keys(layer: &Layer) -> Result<(), ConfigError> {
    let only_shipped = "may only be set in the shipped configuration (the provisioning file on /var may set machine.hostname, a guest's disk, disk_format, memory_mib, vcpus, limits and network.mac, the network uplinks, the update server network.update and network.classified.wireguard.address)";
    if let Some(toml::Value::Table(net)) = &layer.raw.network {
        for (key, value) in net {
            let allowed = match (key.as_str(), value) {
                // The uplinks, and the update server (a site may give
                // PCs different servers, e.g. a pilot group first).
                ("uplink" | "update", _) => true,
                ("classified" | "general", toml::Value::Table(t)) => {
                    // Per PC: the side's uplink, and the classified tunnel's
                    // own address (the peer, its key and the allow-list are
                    // the image's).
                    let per_pc = |k: &str, v: &toml::Value| match (key.as_str(), k, v) {
                        (_, "uplink", _) => true,
                        ("classified", "wireguard", toml::Value::Table(w)) => {
                            w.keys().all(|k| k == "address")
                        }
                        _ => false,
                    };
                    if let Some((k, v)) = t.iter().find(|(k, v)| !per_pc(k, v)) {
                        let dotted = match (k.as_str(), v) {
                            ("wireguard", toml::Value::Table(w)) => {
                                let inner = w
                                    .keys()
                                    .find(|k| *k != "address")
                                    .map_or("", String::as_str);
                                format!("network.{key}.wireguard.{inner}")
                            }
                            _ => format!("network.{key}.{k}"),
                        };
                        return Err(layer.invalid(&layer.key_span(&dotted), &dotted, only_shipped));
                    }
                    true
                }
                _ => false,
            };
            if !allowed {
                let dotted = format!("network.{key}");
                return Err(layer.invalid(&layer.key_span(&dotted), &dotted, only_shipped));
            }
        }
    }
    if let Some(s) = &layer.raw.supervisor {
        let _ = s;
        return Err(layer.invalid(&layer.table_span("supervisor"), "supervisor", only_shipped));
    }
    if layer.raw.clipboard.is_some() {
        return Err(layer.invalid(&layer.table_span("clipboard"), "clipboard", only_shipped));
    }
    for side in Side::ALL {
        let Some(g) = layer.guest(side) else { continue };
        let p = |k: &str| format!("guest.{side}.{k}");
        let spans: [(&str, Option<Range<usize>>); 7] = [
            ("accel", g.accel.as_ref().map(Spanned::span)),
            ("user", g.user.as_ref().map(Spanned::span)),
            ("rtc", g.rtc.as_ref().map(Spanned::span)),
            ("devices", g.devices.as_ref().map(Spanned::span)),
            (
                "firmware",
                g.firmware
                    .as_ref()
                    .map(|_| layer.table_span(&p("firmware"))),
            ),
            (
                "test_boot",
                g.test_boot
                    .as_ref()
                    .map(|_| layer.table_span(&p("test_boot"))),
            ),
            ("network", None),
        ];
        for (key, span) in spans {
            if let Some(span) = span {
                return Err(layer.invalid(&span, &p(key), only_shipped));
            }
        }
        if let Some(net) = &g.network {
            for (key, span) in [
                ("enabled", net.enabled.as_ref().map(Spanned::span)),
                ("tap", net.tap.as_ref().map(Spanned::span)),
                ("bridge", net.bridge.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    return Err(layer.invalid(&span, &p(&format!("network.{key}")), only_shipped));
                }
            }
        }
    }
    Ok(())
}

fn resolve_supervisor(layers: &[Layer]) -> Result<Supervisor, ConfigError> {
    fn sup(l: &Layer) -> Option<&RawSupervisor> {
        l.raw.supervisor.as_ref()
    }
    let dir =
        |key: &'static str, default: &str, get: fn(&RawSupervisor) -> Option<&Spanned<String>>| {
            match pick(layers, |l| sup(l).and_then(get)) {
                Some(f) => absolute_path(&f, &format!("supervisor.{key}")),
                None => Ok(PathBuf::from(default)),
            }
        };
    let run_dir = dir("run_dir", "/run/airlock", |s| s.run_dir.as_ref())?;
    let state_dir = dir("state_dir", "/var/lib/airlock", |s| s.state_dir.as_ref())?;
    let log_dir = dir("log_dir", "/var/log/airlock", |s| s.log_dir.as_ref())?;
    let qemu = dir("qemu", "/usr/bin/qemu-system-x86_64", |s| s.qemu.as_ref())?;
    let swtpm = dir("swtpm", "/usr/bin/swtpm", |s| s.swtpm.as_ref())?;
    let gateway = dir("gateway", "/usr/lib/airlock/airlock-gateway", |s| {
        s.gateway.as_ref()
    })?;
    let cgroup = match pick(layers, |l| sup(l)?.cgroup.as_ref()) {
        None => CgroupRoot::Auto,
        Some(f) if f.value == "auto" => CgroupRoot::Auto,
        Some(f) => {
            let path = absolute_path(&f, "supervisor.cgroup")?;
            if !path.starts_with("/sys/fs/cgroup") {
                return Err(f.invalid(
                    "supervisor.cgroup",
                    "must be \"auto\" or a directory under /sys/fs/cgroup",
                ));
            }
            CgroupRoot::Path(path)
        }
    };
    let strict_limits = pick(layers, |l| sup(l)?.strict_limits.as_ref()).is_none_or(|f| *f.value);
    let poweroff_command = match pick(layers, |l| sup(l)?.poweroff_command.as_ref()) {
        None => DEFAULT_POWEROFF_COMMAND
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
        Some(f) => {
            match f.value.first() {
                None => return Err(f.invalid("supervisor.poweroff_command", "must name a program")),
                Some(p) if !p.starts_with('/') => {
                    return Err(f.invalid(
                        "supervisor.poweroff_command",
                        format!("{p:?}: the program must be an absolute path"),
                    ))
                }
                Some(_) => {}
            }
            f.value.clone()
        }
    };
    let shutdown_timeout = match pick(layers, |l| sup(l)?.shutdown_timeout_secs.as_ref()) {
        None => Duration::from_secs(90),
        Some(f) if !(1..=3600).contains(f.value) => {
            return Err(f.invalid(
                "supervisor.shutdown_timeout_secs",
                format!("{} is outside 1..=3600", f.value),
            ))
        }
        Some(f) => Duration::from_secs(*f.value),
    };
    let control_group = match pick(layers, |l| sup(l)?.control_group.as_ref()) {
        None => "airlock-control".to_owned(),
        Some(f) => {
            check_name(f.value).map_err(|why| f.invalid("supervisor.control_group", why))?;
            f.value.clone()
        }
    };
    let display_group = match pick(layers, |l| sup(l)?.display_group.as_ref()) {
        None => "airlock-kiosk".to_owned(),
        Some(f) => {
            check_name(f.value).map_err(|why| f.invalid("supervisor.display_group", why))?;
            f.value.clone()
        }
    };
    let test_mode = pick(layers, |l| sup(l)?.test_mode.as_ref()).is_some_and(|f| *f.value);
    let supervisor = Supervisor {
        run_dir,
        state_dir,
        log_dir,
        qemu,
        swtpm,
        gateway,
        cgroup,
        strict_limits,
        poweroff_command,
        shutdown_timeout,
        control_group,
        display_group,
        test_mode,
    };
    // Longest socket path: <run_dir>/classified/vdagent.sock.
    let longest = supervisor.run_dir.join("classified").join("display.sock");
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        let f = pick(layers, |l| sup(l)?.run_dir.as_ref()).expect("the default run_dir is short");
        return Err(f.invalid(
            "supervisor.run_dir",
            format!(
                "too long: {} exceeds a unix socket's {MAX_SOCKET_PATH} bytes",
                longest.display()
            ),
        ));
    }
    Ok(supervisor)
}

fn resolve_guest(layers: &[Layer], side: Side, sup: &Supervisor) -> Result<Guest, ConfigError> {
    let key = |k: &str| format!("guest.{side}.{k}");
    if !layers.iter().any(|l| l.guest(side).is_some()) {
        return Err(ConfigError::Missing {
            file: layers[0].file.clone(),
            key: format!("guest.{side}"),
            message:
                "the appliance runs exactly two guests, [guest.classified] and [guest.general]"
                    .into(),
        });
    }
    let disk_dir = sup.state_dir.join(side.name()).join("disk");

    let disk = match pick(layers, |l| l.guest(side)?.disk.as_ref()) {
        Some(f) => {
            let path = absolute_path(&f, &key("disk"))?;
            if !path.starts_with(&disk_dir) || path == disk_dir {
                return Err(f.invalid(
                    &key("disk"),
                    format!("{} is not inside {}", path.display(), disk_dir.display()),
                ));
            }
            path
        }
        None => {
            return Err(ConfigError::Missing {
                file: layers[0].file.clone(),
                key: key("disk"),
                message: format!("the guest's disk image, inside {}", disk_dir.display()),
            })
        }
    };
    let disk_format = pick(layers, |l| l.guest(side)?.disk_format.as_ref())
        .map_or(DiskFormat::Qcow2, |f| *f.value);

    let memory_mib = match pick(layers, |l| l.guest(side)?.memory_mib.as_ref()) {
        None => 4096,
        Some(f) if !(64..=1_048_576).contains(f.value) => {
            return Err(f.invalid(
                &key("memory_mib"),
                format!("{} MiB is outside 64..=1048576", f.value),
            ))
        }
        Some(f) => *f.value,
    };
    let vcpus = match pick(layers, |l| l.guest(side)?.vcpus.as_ref()) {
        None => 2,
        Some(f) if !(1..=256).contains(f.value) => {
            return Err(f.invalid(&key("vcpus"), format!("{} is outside 1..=256", f.value)))
        }
        Some(f) => *f.value,
    };
    let accel = match pick(layers, |l| l.guest(side)?.accel.as_ref()) {
        None => Accel::Kvm,
        Some(f) if *f.value == Accel::Tcg && !sup.test_mode => {
            return Err(f.invalid(
                &key("accel"),
                "\"tcg\" is only allowed with supervisor.test_mode = true",
            ))
        }
        Some(f) => *f.value,
    };
    let user = match pick(layers, |l| l.guest(side)?.user.as_ref()) {
        None => format!("airlock-{side}"),
        Some(f) => {
            check_name(f.value).map_err(|why| f.invalid(&key("user"), why))?;
            if f.value == "root" {
                return Err(f.invalid(&key("user"), "QEMU never runs as root"));
            }
            f.value.clone()
        }
    };
    let rtc = pick(layers, |l| l.guest(side)?.rtc.as_ref()).map_or(Rtc::Localtime, |f| *f.value);

    let mut devices = Vec::new();
    if let Some(f) = pick(layers, |l| l.guest(side)?.devices.as_ref()) {
        for entry in f.value {
            let device = *entry.get_ref();
            if let Some(why) = device.refusal(side) {
                return Err(f.layer.invalid(
                    &entry.span(),
                    &key("devices"),
                    format!("\"{}\": {why}", device.name()),
                ));
            }
            if devices.contains(&device) {
                return Err(f.layer.invalid(
                    &entry.span(),
                    &key("devices"),
                    format!("\"{}\" is listed twice", device.name()),
                ));
            }
            devices.push(device);
        }
    }

    fn lim(l: &Layer, side: Side) -> Option<&RawLimits> {
        l.guest(side)?.limits.as_ref()
    }
    let cpu_percent = match pick(layers, |l| lim(l, side)?.cpu_percent.as_ref()) {
        None => 100 * vcpus,
        Some(f) if !(1..=25_600).contains(f.value) => {
            return Err(f.invalid(
                &key("limits.cpu_percent"),
                format!("{} is outside 1..=25600 (percent of one CPU)", f.value),
            ))
        }
        Some(f) => *f.value,
    };
    let memory_max_mib = match pick(layers, |l| lim(l, side)?.memory_max_mib.as_ref()) {
        None => memory_mib + DEFAULT_MEMORY_HEADROOM_MIB,
        Some(f) if *f.value < memory_mib + QEMU_OVERHEAD_MIB => {
            return Err(f.invalid(
                &key("limits.memory_max_mib"),
                format!(
                "{} MiB leaves QEMU no room above the guest's {memory_mib} MiB (needs at least {})",
                f.value,
                memory_mib + QEMU_OVERHEAD_MIB
            ),
            ))
        }
        Some(f) => *f.value,
    };
    let io_limit = |name: &str,
                    get: fn(&RawLimits) -> Option<&Spanned<u64>>|
     -> Result<Option<u64>, ConfigError> {
        match pick(layers, |l| get(lim(l, side)?)) {
            None => Ok(None),
            Some(f) if *f.value == 0 => Err(f.invalid(
                &key(&format!("limits.{name}")),
                "must be positive (leave it out for no limit)",
            )),
            Some(f) => Ok(Some(*f.value)),
        }
    };
    let io = IoLimits {
        read_bps: io_limit("io_read_bps", |l| l.io_read_bps.as_ref())?,
        write_bps: io_limit("io_write_bps", |l| l.io_write_bps.as_ref())?,
        read_iops: io_limit("io_read_iops", |l| l.io_read_iops.as_ref())?,
        write_iops: io_limit("io_write_iops", |l| l.io_write_iops.as_ref())?,
    };

    fn fw(l: &Layer, side: Side) -> Option<&RawFirmware> {
        l.guest(side)?.firmware.as_ref()
    }
    let test_boot = layers
        .iter()
        .rev()
        .find_map(|l| l.guest(side)?.test_boot.as_ref().map(|tb| (l, tb)));
    let boot = match test_boot {
        Some((layer, _)) if !sup.test_mode => {
            let span = layer.table_span(&key("test_boot"));
            return Err(layer.invalid(
                &span,
                &key("test_boot"),
                "direct kernel boot is only allowed with supervisor.test_mode = true",
            ));
        }
        Some((layer, tb)) => {
            let need = |name: &str, v: &Option<Spanned<String>>| -> Result<PathBuf, ConfigError> {
                match v {
                    Some(s) => absolute_path(
                        &Found {
                            value: s.get_ref(),
                            layer,
                            span: s.span(),
                        },
                        &key(&format!("test_boot.{name}")),
                    ),
                    None => Err(layer.invalid(
                        &layer.table_span(&key("test_boot")),
                        &key(&format!("test_boot.{name}")),
                        "is missing",
                    )),
                }
            };
            Boot::Kernel {
                kernel: need("kernel", &tb.kernel)?,
                initrd: need("initrd", &tb.initrd)?,
                append: tb
                    .append
                    .as_ref()
                    .map_or_else(String::new, |s| s.get_ref().clone()),
            }
        }
        None => {
            let path = |name: &str,
                        default: PathBuf,
                        get: fn(&RawFirmware) -> Option<&Spanned<String>>| {
                match pick(layers, |l| get(fw(l, side)?)) {
                    Some(f) => absolute_path(&f, &key(&format!("firmware.{name}"))),
                    None => Ok(default),
                }
            };
            let code = path("code", "/usr/share/OVMF/OVMF_CODE_4M.fd".into(), |f| {
                f.code.as_ref()
            })?;
            let vars_template = path(
                "vars_template",
                "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
                |f| f.vars_template.as_ref(),
            )?;
            let vars = path("vars", disk_dir.join("OVMF_VARS.fd"), |f| f.vars.as_ref())?;
            if !vars.starts_with(&disk_dir) {
                let f =
                    pick(layers, |l| fw(l, side)?.vars.as_ref()).expect("the default is inside");
                return Err(f.invalid(
                    &key("firmware.vars"),
                    format!("{} is not inside {}", vars.display(), disk_dir.display()),
                ));
            }
            let secure_boot =
                pick(layers, |l| fw(l, side)?.secure_boot.as_ref()).is_some_and(|f| *f.value);
            Boot::Firmware(Firmware {
                code,
                vars_template,
                vars,
                secure_boot,
            })
        }
    };

    let tpm = pick(layers, |l| fw(l, side)?.tpm.as_ref()).is_some_and(|f| *f.value);

    fn net(l: &Layer, side: Side) -> Option<&RawNetwork> {
        l.guest(side)?.network.as_ref()
    }
    let network = if pick(layers, |l| net(l, side)?.enabled.as_ref()).is_some_and(|f| !*f.value) {
        None
    } else {
        let name =
            |field: &str, default: String, get: fn(&RawNetwork) -> Option<&Spanned<String>>| {
                match pick(layers, |l| get(net(l, side)?)) {
                    None => Ok(default),
                    Some(f) => {
                        check_ifname(f.value)
                            .map_err(|why| f.invalid(&key(&format!("network.{field}")), why))?;
                        Ok(f.value.clone())
                    }
                }
            };
        let tap = name("tap", format!("tap-{side}"), |n| n.tap.as_ref())?;
        let bridge = name("bridge", format!("br-{side}"), |n| n.bridge.as_ref())?;
        let mac = match pick(layers, |l| net(l, side)?.mac.as_ref()) {
            None => None,
            Some(f) => {
                check_mac(f.value).map_err(|why| f.invalid(&key("network.mac"), why))?;
                Some(f.value.to_ascii_lowercase())
            }
        };
        Some(Network { tap, bridge, mac })
    };

    Ok(Guest {
        side,
        disk,
        disk_format,
        memory_mib,
        vcpus,
        accel,
        user,
        rtc,
        devices,
        limits: Limits {
            cpu_percent,
            memory_max_mib,
            io,
        },
        boot,
        tpm,
        network,
    })
}

/// An absolute, normalised path QEMU's option parser can take (no commas).
fn absolute_path(f: &Found<'_, String>, key: &str) -> Result<PathBuf, ConfigError> {
    let path = Path::new(f.value.as_str());
    if !path.is_absolute() {
        return Err(f.invalid(key, format!("{:?} must be an absolute path", f.value)));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(f.invalid(key, format!("{:?} may not contain `.` or `..`", f.value)));
    }
    if f.value.contains(',') || f.value.chars().any(char::is_control) {
        return Err(f.invalid(
            key,
            format!("{:?} may not contain commas or control characters", f.value),
        ));
    }
    Ok(path.components().collect())
}

/// A user or group name.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid user or group name"))
    }
}

/// A host name as RFC 1123 and Linux allow it: dot-separated labels of
/// ASCII letters, digits and inner hyphens, each 1–63 bytes, 64 bytes in
/// all (the kernel's limit).
fn check_hostname(name: &str) -> Result<&str, String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 64 && name.split('.').all(label_ok) {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a host name (letters, digits and inner hyphens, labels of 1-63 separated by dots, 64 in all)"))
    }
}

/// A network interface name (at most 15 bytes).
fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid interface name (1-15 of A-Z a-z 0-9 - _ .)"
        ))
    }
}

/// A unicast MAC address `xx:xx:xx:xx:xx:xx`.
fn check_mac(mac: &str) -> Result<(), String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let hex = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !hex {
        return Err(format!("{mac:?} is not a MAC address (xx:xx:xx:xx:xx:xx)"));
    }
    let first = u8::from_str_radix(parts[0], 16).expect("checked hex");
    if first & 1 != 0 {
        return Err(format!("{mac:?} is a multicast address"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
[guest.classified]
disk = "/var/lib/airlock/classified/disk/windows.qcow2"

[guest.general]
disk = "/var/lib/airlock/general/disk/windows.qcow2"
"#;

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse("t.toml", MINIMAL).unwrap();
        assert_eq!(c.supervisor.run_dir, Path::new("/run/airlock"));
        assert!(!c.supervisor.test_mode);
        assert!(c.supervisor.strict_limits);
        assert_eq!(c.supervisor.poweroff_command, DEFAULT_POWEROFF_COMMAND);
        assert_eq!(c.supervisor.control_group, "airlock-control");
        assert_eq!(c.supervisor.display_group, "airlock-kiosk");
        for side in Side::ALL {
            let g = c.guest(side);
            assert_eq!(g.accel, Accel::Kvm);
            assert!(
                g.devices.is_empty(),
                "no device unless the allow-list names it"
            );
            assert_eq!(g.user, format!("airlock-{side}"));
            assert_eq!(g.limits.cpu_percent, 200);
            assert_eq!(g.limits.memory_max_mib, 4096 + 512);
            assert_eq!(g.network.as_ref().unwrap().tap, format!("tap-{side}"));
            match &g.boot {
                Boot::Firmware(fw) => assert_eq!(
                    fw.vars,
                    Path::new(&format!("/var/lib/airlock/{side}/disk/OVMF_VARS.fd"))
                ),
                Boot::Kernel { .. } => panic!("kernel boot by default"),
            }
        }
    }

    #[test]
    fn clipboard_defaults_are_the_gateways_and_safe() {
        let c = parse("t.toml", MINIMAL).unwrap();
        assert_eq!(c.clipboard, Clipboard::defaults());
        assert!(
            c.clipboard.enabled,
            "the clipboard gateway runs unless switched off"
        );
        assert!(!c.clipboard.confirm, "confirm mode is off by default");
        assert_eq!(c.clipboard.user, "airlock-gateway");
        assert_eq!(
            c.supervisor.gateway,
            Path::new("/usr/lib/airlock/airlock-gateway")
        );
        let text = format!("{MINIMAL}[clipboard]\nenabled = false\nuser = \"airlock-general\"\n");
        assert!(
            !parse("t.toml", &text).unwrap().clipboard.enabled,
            "a disabled gateway's user is not checked against the guests'"
        );
        let text = format!("{MINIMAL}[clipboard]\nconfirm = true\nconfirm_timeout_ms = 60000\nmax_bytes = 1048576\n[clipboard.limits]\nmemory_max_mib = 512\n");
        let c = parse("t.toml", &text).unwrap().clipboard;
        assert!(
            c.confirm
                && c.confirm_timeout_ms == 60000
                && c.max_bytes == 1 << 20
                && c.memory_max_mib == 512,
            "{c:?}"
        );
        assert_eq!(
            c.confirm_group, "airlock-confirm",
            "the group sysusers.d/airlockd.conf makes"
        );
        let text = format!("{MINIMAL}[clipboard]\nconfirm = true\nconfirm_group = \"clip-ok\"\n");
        assert_eq!(
            parse("t.toml", &text).unwrap().clipboard.confirm_group,
            "clip-ok"
        );
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = parse("appliance.toml", crate::SHIPPED_CONFIG_TEXT).unwrap();
        assert!(c
            .classified
            .devices
            .iter()
            .all(|d| d.refusal(Side::Classified).is_none()));
        assert!(!c.supervisor.test_mode);
        assert!(
            c.clipboard.enabled && !c.clipboard.confirm,
            "{:?}",
            c.clipboard
        );
        assert_eq!(c.clipboard.user, "airlock-gateway");
    }

    #[test]
    fn test_profile_config_is_valid() {
        // The test image's shipped configuration and the test PC's machine
        // settings (its uplinks), as the acceptance suite provisions them.
        let c = parse_layers(&[
            (
                "appliance-test.toml",
                include_str!("../../../ci/test-agent/overlay/etc/airlock/appliance.toml"),
                false,
            ),
            (
                "machine.toml",
                include_str!("../../../ci/test-agent/machine.toml"),
                true,
            ),
        ])
        .unwrap();
        assert!(c.network.is_some(), "the test PC has a host network");
        assert!(c.supervisor.test_mode);
        assert!(c.clipboard.enabled, "the suite copies through the gateway");
        for side in Side::ALL {
            let g = c.guest(side);
            assert_eq!(g.accel, Accel::Kvm, "nested KVM in the suite");
            assert_eq!(g.user, format!("airlock-{side}"));
            assert!(matches!(g.boot, Boot::Kernel { .. }));
        }
    }

    /// Each bad configuration, and the words its error must contain (the
    /// key, the line, and why).
    #[test]
    fn bad_configs_name_key_and_line() {
        let g = |extra_c: &str, extra_g: &str| {
            format!(
                "[guest.classified]\ndisk = \"/var/lib/airlock/classified/disk/w.qcow2\"\n{extra_c}\n[guest.general]\ndisk = \"/var/lib/airlock/general/disk/w.qcow2\"\n{extra_g}\n"
            )
        };
        let cases: Vec<(String, Vec<&str>)> = vec![
            (g("colour = \"red\"", ""), vec!["colour", "line 3"]),
            (g("memory_mib = \"lots\"", ""), vec!["memory_mib", "line 3"]),
            (g("devices = [\"usb\"]", ""), vec!["guest.classified.devices", "line 3", "USB"]),
            (g("devices = [\"tablet\", \"cdrom\"]", ""), vec!["guest.classified.devices", "line 3", "CD/DVD"]),
            (g("devices = [\"sound\"]", ""), vec!["guest.classified.devices", "sound"]),
            (g("devices = [\"sound-capture\"]", ""), vec!["guest.classified.devices", "sound"]),
            (g("", "devices = [\"floppy\"]"), vec!["guest.general.devices", "line 6", "floppy"]),
            (g("", "devices = [\"parallel\"]"), vec!["guest.general.devices", "parallel"]),
            (g("", "devices = [\"serial\"]"), vec!["guest.general.devices", "serial"]),
            (g("", "devices = [\"shared-folder\"]"), vec!["guest.general.devices", "shared"]),
            (g("", "devices = [\"usb\", \"usb\"]"), vec!["guest.general.devices", "twice"]),
            (g("", "devices = [\"usb3\"]"), vec!["usb3", "line 6"]),
            (g("memory_mib = 8", ""), vec!["guest.classified.memory_mib", "line 3"]),
            (g("vcpus = 0", ""), vec!["guest.classified.vcpus", "line 3"]),
            (g("accel = \"tcg\"", ""), vec!["guest.classified.accel", "test_mode"]),
            (g("user = \"root\"", ""), vec!["guest.classified.user", "root"]),
            (g("", "user = \"airlock-classified\""), vec!["guest.general.user", "line 6", "same user"]),
            (g("[guest.classified.limits]\nmemory_max_mib = 4100", ""), vec!["guest.classified.limits.memory_max_mib", "line 4", "room"]),
            (g("[guest.classified.limits]\ncpu_percent = 0", ""), vec!["guest.classified.limits.cpu_percent", "line 4"]),
            (g("[guest.classified.limits]\nio_read_bps = 0", ""), vec!["guest.classified.limits.io_read_bps", "line 4"]),
            (g("[guest.classified.limits]\niops = 5", ""), vec!["iops", "line 4"]),
            (g("[guest.classified.network]\ntap = \"tap-classified-toolong\"", ""), vec!["guest.classified.network.tap", "line 4"]),
            (g("[guest.classified.network]\nmac = \"01:00:00:00:00:01\"", ""), vec!["guest.classified.network.mac", "multicast"]),
            (g("[guest.classified.firmware]\ncode = \"OVMF.fd\"", ""), vec!["guest.classified.firmware.code", "absolute"]),
            (g("[guest.classified.firmware]\nvars = \"/tmp/vars.fd\"", ""), vec!["guest.classified.firmware.vars", "not inside"]),
            (g("[guest.classified.test_boot]\nkernel = \"/boot/vmlinuz\"\ninitrd = \"/i\"", ""), vec!["guest.classified.test_boot", "test_mode"]),
            (
                "[guest.classified]\ndisk = \"/var/lib/airlock/general/disk/w.qcow2\"\n[guest.general]\ndisk = \"/var/lib/airlock/general/disk/x\"\n".into(),
                vec!["guest.classified.disk", "line 2", "not inside"],
            ),
            (
                "[guest.classified]\ndisk = \"/var/lib/airlock/classified/disk/../../general/disk/w\"\n[guest.general]\ndisk = \"/var/lib/airlock/general/disk/x\"\n".into(),
                vec!["guest.classified.disk", "line 2", ".."],
            ),
            (
                "[guest.classified]\ndisk = \"/var/lib/airlock/classified/disk/a,b\"\n[guest.general]\ndisk = \"/var/lib/airlock/general/disk/x\"\n".into(),
                vec!["guest.classified.disk", "commas"],
            ),
            ("[guest.classified]\ndisk = \"/var/lib/airlock/classified/disk/w\"\n".into(), vec!["guest.general", "missing"]),
            ("[guest.classified]\nmemory_mib = 1024\n[guest.general]\ndisk = \"/var/lib/airlock/general/disk/x\"\n".into(), vec!["guest.classified.disk", "missing"]),
            ("[guest.secret]\n".into(), vec!["secret", "line 1"]),
            (format!("[supervisor]\npoweroff_command = [\"poweroff\"]\n{}", g("", "")), vec!["supervisor.poweroff_command", "line 2", "absolute"]),
            (format!("[supervisor]\ncgroup = \"/tmp/x\"\n{}", g("", "")), vec!["supervisor.cgroup", "line 2"]),
            (format!("[supervisor]\nshutdown_timeout_secs = 0\n{}", g("", "")), vec!["supervisor.shutdown_timeout_secs", "line 2"]),
            (format!("[supervisor]\nrun_dir = \"/{}\"\n{}", "x".repeat(100), g("", "")), vec!["supervisor.run_dir", "line 2", "socket"]),
            (format!("[supervisor]\ngateway = \"airlock-gateway\"\n{}", g("", "")), vec!["supervisor.gateway", "line 2", "absolute"]),
            (format!("[supervisor]\ndisplay_group = \"Kiosk Users\"\n{}", g("", "")), vec!["supervisor.display_group", "line 2"]),
            (format!("{}[clipboard]\ncolour = 1\n", g("", "")), vec!["colour", "line 8"]),
            (format!("{}[clipboard]\nenabled = \"yes\"\n", g("", "")), vec!["enabled", "line 8"]),
            (format!("{}[clipboard]\nmax_bytes = 0\n", g("", "")), vec!["clipboard.max_bytes", "line 8", "outside 1..=2147483647"]),
            (format!("{}[clipboard]\nmax_bytes = 4294967295\n", g("", "")), vec!["clipboard.max_bytes", "line 8"]),
            (format!("{}[clipboard]\nmax_bytes = -1\n", g("", "")), vec!["max_bytes", "line 8"]),
            (format!("{}[clipboard]\nmax_image_dimension = 0\n", g("", "")), vec!["clipboard.max_image_dimension", "line 8"]),
            (format!("{}[clipboard]\nmax_image_pixels = 1000000000\n", g("", "")), vec!["clipboard.max_image_pixels", "line 8"]),
            (format!("{}[clipboard]\nrequest_timeout_ms = 0\n", g("", "")), vec!["clipboard.request_timeout_ms", "line 8", "ms"]),
            (format!("{}[clipboard]\nsanitiser_timeout_ms = 600000\n", g("", "")), vec!["clipboard.sanitiser_timeout_ms", "line 8"]),
            (format!("{}[clipboard]\nconfirm_timeout_ms = 5000\n", g("", "")), vec!["clipboard.confirm_timeout_ms", "line 8", "confirm = true"]),
            (format!("{}[clipboard]\nconfirm = true\nconfirm_timeout_ms = 10\n", g("", "")), vec!["clipboard.confirm_timeout_ms", "line 9"]),
            (format!("{}[clipboard]\nconfirm_group = \"airlock-confirm\"\n", g("", "")), vec!["clipboard.confirm_group", "line 8", "confirm = true"]),
            (format!("{}[clipboard]\nconfirm = true\nconfirm_group = \"Confirm Users\"\n", g("", "")), vec!["clipboard.confirm_group", "line 9", "not a valid"]),
            (format!("{}[clipboard]\nconfirm = true\nconfirm_group = \"airlock-kiosk\"\n", g("", "")), vec!["clipboard.confirm_group", "line 9", "display sockets"]),
            (format!("{}[clipboard]\nconfirm = true\nconfirm_group = \"airlock-control\"\n", g("", "")), vec!["clipboard.confirm_group", "line 9", "control socket"]),
            (format!("{}[clipboard]\nconfirm = true\nconfirm_group = \"airlock-general\"\n", g("", "")), vec!["clipboard.confirm_group", "line 9", "guest's user"]),
            (format!("{}[clipboard]\nconfirm = true\nconfirm_group = \"root\"\n", g("", "")), vec!["clipboard.confirm_group", "line 9", "root"]),
            (format!("{}[clipboard]\nuser = \"root\"\n", g("", "")), vec!["clipboard.user", "line 8", "root"]),
            (format!("{}[clipboard]\nuser = \"Gate Way\"\n", g("", "")), vec!["clipboard.user", "line 8", "not a valid"]),
            (format!("{}[clipboard]\nuser = \"airlock-general\"\n", g("", "")), vec!["clipboard.user", "line 8", "guest's user"]),
            (format!("{}[clipboard.limits]\nmemory_max_mib = 16\n", g("", "")), vec!["clipboard.limits.memory_max_mib", "line 8"]),
            (format!("{}[clipboard.limits]\ncpu_percent = 0\n", g("", "")), vec!["clipboard.limits.cpu_percent", "line 8"]),
            (format!("{}[clipboard.limits]\nio_read_bps = 1\n", g("", "")), vec!["io_read_bps", "line 8"]),
        ];
        for (text, words) in &cases {
            let err = match parse("appliance.toml", text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e.to_string(),
            };
            for word in words {
                assert!(
                    err.contains(word),
                    "error for\n{text}\nis {err:?}, lacks {word:?}"
                );
            }
        }
    }

    #[test]
    fn provisioning_overrides_machine_values_only() {
        let over = "[guest.general]\nmemory_mib = 8192\n[guest.general.limits]\nmemory_max_mib = 9000\ncpu_percent = 150\n[guest.classified.network]\nmac = \"52:54:00:AA:BB:CC\"\n";
        let c = parse_layers(&[("shipped", MINIMAL, false), ("prov", over, true)]).unwrap();
        assert_eq!(c.general.memory_mib, 8192);
        assert_eq!(c.general.limits.memory_max_mib, 9000);
        assert_eq!(c.general.limits.cpu_percent, 150);
        assert_eq!(c.classified.memory_mib, 4096);
        assert_eq!(
            c.classified.network.as_ref().unwrap().mac.as_deref(),
            Some("52:54:00:aa:bb:cc")
        );

        for (over, words) in [
            (
                "[guest.classified]\ndevices = [\"tablet\"]\n",
                ["guest.classified.devices", "prov, line 2"],
            ),
            (
                "[supervisor]\ntest_mode = true\n",
                ["supervisor", "prov, line 1"],
            ),
            (
                "\n[guest.general]\naccel = \"kvm\"\n",
                ["guest.general.accel", "prov, line 3"],
            ),
            (
                "[guest.general.firmware]\ntpm = true\n",
                ["guest.general.firmware", "prov, line 1"],
            ),
            (
                "[guest.general.network]\ntap = \"tap-x\"\n",
                ["guest.general.network.tap", "prov, line 2"],
            ),
            (
                "[guest.general]\nuser = \"nobody\"\n",
                ["guest.general.user", "prov, line 2"],
            ),
            (
                "[clipboard]\nenabled = false\n",
                ["clipboard", "prov, line 1"],
            ),
            (
                "\n[clipboard.limits]\nmemory_max_mib = 512\n",
                ["clipboard", "prov, line 2"],
            ),
        ] {
            let err = parse_layers(&[("shipped", MINIMAL, false), ("prov", over, true)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("shipped configuration"), "{err}");
            for w in words {
                assert!(err.contains(w), "{err:?} lacks {w:?}");
            }
        }
        // A provisioning value is validated like a shipped one, and blamed on its own file.
        let err = parse_layers(&[
            ("shipped", MINIMAL, false),
            ("prov", "[guest.general]\nvcpus = 1000\n", true),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("prov, line 2: `guest.general.vcpus`"),
            "{err}"
        );
    }

    #[test]
    fn the_host_name_is_a_machine_setting_and_checked() {
        assert_eq!(parse("shipped", MINIMAL).unwrap().machine.hostname, None);
        let c = parse_layers(&[
            ("shipped", MINIMAL, false),
            ("prov", "[machine]\nhostname = \"desk-0042\"\n", true),
        ])
        .unwrap();
        assert_eq!(c.machine.hostname.as_deref(), Some("desk-0042"));
        let c = parse_layers(&[
            ("shipped", MINIMAL, false),
            (
                "prov",
                "[machine]\nhostname = \"desk-0042.it.example\"\n",
                true,
            ),
        ])
        .unwrap();
        assert_eq!(c.machine.hostname.as_deref(), Some("desk-0042.it.example"));
        let long = format!("{}.b", "a".repeat(63));
        for bad in [
            "",
            "-desk",
            "desk-",
            "desk_42",
            "desk 42",
            "desk..42",
            "dësk",
            "a\\nb",
            long.as_str(),
        ] {
            let text = format!("\n[machine]\nhostname = {bad:?}\n");
            let err = parse_layers(&[("shipped", MINIMAL, false), ("prov", &text, true)])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("prov, line 3: `machine.hostname`")
                    && err.contains("is not a host name"),
                "{bad:?}: {err}"
            );
        }
        let err = parse_layers(&[
            ("shipped", MINIMAL, false),
            ("prov", "[machine]\nname = \"x\"\n", true),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn missing_provisioning_file_is_fine_and_missing_shipped_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = dir.path().join("a.toml");
        std::fs::write(&shipped, MINIMAL).unwrap();
        load(&shipped, Some(&dir.path().join("absent.toml"))).unwrap();
        let err = load(&dir.path().join("nope.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    /// A `[network]` section (the network crate's shared-uplink fixture).
    fn with_network() -> String {
        network_doc(include_str!("../../network/tests/fixtures/shared.toml"))
    }

    /// MINIMAL with a network crate fixture as its `[network]` section.
    fn network_doc(net: &str) -> String {
        let mut doc = String::from(MINIMAL);
        for line in net.lines() {
            let line = match line.strip_prefix("[[") {
                Some(rest) => format!("[[network.{rest}"),
                None => match line.strip_prefix('[') {
                    Some(rest) => format!("[network.{rest}"),
                    None => line.to_owned(),
                },
            };
            doc.push_str(&line);
            doc.push('\n');
        }
        doc.replacen("\n[network.", "\n[network]\n[network.", 1)
    }

    #[test]
    fn network_section_sets_the_guest_macs() {
        let text = with_network();
        let c = parse("a.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let net = c.network.as_ref().unwrap();
        assert_eq!(
            c.classified.network.as_ref().unwrap().mac.as_deref(),
            Some(net.classified.segment.guest_mac.to_string().as_str())
        );
        assert_eq!(
            c.general.network.as_ref().unwrap().mac.as_deref(),
            Some(net.general.segment.guest_mac.to_string().as_str())
        );
        assert!(parse("a.toml", MINIMAL).unwrap().network.is_none());
    }

    #[test]
    fn network_section_errors_name_key_and_line() {
        let text = with_network();
        let mac_line = text
            .lines()
            .position(|l| l.starts_with("guest_mac"))
            .unwrap()
            + 1;
        let bad = text.replacen("guest_mac = \"", "guest_mac = \"zz", 1);
        let err = parse("a.toml", &bad).unwrap_err().to_string();
        assert!(
            err.contains("guest_mac") && err.contains(&format!("line {mac_line}")),
            "{err}"
        );
        // A guest MAC that the ruleset would not let through.
        let bad = text.replacen(
            "[guest.general]\n",
            "[guest.general.network]\nmac = \"52:54:00:00:00:09\"\n[guest.general]\n",
            1,
        );
        let err = parse("a.toml", &bad).unwrap_err().to_string();
        assert!(
            err.contains("guest.general.network.mac") && err.contains("line 6"),
            "{err}"
        );
        // An unknown key inside [network].
        let bad = text.replacen("[network]\n", "[network]\ncolour = 1\n", 1);
        assert!(parse("a.toml", &bad)
            .unwrap_err()
            .to_string()
            .contains("colour"));
    }

    #[test]
    fn the_update_server_is_a_machine_setting_and_checked() {
        let text = with_network();
        assert_eq!(
            parse("shipped", &text).unwrap().network.unwrap().update,
            None
        );
        let over = "[network.update]\nurl = \"http://203.0.113.80:8080/airlock/current.airlock\"\nuplink = \"general\"\n";
        let c = parse_layers(&[("shipped", &text, false), ("prov", over, true)]).unwrap();
        let u = c.network.unwrap().update.unwrap();
        assert_eq!(u.url, "http://203.0.113.80:8080/airlock/current.airlock");
        assert_eq!(u.address.to_string(), "203.0.113.80:8080");
        let bad = "# pc-0042\n[network.update]\nurl = \"http://updates.example/x.airlock\"\nuplink = \"general\"\n";
        let err = parse_layers(&[("shipped", &text, false), ("prov", bad, true)])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("prov, line 3: `network.update.url`")
                && err.contains("not an IPv4 address"),
            "{err}"
        );
    }

    #[test]
    fn provisioning_may_set_uplinks_only() {
        let text = with_network();
        let over = "[network.uplink]\ninterface = \"enp9s0\"\naddress = \"198.51.100.77/24\"\ngateway = \"198.51.100.1\"\n";
        let c = parse_layers(&[("shipped", &text, false), ("prov", over, true)]).unwrap();
        match &c.network.unwrap().uplinks {
            airlock_network::config::Uplinks::Shared(u) => assert_eq!(u.interface, "enp9s0"),
            other => panic!("{other:?}"),
        }
        // A bad value in the provisioning layer is named with its file and line.
        let bad = "# pc-0042\n[network.uplink]\ninterface = \"enp9s0\"\naddress = \"198.51.100.300/24\"\ngateway = \"198.51.100.1\"\n";
        let err = parse_layers(&[("shipped", &text, false), ("prov", bad, true)])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("prov, line 4: `network.uplink.address`"),
            "{err}"
        );
        for (over, key) in [
            ("[[network.classified.servers]]\naddress = \"10.0.0.0/8\"\nprotocol = \"tcp\"\nports = [1]\n", "network.classified.servers"),
            ("[network.general]\ndeny = []\n", "network.general.deny"),
            ("[network]\nfoo = 1\n", "network.foo"),
        ] {
            let err = parse_layers(&[("shipped", &text, false), ("prov", over, true)]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("shipped configuration"), "{err}");
        }
    }

    #[test]
    fn provisioning_sets_the_tunnel_address_and_nothing_else_of_the_tunnel() {
        let shipped = network_doc(include_str!(
            "../../network/tests/fixtures/shared-wireguard.toml"
        ))
        .replacen("address = \"10.99.0.2/24\"\n", "", 1);
        assert!(
            shipped.contains("[network.classified.wireguard]") && !shipped.contains("10.99.0.2"),
            "{shipped}"
        );
        // The shipped file alone lacks the per-PC address, and says where it goes.
        let err = parse("shipped", &shipped).unwrap_err().to_string();
        assert!(
            err.contains("network.classified.wireguard.address") && err.contains("machine file"),
            "{err}"
        );
        let over = "[network.classified.wireguard]\naddress = \"10.99.0.42/24\"\n";
        let c = parse_layers(&[("shipped", &shipped, false), ("prov", over, true)]).unwrap();
        let wg = c.network.unwrap().classified.wireguard.unwrap();
        assert_eq!(wg.address.to_string(), "10.99.0.42/24");
        assert_eq!(
            wg.private_key_file,
            "/var/lib/airlock/provision/wg-classified.key"
        );
        // With no machine file's address either, the files are named together.
        let err = parse_layers(&[("shipped", &shipped, false), ("prov", "[network.uplink]\ninterface = \"enp9s0\"\naddress = \"192.168.10.20/24\"\ngateway = \"192.168.10.1\"\n", true)]).unwrap_err().to_string();
        assert!(
            err.contains("network.classified.wireguard.address"),
            "{err}"
        );
        // The peer, the key file and the port are the image's.
        for (line, key) in [
            (
                "peer_public_key = \"AAAAA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"",
                "network.classified.wireguard.peer_public_key",
            ),
            (
                "private_key_file = \"/tmp/k\"",
                "network.classified.wireguard.private_key_file",
            ),
            (
                "listen_port = 1",
                "network.classified.wireguard.listen_port",
            ),
        ] {
            let over = format!("{over}{line}\n");
            let err = parse_layers(&[("shipped", &shipped, false), ("prov", &over, true)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key)
                    && err.contains("shipped configuration")
                    && err.starts_with("prov, line 3"),
                "{err}"
            );
        }
        let err = parse_layers(&[
            ("shipped", &shipped, false),
            (
                "prov",
                "[network.general.wireguard]\naddress = \"10.99.0.42/24\"\n",
                true,
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("network.general.wireguard") && err.contains("shipped configuration"),
            "{err}"
        );
    }

    #[test]
    fn test_mode_allows_tcg_and_kernel_boot() {
        let text = r#"
[supervisor]
test_mode = true
[guest.classified]
disk = "/var/lib/airlock/classified/disk/d.raw"
accel = "tcg"
user = "nobody"
[guest.classified.test_boot]
kernel = "/boot/vmlinuz"
initrd = "/tmp/initrd"
append = "console=ttyS0"
[guest.general]
disk = "/var/lib/airlock/general/disk/d.raw"
user = "nobody"
"#;
        let c = parse("t", text).unwrap();
        assert_eq!(c.classified.accel, Accel::Tcg);
        assert!(
            matches!(&c.classified.boot, Boot::Kernel { append, .. } if append == "console=ttyS0")
        );
    }
}
