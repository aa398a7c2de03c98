//! `airlock flash IMAGE TARGET`: write a built image onto a disk (or an
//! image file), check it, fit it to the disk, and provision the machine.
//!
//! In order, and nothing is written to TARGET before step 4:
//!
//! 1. the image's partition table (`sfdisk --json`): ESP, root A, slot B
//!    labelled `_empty`, the data partition last;
//! 2. the target ([`target::probe`]): not the host's disk, not in use, not
//!    smaller than the image — refusals without override;
//! 3. provisioning inputs, if any ([`provision::validate`]): guest images by
//!    content (`qemu-img info`), the machine file by `airlockd`'s own
//!    configuration code against the image's shipped configuration, the
//!    image's users; and whether the guest disks fit the data partition
//!    once grown to the target;
//! 4. the image is written ([`copy::write_image`]), synced, read back and
//!    its sha256 compared;
//! 5. on a larger target: the backup GPT moved to the disk's end
//!    (`sfdisk --relocate gpt-bak-std`) and the data partition grown to the
//!    end of the disk (`sfdisk -N`) — at flash time rather than leaving it
//!    to systemd-repart on first boot, because the guest disks (tens of
//!    GiB) must land on it now;
//! 6. `/var` staged in plain text **on this host** ([`stage_var`]): the
//!    image's data filesystem copied into a sparse file, checked and fitted
//!    to the partition less the LUKS2 header (`e2fsck -f`, `resize2fs`),
//!    then provisioned ([`provision::apply`]): files written with the
//!    run-time contract's owners, modes and SELinux labels;
//! 7. the data partition made a LUKS2 container with a fresh volume key,
//!    the staged filesystem written into it encrypted, read back
//!    ([`luks`]); the recovery key printed (or written to
//!    `--recovery-key-out`), never stored on the PC. The PC's first boot
//!    replaces the one-time empty passphrase by its TPM.
//!
//! Slot B is never touched: it stays `_empty` (checked after the write).
//!
//! Given an update bundle instead of an image, `airlock flash` makes an
//! *update stick*: the bundle written raw from the target's first byte
//! (same target refusals, write, sync and read-back), which a PC's update
//! agent applies when the stick is plugged in (no filesystem: the PC
//! mounts nothing).

pub mod copy;
pub mod luks;
pub mod provision;
pub mod selabel;
pub mod target;
pub mod wgkey;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::cmd;

use crate::disk::{labels, types};
use crate::exec::Runner;
pub use provision::Side;

const MIB: u64 = 1 << 20;
/// What the data partition can never use on a grown disk: the backup GPT
/// (33 sectors) and alignment to 1 MiB.
const TAIL_RESERVE: u64 = MIB;

/// What `airlock flash` was asked to do.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    pub target: PathBuf,
    /// `--guest SIDE=FILE`, at most one per side.
    pub guests: Vec<(Side, PathBuf)>,
    /// `--machine FILE`: the provisioning layer of the appliance configuration.
    pub machine: Option<PathBuf>,
    /// `--wireguard-key FILE`: the PC's own tunnel key, if the image uses one.
    pub wireguard_key: Option<PathBuf>,
    /// `--recovery-key-out FILE`: where the recovery key goes (a new file,
    /// 0600) instead of standard output.
    pub recovery_key_out: Option<PathBuf>,
    pub verbose: bool,
}

/// What was done, for the summary and for tests.
#[derive(Debug, Clone)]
pub struct FlashReport {
    pub image_sha256: String,
    pub target_size: u64,
    /// The data partition's size after the flash.
    pub data_size: u64,
    /// One line per provisioned file.
    pub provisioned: Vec<String>,
    /// For an update stick: the bundle's name and version, as its manifest
    /// says (unverified here: every PC verifies before it writes a byte).
    pub stick: Option<String>,
    /// For a disk: the data partition's LUKS2 recovery key (none for a stick).
    pub recovery_key: Option<String>,
}

/// The target, checked ([`target::probe`]) and at least `size` bytes.
fn probe_fitting(path: &Path, source: &Path, size: u64) -> Result<target::Target> {
    let target = target::probe(path, source)?;
    if target.size < size {
        return Err(target::Refusal::too_small(&target.path, target.size, size).into());
    }
    Ok(target)
}

/// Writes `source` (`what`: image or bundle) onto the target, syncs, reads
/// it back from the device and compares; its sha256.
fn write_verified(source: &Path, size: u64, target: &target::Target, what: &str) -> Result<String> {
    let sha256 = copy::write_image(source, size, target)?;
    let back = copy::read_back(&target.path, size)?;
    if back != sha256 {
        bail!("{}: read-back sha256 {back} differs from the {what}'s {sha256}: the disk did not store what was written", target.path.display());
    }
    println!(
        "airlock: read back {} MiB, sha256 {sha256} matches the {what}",
        size.div_ceil(MIB)
    );
    Ok(sha256)
}

/// Whether `file` starts with an update bundle's magic.
pub fn is_bundle(file: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(f.read_exact(&mut magic).is_ok() && magic == airlock_bundle::format::MAGIC)
}

/// `airlock flash BUNDLE TARGET`: the update stick.
fn flash_stick(opts: &FlashOptions, bundle_size: u64) -> Result<FlashReport> {
    let bundle = &opts.image;
    if !opts.guests.is_empty()
        || opts.machine.is_some()
        || opts.wireguard_key.is_some()
        || opts.recovery_key_out.is_some()
    {
        bail!("{} is an update bundle: it makes an update stick, which provisions nothing (--guest, --machine, --wireguard-key and --recovery-key-out are for disk images)", bundle.display());
    }
    let header = airlock_bundle::format::RawHeader::read(&mut std::io::BufReader::new(
        std::fs::File::open(bundle)?,
    ))
    .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let manifest = airlock_bundle::Manifest::from_json(&header.manifest)
        .map_err(|e| anyhow::anyhow!("{}: {}", bundle.display(), e.0))?;
    if header.signatures.is_empty() {
        bail!(
            "{} is not signed: every PC would refuse it (sign it first: airlock sign --key KEY {})",
            bundle.display(),
            bundle.display()
        );
    }
    let target = probe_fitting(&opts.target, bundle, bundle_size)?;
    println!(
        "airlock: writing update stick {} ({} {}, {} signature(s), {} MiB) onto {} ({} MiB)",
        bundle.display(),
        manifest.name,
        manifest.version.as_str(),
        header.signatures.len(),
        bundle_size.div_ceil(MIB),
        target.path.display(),
        target.size / MIB
    );
    let sha256 = write_verified(bundle, bundle_size, &target, "bundle")?;
    let stick = format!("{} {}", manifest.name, manifest.version.as_str());
    Ok(FlashReport {
        image_sha256: sha256,
        target_size: target.size,
        data_size: 0,
        provisioned: Vec::new(),
        stick: Some(stick),
        recovery_key: None,
    })
}

/// One partition of a GPT as `sfdisk --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePartition {
    pub number: u32,
    pub label: String,
    pub type_uuid: String,
    pub start: u64,
    pub size: u64,
}

/// A partition table: its partitions (bytes) and the last usable sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub partitions: Vec<TablePartition>,
    pub last_lba: u64,
}

/// Parses `sfdisk --json` output (pure).
pub fn parse_sfdisk_json(json: &str) -> Result<Table> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing sfdisk --json")?;
    let t = &v["partitiontable"];
    if t["label"].as_str() != Some("gpt") {
        bail!("not a GPT disk (label {})", t["label"]);
    }
    let sector = t["sectorsize"].as_u64().unwrap_or(512);
    let mut partitions = Vec::new();
    for p in t["partitions"].as_array().context("no partitions")? {
        let node = p["node"].as_str().unwrap_or("");
        let number = node
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<String>();
        let number: String = number.chars().rev().collect();
        partitions.push(TablePartition {
            number: number
                .parse()
                .with_context(|| format!("partition node {node:?} has no number"))?,
            label: p["name"].as_str().unwrap_or("").to_owned(),
            type_uuid: p["type"].as_str().unwrap_or("").to_lowercase(),
            start: p["start"].as_u64().context("partition without start")? * sector,
            size: p["size"].as_u64().context("partition without size")? * sector,
        });
    }
    Ok(Table {
        partitions,
        last_lba: t["lastlba"].as_u64().unwrap_or(0),
    })
}

/// The partitions of an airlock image flash relies on.
#[derive(Debug, Clone)]
pub struct ImageLayout {
    pub root: TablePartition,
    pub data: TablePartition,
}

/// Checks a table is an airlock image's: one root slot in use, slot B
/// `_empty` (root and verity), the data partition last (pure).
pub fn image_layout(table: &Table) -> Result<ImageLayout> {
    let roots: Vec<&TablePartition> = table
        .partitions
        .iter()
        .filter(|p| p.type_uuid == types::ROOT_X86_64)
        .collect();
    let used: Vec<&&TablePartition> = roots.iter().filter(|p| p.label != labels::EMPTY).collect();
    let [root] = used.as_slice() else {
        bail!(
            "expected one root partition in use and slot B labelled {:?}, found {} in use",
            labels::EMPTY,
            used.len()
        )
    };
    let empty = table
        .partitions
        .iter()
        .filter(|p| p.label == labels::EMPTY)
        .count();
    if empty != 2 {
        bail!(
            "expected slot B (root and verity) labelled {:?}, found {empty} such partitions",
            labels::EMPTY
        );
    }
    let data = table
        .partitions
        .iter()
        .find(|p| p.type_uuid == types::VAR && p.label == labels::DATA)
        .with_context(|| format!("no data partition (type var, label {:?})", labels::DATA))?;
    let last = table
        .partitions
        .iter()
        .max_by_key(|p| p.start + p.size)
        .context("no partitions")?;
    if last.number != data.number {
        bail!("the data partition is not the last one on the disk; it could not grow");
    }
    Ok(ImageLayout {
        root: (**root).clone(),
        data: data.clone(),
    })
}

fn read_table(runner: &Runner, path: &Path) -> Result<Table> {
    let sh = runner.sh();
    let json = runner.run(
        "reading the partition table",
        cmd!(sh, "sfdisk --json {path}"),
    )?;
    parse_sfdisk_json(&json).with_context(|| format!("{}", path.display()))
}

/// A loop device over a byte range of a file or disk; detached on close.
pub struct Loop<'r> {
    runner: &'r Runner,
    pub device: PathBuf,
    attached: bool,
}

impl<'r> Loop<'r> {
    pub fn attach(
        runner: &'r Runner,
        backing: &Path,
        offset: u64,
        size: u64,
        read_only: bool,
    ) -> Result<Loop<'r>> {
        let sh = runner.sh();
        let (offset, size) = (offset.to_string(), size.to_string());
        let ro: &[&str] = if read_only { &["--read-only"] } else { &[] };
        let out = runner.run(
            &format!("attaching a loop device to {}", backing.display()),
            cmd!(
                sh,
                "losetup --find --show {ro...} --offset {offset} --sizelimit {size} {backing}"
            ),
        )?;
        Ok(Loop {
            runner,
            device: PathBuf::from(out.trim()),
            attached: true,
        })
    }

    pub fn close(mut self) -> Result<()> {
        self.attached = false;
        let sh = self.runner.sh();
        let dev = &self.device;
        self.runner
            .run("detaching the loop device", cmd!(sh, "losetup -d {dev}"))?;
        // The kernel detaches at the last close (udev may still probe it):
        // wait, so the next command (or flash) does not see it attached.
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
        for _ in 0..100 {
            if !backing.exists() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!(
            "airlock: warning: {} still attached 5 s after `losetup -d`",
            dev.display()
        );
        Ok(())
    }
}

impl Drop for Loop<'_> {
    fn drop(&mut self) {
        if self.attached {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.device)
                .status();
        }
    }
}

/// A mounted filesystem in a temporary directory; unmounted on close.
pub struct Mounted<'r> {
    runner: &'r Runner,
    dir: tempfile::TempDir,
    mounted: bool,
}

impl<'r> Mounted<'r> {
    pub fn mount(
        runner: &'r Runner,
        device: &Path,
        fstype: &str,
        options: &str,
    ) -> Result<Mounted<'r>> {
        let dir = tempfile::Builder::new()
            .prefix("airlock-flash-")
            .tempdir()
            .context("creating a mount point")?;
        let sh = runner.sh();
        let at = dir.path();
        runner.run(
            &format!("mounting {} ({fstype})", device.display()),
            cmd!(sh, "mount -t {fstype} -o {options} {device} {at}"),
        )?;
        Ok(Mounted {
            runner,
            dir,
            mounted: true,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn close(mut self) -> Result<()> {
        self.mounted = false;
        let sh = self.runner.sh();
        let at = self.dir.path();
        self.runner
            .run("unmounting", cmd!(sh, "umount {at}"))
            .map(drop)
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Bytes in use on the image's data filesystem (mounted read-only,
/// without replaying a journal).
fn data_used_bytes(runner: &Runner, image: &Path, data: &TablePartition) -> Result<u64> {
    let data_loop = Loop::attach(runner, image, data.start, data.size, true)?;
    let mounted = Mounted::mount(runner, &data_loop.device, "ext4", "ro,noload")?;
    let stat = rustix::fs::statvfs(mounted.path())
        .with_context(|| format!("statvfs of {}'s data partition", image.display()));
    mounted.close()?;
    data_loop.close()?;
    let stat = stat?;
    Ok(stat.f_blocks.saturating_sub(stat.f_bfree) * stat.f_frsize)
}

/// `/var` in plain text in a sparse file on this host, removed when dropped.
pub struct StagedVar {
    _dir: tempfile::TempDir,
    pub file: PathBuf,
    /// The filesystem's size: the data partition less the LUKS2 header.
    pub size: u64,
}

/// Copies the image's data filesystem into a staging file (in `$TMPDIR`,
/// holes kept), checks it and fits it to a data partition of
/// `partition_size` bytes less the LUKS2 header.
pub fn stage_var(
    runner: &Runner,
    image: &Path,
    data: &TablePartition,
    partition_size: u64,
) -> Result<StagedVar> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let size = partition_size
        .checked_sub(luks::DATA_OFFSET)
        .map(|s| s / luks::SECTOR * luks::SECTOR)
        .filter(|&s| s >= 16 * MIB)
        .with_context(|| {
            format!(
                "the data partition ({} MiB) is too small for /var and its LUKS2 header",
                partition_size / MIB
            )
        })?;
    let dir = tempfile::Builder::new()
        .prefix("airlock-flash-var-")
        .tempdir()
        .context("creating the staging directory for /var (set TMPDIR to a disk with room)")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    let free = rustix::fs::statvfs(dir.path())
        .map(|s| s.f_bavail * s.f_frsize)
        .unwrap_or(u64::MAX);
    println!(
        "airlock: staging /var in plain text in {} (this host only; removed afterwards; {} MiB free there)",
        dir.path().display(),
        free / MIB
    );
    let file = dir.path().join("var.ext4");
    let mut input = std::fs::File::open(image)?;
    let mut out = std::fs::File::create(&file)?;
    input.seek(SeekFrom::Start(data.start))?;
    let mut left = data.size;
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0u64;
    while left > 0 {
        let n = left.min(MIB) as usize;
        input
            .read_exact(&mut buf[..n])
            .with_context(|| format!("reading the data partition of {}", image.display()))?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.seek(SeekFrom::Start(pos))?;
            out.write_all(&buf[..n]).with_context(|| {
                format!(
                    "writing {} (is {} full?)",
                    file.display(),
                    dir.path().display()
                )
            })?;
        }
        pos += n as u64;
        left -= n as u64;
    }
    out.set_len(size.max(data.size))?;
    out.sync_all()?;
    drop(out);
    let var_loop = Loop::attach(runner, &file, 0, size.max(data.size), false)?;
    let dev = &var_loop.device;
    let sh = runner.sh();
    runner.run(
        "checking the data filesystem (e2fsck)",
        cmd!(sh, "e2fsck -f -p {dev}"),
    )?;
    let kib = format!("{}K", size / 1024);
    runner.run(
        "fitting the data filesystem to the partition (resize2fs)",
        cmd!(sh, "resize2fs {dev} {kib}"),
    )?;
    var_loop.close()?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)?
        .set_len(size)?;
    Ok(StagedVar {
        _dir: dir,
        file,
        size,
    })
}

/// Makes the target's data partition a LUKS2 container with a fresh volume
/// key and writes the staged `/var` into it, encrypted. Returns the recovery key.
fn seal_var(
    runner: &Runner,
    target: &target::Target,
    data: &TablePartition,
    staging: &StagedVar,
) -> Result<String> {
    let ranges = luks::filesystem_used_ranges(runner, &staging.file)?;
    let key = luks::VolumeKey::random()?;
    let recovery_key = luks::random_recovery_key()?;
    let data_loop = Loop::attach(runner, &target.path, data.start, data.size, false)?;
    let segment = luks::format(runner, &data_loop.device, &key, &recovery_key);
    data_loop.close()?;
    let segment = segment?;
    let mut out = copy::open_for_write(target)?;
    luks::write_encrypted(
        &staging.file,
        &ranges,
        &luks::SegmentCipher::new(&key, segment.iv_tweak),
        &mut out,
        &target.path,
        data.start + segment.offset,
    )?;
    println!(
        "airlock: /var is LUKS2 ({}), {} MiB; sealed to this PC's TPM at its first boot",
        luks::CIPHER,
        staging.size / MIB
    );
    Ok(recovery_key)
}

/// Flashes (and provisions) as `opts` says.
pub fn flash(opts: &FlashOptions) -> Result<FlashReport> {
    let runner = Runner::new(opts.verbose)?;
    let image = &opts.image;
    let image_meta =
        std::fs::metadata(image).with_context(|| format!("reading {}", image.display()))?;
    if !image_meta.is_file() {
        bail!("{} is not an image file", image.display());
    }
    let image_size = image_meta.len();
    if is_bundle(image)? {
        return flash_stick(opts, image_size);
    }
    let layout = image_layout(&read_table(&runner, image)?)
        .with_context(|| format!("{} is not an airlock image", image.display()))?;

    // 2. The target.
    let target = probe_fitting(&opts.target, image, image_size)?;
    println!(
        "airlock: flashing {} ({} MiB) onto {} ({}, {} MiB)",
        image.display(),
        image_size.div_ceil(MIB),
        target.path.display(),
        match target.kind {
            target::Kind::Block => "block device",
            target::Kind::File => "image file",
        },
        target.size / MIB
    );
    let grown_data_size = (target.size.saturating_sub(TAIL_RESERVE) / MIB * MIB)
        .saturating_sub(layout.data.start)
        .max(layout.data.size);

    // 3. Provisioning inputs, all checked before anything is written.
    let plan = if opts.guests.is_empty() && opts.machine.is_none() && opts.wireguard_key.is_none() {
        None
    } else {
        let inputs = provision::Inputs {
            guests: opts.guests.clone(),
            machine: opts.machine.clone(),
            wireguard_key: opts.wireguard_key.clone(),
        };
        inputs.check_shape()?;
        let root_loop = Loop::attach(&runner, image, layout.root.start, layout.root.size, true)?;
        let root = Mounted::mount(&runner, &root_loop.device, "erofs", "ro")?;
        let plan = provision::validate(&runner, root.path(), &inputs);
        root.close()?;
        root_loop.close()?;
        let plan = plan?;
        let used = data_used_bytes(&runner, image, &layout.data)?;
        let needed = used + plan.bytes_needed() + luks::DATA_OFFSET;
        if needed > grown_data_size {
            bail!(
                "{}: no room for the provisioned files: they need {} MiB on the data partition (with the {} MiB the image uses there), which can grow to {} MiB on this target; use a larger disk",
                target.path.display(),
                needed.div_ceil(MIB),
                used.div_ceil(MIB),
                grown_data_size / MIB
            );
        }
        // /var is staged on this host first: the guest disks land there
        // before they are encrypted onto the target.
        let staging_dir = std::env::temp_dir();
        let free = rustix::fs::statvfs(&staging_dir)
            .map(|s| s.f_bavail * s.f_frsize)
            .with_context(|| format!("statvfs of {}", staging_dir.display()))?;
        let staged = used + plan.bytes_needed();
        if staged > free {
            bail!(
                "{}: no room to stage /var on this host: it needs {} MiB there (the provisioned files and what the image keeps on /var), {} MiB are free; set TMPDIR to a directory on a disk with room",
                staging_dir.display(),
                staged.div_ceil(MIB),
                free / MIB
            );
        }
        Some(plan)
    };

    // Nothing may be written before every refusal: the recovery key's file too.
    if let Some(out) = &opts.recovery_key_out {
        if out.exists() {
            bail!(
                "--recovery-key-out {}: the file exists; a recovery key is never written over another",
                out.display()
            );
        }
    }

    // 4. Write, sync, read back.
    let image_sha256 = write_verified(image, image_size, &target, "image")?;

    // 5. Fit the disk.
    let sh = runner.sh();
    let tpath = &target.path;
    if target.size > image_size {
        // `sfdisk -N` below would also write the backup header at the end
        // when it saves the table; relocating first says so explicitly and
        // spares it the "backup GPT not at the end" warnings.
        runner.run(
            "moving the backup GPT to the end of the disk",
            cmd!(sh, "sfdisk --relocate gpt-bak-std {tpath}"),
        )?;
        let number = layout.data.number.to_string();
        // An explicit size, a whole number of MiB, not `+` (every sector up
        // to the last usable one): systemd-repart at first boot rounds each
        // partition up to its 4 KiB grain, and on a partition of an odd
        // number of sectors that ends at the last usable sector it finds no
        // room for its own rounding and fails the unit (seen in QEMU).
        let size = format!(", {}\n", grown_data_size / 512);
        runner.run(
            "growing the data partition to the end of the disk",
            cmd!(
                sh,
                "sfdisk --quiet --no-reread --no-tell-kernel -N {number} {tpath}"
            )
            .stdin(size),
        )?;
        println!(
            "airlock: data partition grown to {} MiB (backup GPT at the end of the disk)",
            grown_data_size / MIB
        );
    }
    let table = read_table(&runner, tpath)?;
    image_layout(&table).with_context(|| format!("{} after flashing", tpath.display()))?;
    runner.run(
        "checking the partition table (sfdisk --verify)",
        cmd!(sh, "sfdisk --verify {tpath}"),
    )?;
    let data = table
        .partitions
        .iter()
        .find(|p| p.number == layout.data.number)
        .context("the data partition vanished")?
        .clone();

    // 6. /var in plain text, on this host only, and provisioned.
    let staging = stage_var(&runner, image, &layout.data, data.size)?;
    let mut provisioned = Vec::new();
    if let Some(plan) = plan {
        let var_loop = Loop::attach(&runner, &staging.file, 0, staging.size, false)?;
        let mounted = Mounted::mount(&runner, &var_loop.device, "ext4", "nodev,nosuid,noexec")?;
        let applied = provision::apply(&plan, mounted.path());
        mounted.close()?;
        var_loop.close()?;
        provisioned = applied?;
    }

    // 7. The LUKS2 container, and /var written into it encrypted.
    let recovery_key = seal_var(&runner, &target, &data, &staging)?;
    drop(staging);
    match &opts.recovery_key_out {
        Some(out) => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .and_then(|mut f| f.write_all(format!("{recovery_key}\n").as_bytes()))
                .with_context(|| format!("writing the recovery key to {}", out.display()))?;
            println!(
                "airlock: recovery key for /var written to {} (keep it with IT, away from the PC)",
                out.display()
            );
        }
        None => println!(
            "airlock: RECOVERY KEY for /var on {} (write it down and keep it with IT; it is not stored on the PC):\n\n    {recovery_key}\n",
            tpath.display()
        ),
    }
    if target.kind == target::Kind::Block {
        // The kernel learns the new table; failing that, the next boot reads it.
        if let Err(e) = runner.run(
            "re-reading the partition table",
            cmd!(sh, "blockdev --rereadpt {tpath}"),
        ) {
            eprintln!("airlock: warning: {e:#}");
        }
    }
    Ok(FlashReport {
        image_sha256,
        target_size: target.size,
        data_size: data.size,
        provisioned,
        stick: None,
        recovery_key: Some(recovery_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"partitiontable": {"label": "gpt", "id": "X", "device": "/tmp/a.raw", "unit": "sectors",
      "firstlba": 2048, "lastlba": 53214, "sectorsize": 512, "partitions": [
        {"node": "/tmp/a.raw1", "start": 2048, "size": 2048, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "uuid": "A", "name": "esp"},
        {"node": "/tmp/a.raw2", "start": 4096, "size": 4096, "type": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "uuid": "B", "name": "root_airlock_1.0"},
        {"node": "/tmp/a.raw3", "start": 8192, "size": 2048, "type": "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5", "uuid": "C", "name": "verity_airlock_1.0"},
        {"node": "/tmp/a.raw4", "start": 10240, "size": 4096, "type": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "uuid": "D", "name": "_empty"},
        {"node": "/tmp/a.raw5", "start": 14336, "size": 2048, "type": "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5", "uuid": "E", "name": "_empty"},
        {"node": "/tmp/a.raw6", "start": 16384, "size": 32768, "type": "4D21B016-B534-45C2-A9FB-5C16E091FD2D", "uuid": "F", "name": "data"}]}}"#;

    #[test]
    fn an_airlock_table_gives_root_and_data() {
        let t = parse_sfdisk_json(JSON).unwrap();
        assert_eq!(t.partitions.len(), 6);
        let l = image_layout(&t).unwrap();
        assert_eq!(
            (l.root.number, l.root.start, l.root.size),
            (2, 4096 * 512, 4096 * 512)
        );
        assert_eq!((l.data.number, l.data.start), (6, 16384 * 512));
    }

    #[test]
    fn tables_flash_cannot_rely_on_are_refused() {
        let filled = JSON.replacen("\"_empty\"", "\"root_airlock_1.1\"", 1);
        assert!(image_layout(&parse_sfdisk_json(&filled).unwrap())
            .unwrap_err()
            .to_string()
            .contains("one root partition in use"));
        let no_data = JSON.replace("\"data\"", "\"home\"");
        assert!(image_layout(&parse_sfdisk_json(&no_data).unwrap())
            .unwrap_err()
            .to_string()
            .contains("no data partition"));
        assert!(parse_sfdisk_json(&JSON.replace("\"gpt\"", "\"dos\"")).is_err());
        let nvme = JSON.replace("/tmp/a.raw6", "/dev/nvme0n1p6");
        assert_eq!(parse_sfdisk_json(&nvme).unwrap().partitions[5].number, 6);
    }
}
