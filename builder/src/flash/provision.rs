//! Provisioning at flash time: the two guest disk images and the machine's
//! settings, checked completely before anything is written, then placed on
//! the data partition (`/var` on the appliance) with the run-time
//! contract's owners, modes and SELinux labels
//! (`appliance-daemon/README.md`).
//!
//! - The machine file is the provisioning layer of the appliance
//!   configuration, `/var/lib/airlock/provision/appliance.toml`. It is
//!   validated by `airlockd`'s own code (`airlockd::config::parse_layers`)
//!   against the shipped `/etc/airlock/appliance.toml` read from the image
//!   being flashed, so what flash accepts is exactly what the supervisor
//!   will accept; errors name the file, the line and the key. It is copied
//!   byte for byte (`0600 root:root`, `airlock_conf_t`). Its presence is
//!   what makes the appliance "provisioned" (`airlockd.service`'s
//!   `ConditionPathExists=`).
//! - A guest image goes where the merged configuration says
//!   (`guest.<side>.disk`, inside `/var/lib/airlock/<side>/disk/`), owned by
//!   the side's user as the image's `/etc/passwd` defines it, `0600`,
//!   `airlock_<side>_disk_t`. Its format is detected by content
//!   (`qemu-img info`) and must be the configured `disk_format`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::cmd;

pub use airlockd::config::Side;
use airlockd::config::{Config, DiskFormat};

use super::copy::{drop_cache, read_full, Progress};
use super::selabel::{self, FileType};
use super::wgkey::PrivateKey;
use crate::exec::Runner;

/// Where the shipped configuration is, inside the image's root.
const SHIPPED: &str = "etc/airlock/appliance.toml";
/// The data partition is mounted here on the appliance.
const VAR: &str = "/var";

/// Directories provisioning makes sure of, with the modes and owners of
/// `overlay/usr/lib/tmpfiles.d/airlockd.conf` (a unit test compares them).
/// `{side}` is each side; `Owner::Side` its QEMU user.
pub const DIRS: &[(&str, u32, Owner)] = &[
    ("/var/lib/airlock", 0o755, Owner::Root),
    ("/var/lib/airlock/provision", 0o755, Owner::Root),
    ("/var/lib/airlock/{side}", 0o755, Owner::Root),
    ("/var/lib/airlock/{side}/disk", 0o700, Owner::Side),
];
/// The machine file: read by root only (it may name key files and addresses).
pub const MACHINE_MODE: u32 = 0o600;
/// A guest disk: its side's QEMU user only.
pub const DISK_MODE: u32 = 0o600;
/// The PC's tunnel key: root (the network set-up) only.
pub const KEY_MODE: u32 = 0o600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Root,
    Side,
}

/// `--guest SIDE=FILE` (clap value parser).
pub fn parse_guest_arg(s: &str) -> Result<(Side, PathBuf), String> {
    let (side, file) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected SIDE=FILE, e.g. classified=win-classified.qcow2")
    })?;
    let side = match side {
        "classified" => Side::Classified,
        "general" => Side::General,
        other => {
            return Err(format!(
                "{other:?}: the side is \"classified\" or \"general\""
            ))
        }
    };
    if file.is_empty() {
        return Err(format!("{s:?}: no file after '='"));
    }
    Ok((side, PathBuf::from(file)))
}

/// What was asked for.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub guests: Vec<(Side, PathBuf)>,
    pub machine: Option<PathBuf>,
    pub wireguard_key: Option<PathBuf>,
}

impl Inputs {
    /// One guest per side; guests only with a machine file (an empty one
    /// takes the shipped settings): without it the supervisor never starts.
    pub fn check_shape(&self) -> Result<()> {
        for side in Side::ALL {
            if self.guests.iter().filter(|(s, _)| *s == side).count() > 1 {
                bail!("--guest {side}=… given twice");
            }
        }
        if !self.guests.is_empty() && self.machine.is_none() {
            bail!("--guest needs --machine FILE: the supervisor starts only on a provisioned appliance (an empty file keeps the shipped settings)");
        }
        if self.wireguard_key.is_some() && self.machine.is_none() {
            bail!("--wireguard-key needs --machine FILE: the PC's tunnel address (network.classified.wireguard.address) is a machine setting");
        }
        Ok(())
    }
}

/// A guest image as `qemu-img info` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub format: DiskFormat,
    pub virtual_size: u64,
}

/// Reads `qemu-img info --output=json` of a guest image (pure): raw or
/// qcow2, no backing file, not encrypted, not marked corrupt.
pub fn check_qemu_img_info(json: &str, file: &Path) -> Result<GuestImage> {
    let f = file.display();
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("{f}: parsing qemu-img info"))?;
    let format = match v["format"].as_str() {
        Some("raw") => DiskFormat::Raw,
        Some("qcow2") => DiskFormat::Qcow2,
        Some(other) => bail!("{f}: a {other} image; airlock takes raw or qcow2 (convert: qemu-img convert -O qcow2 {f} OUT.qcow2)"),
        None => bail!("{f}: qemu-img reports no format"),
    };
    let virtual_size = v["virtual-size"]
        .as_u64()
        .with_context(|| format!("{f}: qemu-img reports no virtual size"))?;
    if virtual_size == 0 || virtual_size % 512 != 0 {
        bail!("{f}: a disk of {virtual_size} bytes is no disk (not a positive multiple of 512)");
    }
    if let Some(backing) = v["backing-filename"].as_str() {
        bail!("{f}: has a backing file ({backing}), which would not exist on the appliance; flatten it first (qemu-img convert -O qcow2 {f} OUT.qcow2)");
    }
    if v["encrypted"].as_bool() == Some(true) {
        bail!("{f}: an encrypted qcow2; the supervisor has no key for it");
    }
    if v["format-specific"]["data"]["corrupt"].as_bool() == Some(true) {
        bail!("{f}: qemu-img marks this qcow2 corrupt (repair: qemu-img check -r all {f})");
    }
    Ok(GuestImage {
        format,
        virtual_size,
    })
}

/// A raw disk must start with a partition table (MBR or GPT's protective
/// MBR: the boot signature 55 AA at byte 510): anything qemu-img does not
/// recognise is "raw", so this is what tells a disk from a stray file.
fn check_raw_is_a_disk(file: &Path) -> Result<()> {
    let mut sector = [0u8; 512];
    File::open(file)
        .and_then(|mut f| f.read_exact(&mut sector))
        .with_context(|| format!("{}: reading its first sector", file.display()))?;
    if sector[510..] != [0x55, 0xaa] {
        bail!("{}: raw, but without a partition table (no boot signature at byte 510): not a disk image", file.display());
    }
    Ok(())
}

/// One guest disk to place.
#[derive(Debug, Clone)]
pub struct PlannedGuest {
    pub side: Side,
    pub source: PathBuf,
    /// Its path on the appliance (`guest.<side>.disk`).
    pub dest: PathBuf,
    pub image: GuestImage,
    pub file_size: u64,
}

/// The PC's tunnel key, checked.
#[derive(Debug, Clone)]
pub struct PlannedKey {
    pub source: PathBuf,
    pub key: PrivateKey,
}

/// Everything validated; what [`apply`] writes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub machine: Option<(PathBuf, Vec<u8>)>,
    pub wireguard_key: Option<PlannedKey>,
    pub guests: Vec<PlannedGuest>,
    /// uid and gid of each side's QEMU user in the image.
    pub owners: BTreeMap<&'static str, (u32, u32)>,
    /// The image's label of `/var` (user, role and level are taken from it).
    pub var_label: String,
    pub config: Config,
}

impl Plan {
    /// uid and gid of `side`'s QEMU user in the image.
    pub fn owner(&self, side: Side) -> Result<(u32, u32)> {
        self.owners
            .get(side.name())
            .copied()
            .with_context(|| format!("no user known for the {side} side"))
    }

    /// Room the provisioned files need on the data partition: the guest
    /// files' full size (a sparse raw image is counted whole: the guest
    /// will fill it) and 5 % for the filesystem.
    pub fn bytes_needed(&self) -> u64 {
        let files: u64 = self
            .guests
            .iter()
            .map(|g| g.file_size.next_multiple_of(4096))
            .sum::<u64>()
            + self
                .machine
                .as_ref()
                .map_or(0, |(_, b)| b.len() as u64 + 4096)
            + self.wireguard_key.as_ref().map_or(0, |_| 4096);
        files + files / 20 + (16 << 20)
    }
}

/// A configuration error on one line: toml's syntax errors come as a
/// snippet over several lines (`TOML parse error at line 2, column 1`, the
/// line, a caret, the reason); the file, the position and the reason (which
/// names the key) are kept.
pub fn one_line(e: airlockd::config::ConfigError) -> anyhow::Error {
    match e {
        airlockd::config::ConfigError::Parse { file, message } if message.contains('\n') => {
            let position = message
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("TOML parse error at ")
                .to_owned();
            let reason = message
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned();
            anyhow::anyhow!("{file}, {position}: {reason}")
        }
        other => other.into(),
    }
}

/// `name:x:uid:gid:…` of `user` in a passwd file (pure).
pub fn passwd_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == user)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

/// Checks every input against the image whose root is mounted at `root`.
pub fn validate(runner: &Runner, root: &Path, inputs: &Inputs) -> Result<Plan> {
    inputs.check_shape()?;
    let shipped_path = root.join(SHIPPED);
    let shipped = std::fs::read_to_string(&shipped_path)
        .context("reading the image's /etc/airlock/appliance.toml")?;
    let shipped_name = "(image) /etc/airlock/appliance.toml";
    let machine = match &inputs.machine {
        Some(path) => Some((
            path.clone(),
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )),
        None => None,
    };
    let config = match &machine {
        Some((path, bytes)) => {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))?;
            airlockd::config::parse_layers(&[
                (shipped_name, &shipped, false),
                (&path.display().to_string(), text, true),
            ])
            .map_err(one_line)?
        }
        None => airlockd::config::parse(shipped_name, &shipped).map_err(one_line)?,
    };
    let wireguard_key = check_wireguard_key(&config, inputs.wireguard_key.as_deref())?;
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))
        .context("reading the image's /etc/passwd")?;
    let mut owners = BTreeMap::new();
    for side in Side::ALL {
        let user = &config.guest(side).user;
        let ids = passwd_ids(&passwd, user).with_context(|| {
            format!("the image has no user {user:?} (guest.{side}.user) in /etc/passwd")
        })?;
        owners.insert(side.name(), ids);
    }
    let var_label = xattr::get(root.join("var"), "security.selinux")
        .ok()
        .flatten()
        .map(|l| {
            String::from_utf8_lossy(&l)
                .trim_end_matches('\0')
                .to_owned()
        })
        .context("the image's /var carries no SELinux label; not an airlock image")?;
    selabel::context_like(&var_label, "x_t")?;

    let mut guests = Vec::new();
    for (side, source) in &inputs.guests {
        let f = source.display();
        let meta =
            std::fs::metadata(source).with_context(|| format!("{f}: guest image for {side}"))?;
        if !meta.is_file() {
            bail!("{f}: not a file");
        }
        let sh = runner.sh();
        let json = runner.run(
            &format!("{f}: reading the guest image (qemu-img info)"),
            cmd!(sh, "qemu-img info --output=json {source}"),
        )?;
        let image = check_qemu_img_info(&json, source)?;
        if image.format == DiskFormat::Raw {
            check_raw_is_a_disk(source)?;
        }
        let guest = config.guest(*side);
        if guest.disk_format != image.format {
            bail!(
                "{f} is a {} image, but guest.{side}.disk_format is {:?}; set disk_format = \"{}\" under [guest.{side}] in the machine file",
                image.format.name(),
                guest.disk_format.name(),
                image.format.name()
            );
        }
        if !guest.disk.starts_with(VAR) {
            bail!(
                "guest.{side}.disk {} is not on the data partition ({VAR})",
                guest.disk.display()
            );
        }
        guests.push(PlannedGuest {
            side: *side,
            source: source.clone(),
            dest: guest.disk.clone(),
            image,
            file_size: meta.len(),
        });
    }
    for side in Side::ALL {
        if machine.is_some() && !guests.iter().any(|g| g.side == side) {
            println!("airlock: note: no --guest {side}=FILE: that guest will not start (its disk {} is missing)", config.guest(side).disk.display());
        }
    }
    Ok(Plan {
        machine,
        wireguard_key,
        guests,
        owners,
        var_label,
        config,
    })
}

/// A tunnel in the merged configuration needs this PC's own key, placed
/// where flash puts it; no tunnel, no key (a key nobody reads is a key
/// that leaks for nothing).
fn check_wireguard_key(config: &Config, key_file: Option<&Path>) -> Result<Option<PlannedKey>> {
    let tunnel = config
        .network
        .as_ref()
        .and_then(|n| n.classified.wireguard.as_ref());
    match (tunnel, key_file) {
        (None, None) => Ok(None),
        (None, Some(f)) => bail!(
            "{}: the image's configuration has no WireGuard tunnel (network.classified.wireguard), so --wireguard-key would place a key nothing uses; leave it out",
            f.display()
        ),
        (Some(_), None) => bail!(
            "the image's configuration sends classified traffic through a WireGuard tunnel (network.classified.wireguard): give this PC's private key with --wireguard-key FILE (make one with `wg genkey`; flash prints its public key for the tunnel server)"
        ),
        (Some(wg), Some(f)) => {
            if wg.private_key_file != airlock_network::config::WIREGUARD_KEY_FILE {
                bail!(
                    "network.classified.wireguard.private_key_file is {:?}: flash places the PC's key only at {} (its own SELinux type); remove private_key_file from the shipped configuration",
                    wg.private_key_file,
                    airlock_network::config::WIREGUARD_KEY_FILE
                );
            }
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let key = PrivateKey::parse(&bytes).with_context(|| format!("{}: not a WireGuard private key", f.display()))?;
            Ok(Some(PlannedKey { source: f.to_path_buf(), key }))
        }
    }
}

/// The path on the mounted data partition of appliance path `p` (under /var).
fn on_data(data_root: &Path, p: &Path) -> Result<PathBuf> {
    let rel = p
        .strip_prefix(VAR)
        .with_context(|| format!("{} is not under {VAR}", p.display()))?;
    Ok(data_root.join(rel))
}

/// Sets owner, mode and the label `airlock.fc` gives appliance path `path`.
fn set_meta(
    plan: &Plan,
    entries: &[selabel::Entry],
    at: &Path,
    path: &Path,
    ids: (u32, u32),
    mode: u32,
    ft: FileType,
) -> Result<String> {
    let shown = path.display();
    std::os::unix::fs::chown(at, Some(ids.0), Some(ids.1))
        .with_context(|| format!("{shown}: chown"))?;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("{shown}: chmod"))?;
    let type_ = selabel::lookup(entries, &path.to_string_lossy(), ft)
        .with_context(|| format!("{shown}: policy/airlock.fc has no label for it"))?;
    let context = selabel::context_like(&plan.var_label, type_)?;
    xattr::set(at, "security.selinux", context.as_bytes())
        .with_context(|| format!("{shown}: setting its SELinux label"))?;
    Ok(context)
}

/// Writes the plan onto the data partition mounted at `data_root`; returns
/// one line per file written.
pub fn apply(plan: &Plan, data_root: &Path) -> Result<Vec<String>> {
    let entries = selabel::parse_fc(selabel::AIRLOCK_FC)?;
    if !data_root.join("lib").is_dir() {
        bail!("the data partition has no lib/ (/var/lib); not an airlock data partition");
    }
    let ids_of = |owner: Owner, side: Side| match owner {
        Owner::Root => Ok((0, 0)),
        Owner::Side => plan.owner(side),
    };
    for side in Side::ALL {
        for (template, mode, owner) in DIRS {
            let path = PathBuf::from(template.replace("{side}", side.name()));
            let at = on_data(data_root, &path)?;
            if !at.is_dir() {
                std::fs::create_dir(&at).with_context(|| format!("creating {}", path.display()))?;
            }
            set_meta(
                plan,
                &entries,
                &at,
                &path,
                ids_of(*owner, side)?,
                *mode,
                FileType::Dir,
            )?;
        }
    }
    let mut lines = Vec::new();
    if let Some((source, bytes)) = &plan.machine {
        let path = PathBuf::from(airlockd::config::PROVISION_CONFIG);
        let at = on_data(data_root, &path)?;
        let tmp = at.with_extension("toml.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        let context = set_meta(
            plan,
            &entries,
            &tmp,
            &path,
            (0, 0),
            MACHINE_MODE,
            FileType::File,
        )?;
        std::fs::rename(&tmp, &at).with_context(|| format!("renaming into {}", path.display()))?;
        lines.push(format!(
            "{} (from {}): root:root {:04o} {context}",
            path.display(),
            source.display(),
            MACHINE_MODE
        ));
    }
    if let Some(k) = &plan.wireguard_key {
        let path = PathBuf::from(airlock_network::config::WIREGUARD_KEY_FILE);
        let at = on_data(data_root, &path)?;
        let tmp = at.with_extension("key.tmp");
        // Created 0600 before a byte of the key is in it.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(KEY_MODE)
            .open(&tmp)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(k.key.file_text().as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        let context = set_meta(
            plan,
            &entries,
            &tmp,
            &path,
            (0, 0),
            KEY_MODE,
            FileType::File,
        )?;
        std::fs::rename(&tmp, &at).with_context(|| format!("renaming into {}", path.display()))?;
        lines.push(format!(
            "{} (from {}): root:root {:04o} {context}; public key {} (add it to the tunnel server's peers)",
            path.display(),
            k.source.display(),
            KEY_MODE,
            k.key.public()
        ));
    }
    for g in &plan.guests {
        let at = on_data(data_root, &g.dest)?;
        let ids = plan.owner(g.side)?;
        // Directories between the side's disk directory and the file (if the
        // configuration names a deeper path) belong to the side too.
        let disk_dir = PathBuf::from(format!("/var/lib/airlock/{}/disk", g.side.name()));
        let mut missing = Vec::new();
        let mut p = g.dest.parent();
        while let Some(dir) = p {
            if dir == disk_dir || !dir.starts_with(&disk_dir) {
                break;
            }
            missing.push(dir.to_path_buf());
            p = dir.parent();
        }
        for dir in missing.iter().rev() {
            let dat = on_data(data_root, dir)?;
            if !dat.is_dir() {
                std::fs::create_dir(&dat).with_context(|| format!("creating {}", dir.display()))?;
            }
            set_meta(plan, &entries, &dat, dir, ids, 0o700, FileType::Dir)?;
        }
        let tmp = at.with_file_name(format!(
            ".{}.airlock-tmp",
            at.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        let sha = copy_sparse_verified(&g.source, &tmp, &format!("{} guest", g.side))?;
        let context = set_meta(
            plan,
            &entries,
            &tmp,
            &g.dest,
            ids,
            DISK_MODE,
            FileType::File,
        )?;
        std::fs::rename(&tmp, &at)
            .with_context(|| format!("renaming into {}", g.dest.display()))?;
        lines.push(format!(
            "{} (from {}, {}, {} MiB virtual, sha256 {sha}): uid {} gid {} {:04o} {context}",
            g.dest.display(),
            g.source.display(),
            g.image.format.name(),
            g.image.virtual_size >> 20,
            ids.0,
            ids.1,
            DISK_MODE
        ));
    }
    sync_dir(data_root)?;
    Ok(lines)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Copies `src` to a new file `dst`, leaving all-zero MiB blocks as holes,
/// syncs, reads `dst` back and compares sha256; returns it.
fn copy_sparse_verified(src: &Path, dst: &Path, what: &str) -> Result<String> {
    const BLOCK: usize = 1 << 20;
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let total = input.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_context(|| format!("creating {}", dst.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut pos = 0u64;
    let mut progress = Progress::new(&format!("copying {what}"), total);
    loop {
        let n = read_full(&mut input, &mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        if buf[..n].iter().any(|&b| b != 0) {
            out.seek(SeekFrom::Start(pos))
                .and_then(|_| out.write_all(&buf[..n]))
                .with_context(|| format!("writing {}", dst.display()))?;
        }
        pos += n as u64;
        progress.add(n as u64);
    }
    out.set_len(pos)
        .and_then(|()| out.sync_all())
        .with_context(|| format!("flushing {}", dst.display()))?;
    drop_cache(&out);
    progress.finish();
    let sha = hex::encode(hash.finalize());
    let mut back = Sha256::new();
    let mut f = File::open(dst).with_context(|| format!("reading back {}", dst.display()))?;
    drop_cache(&f);
    std::io::copy(&mut f, &mut back).with_context(|| format!("reading back {}", dst.display()))?;
    let back = hex::encode(back.finalize());
    if back != sha {
        bail!("{}: read back sha256 {back}, copied {sha}", dst.display());
    }
    Ok(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_arguments() {
        assert_eq!(
            parse_guest_arg("classified=/x/a.qcow2").unwrap(),
            (Side::Classified, PathBuf::from("/x/a.qcow2"))
        );
        assert_eq!(
            parse_guest_arg("general=b=c.raw").unwrap(),
            (Side::General, PathBuf::from("b=c.raw"))
        );
        assert!(parse_guest_arg("secret=a")
            .unwrap_err()
            .contains("classified"));
        assert!(parse_guest_arg("a.qcow2").is_err());
        assert!(parse_guest_arg("general=").is_err());
    }

    #[test]
    fn shape_of_the_inputs() {
        let g = |s| (s, PathBuf::from("x"));
        let m = Some(PathBuf::from("m.toml"));
        let k = Some(PathBuf::from("pc.key"));
        assert!(Inputs {
            guests: vec![g(Side::General), g(Side::General)],
            machine: m.clone(),
            wireguard_key: None
        }
        .check_shape()
        .is_err());
        assert!(Inputs {
            guests: vec![g(Side::General)],
            machine: None,
            wireguard_key: None
        }
        .check_shape()
        .unwrap_err()
        .to_string()
        .contains("--machine"));
        assert!(Inputs {
            guests: vec![g(Side::General), g(Side::Classified)],
            machine: m.clone(),
            wireguard_key: k.clone()
        }
        .check_shape()
        .is_ok());
        assert!(Inputs {
            guests: vec![],
            machine: m,
            wireguard_key: None
        }
        .check_shape()
        .is_ok());
        assert!(Inputs {
            guests: vec![],
            machine: None,
            wireguard_key: k
        }
        .check_shape()
        .unwrap_err()
        .to_string()
        .contains("--machine"));
    }

    #[test]
    fn qemu_img_info_decides_what_is_a_guest_image() {
        let f = Path::new("w.img");
        let ok = check_qemu_img_info(r#"{"format":"qcow2","virtual-size":21474836480,"format-specific":{"type":"qcow2","data":{"corrupt":false}}}"#, f).unwrap();
        assert_eq!(
            ok,
            GuestImage {
                format: DiskFormat::Qcow2,
                virtual_size: 21474836480
            }
        );
        assert_eq!(
            check_qemu_img_info(r#"{"format":"raw","virtual-size":1048576}"#, f)
                .unwrap()
                .format,
            DiskFormat::Raw
        );
        let refused = [
            (
                r#"{"format":"vmdk","virtual-size":1048576}"#,
                "a vmdk image",
            ),
            (
                r#"{"format":"qcow2","virtual-size":1048576,"backing-filename":"/base.qcow2"}"#,
                "backing file",
            ),
            (
                r#"{"format":"qcow2","virtual-size":1048576,"encrypted":true}"#,
                "encrypted",
            ),
            (
                r#"{"format":"qcow2","virtual-size":1048576,"format-specific":{"data":{"corrupt":true}}}"#,
                "corrupt",
            ),
            (r#"{"format":"raw","virtual-size":1000}"#, "no disk"),
            (r#"{"format":"raw","virtual-size":0}"#, "no disk"),
            ("not json", "parsing"),
        ];
        for (json, want) in refused {
            let e = check_qemu_img_info(json, f).unwrap_err().to_string();
            assert!(e.starts_with("w.img") && e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn passwd_lookup() {
        let p = "root:x:0:0:root:/root:/bin/bash\nairlock-classified:x:998:997::/var/lib/airlock/classified:/usr/sbin/nologin\nbroken:x\n";
        assert_eq!(passwd_ids(p, "airlock-classified"), Some((998, 997)));
        assert_eq!(passwd_ids(p, "airlock-general"), None);
        assert_eq!(passwd_ids(p, "broken"), None);
    }

    /// The modes and owners written at flash time are those systemd-tmpfiles
    /// gives the same directories at boot.
    #[test]
    fn directories_match_tmpfiles() {
        let tmpfiles = include_str!("../../../overlay/usr/lib/tmpfiles.d/airlockd.conf");
        for side in Side::ALL {
            for (template, mode, owner) in DIRS {
                let path = template.replace("{side}", side.name());
                let line = tmpfiles
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.len() >= 5 && f[0] == "d" && f[1] == path)
                    .unwrap_or_else(|| panic!("{path} not in tmpfiles.d"));
                assert_eq!(u32::from_str_radix(line[2], 8).unwrap(), *mode, "{path}");
                let user = match owner {
                    Owner::Root => "root".to_owned(),
                    Owner::Side => format!("airlock-{side}"),
                };
                assert_eq!((line[3], line[4]), (user.as_str(), user.as_str()), "{path}");
            }
        }
    }
}
