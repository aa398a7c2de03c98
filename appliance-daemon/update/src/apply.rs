//! `airlock-update apply`: every check first, then the writes in an order
//! that keeps the old slot bootable at every instant.
//!
//! Checks (nothing written to a slot or the ESP until all pass):
//! 1. the bundle's header: framing, limits, signatures and threshold
//!    against the trust file on the read-only root, manifest;
//! 2. the running system: same image and compatible string, newer version,
//!    security epoch not below the stored one (nor the running image's),
//!    each artifact fits its slot partition, room for the UKI on the ESP;
//! 3. the running boot is blessed (otherwise the inactive slot is the
//!    fallback that systemd-boot needs if the running one fails);
//! 4. the whole payload: every artifact's size and SHA-256, end of file.
//!
//! Writes, and why a power cut after any of them still boots the old slot
//! (the booted entry on the ESP is blessed, so systemd-boot boots it unless
//! a newer entry with tries left exists, and only step 6 creates one):
//! 1. remove the ESP entries of the inactive slot's old version and of the
//!    bundle's version (leftovers of an interrupted try), and stale
//!    temporary files: from now on no entry points at the inactive slot;
//! 2. label the inactive partitions `_empty`: the GPT no longer claims
//!    they hold an image (status shows the truth after a cut);
//! 3. stream the payload once more: root and verity into the inactive
//!    partitions, the UKI into the staging directory on `/var`, each
//!    hashed again on the way (the file may have changed since check 4);
//!    flush; drop the cached pages and re-read both partitions, hashing;
//!    a cut here leaves half-written partitions that nothing refers to;
//! 4. set the inactive partitions' PARTUUIDs to the halves of the new root
//!    hash: only a UKI with that `roothash=` will look for them, and none
//!    is installed yet;
//! 5. label them `root_<name>_<version>` / `verity_<name>_<version>`;
//! 6. last, install the UKI as `EFI/Linux/<name>_<version>+3.efi` (copy to
//!    a name systemd-boot ignores, flush, re-read and hash, rename, flush
//!    the directory). A cut before the rename leaves an ignored temporary
//!    file; after it, the new entry boots with three tries and
//!    systemd-boot falls back to the old, blessed entry if they run out.
//!
//! A retry after any cut redoes every step from the start.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use airlock_bundle::{
    check_policy, ArtifactKind, Manifest, RunningSystem, Trust, VerifiedManifest,
};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::esp::{Blessing, Esp};
use crate::refusal::{Failure, Refused};
use crate::slots::{self, Disk, Extent, Slot, EMPTY_LABEL};
use crate::source::{self, HttpOptions, Source};
use crate::system::{self, Image, LastResult};

/// Test hooks that make a step fail as a power cut or a crash would stop it.
#[derive(Debug, Clone, Default)]
pub struct FailPoints {
    /// Stop writing the slot after this many payload bytes (an I/O error).
    pub stop_slot_write_after: Option<u64>,
    /// Stop after the slot is written and labelled, before the UKI is installed.
    pub stop_before_uki: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    pub http: HttpOptions,
    pub fail: FailPoints,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: String,
    pub slot: char,
    pub entry: String,
    pub signers: Vec<String>,
}

/// Everything the checks found out, for the write phase.
struct Plan {
    bundle: PathBuf,
    verified: VerifiedManifest,
    disk: Disk,
    booted: Slot,
    inactive: Slot,
    esp: Esp,
}

/// Reads the trust file and threshold.
pub fn load_trust(cfg: &Config) -> Result<Trust> {
    let text = std::fs::read_to_string(&cfg.allowed_signers)
        .with_context(|| format!("reading the trusted keys {}", cfg.allowed_signers.display()))?;
    let keys = airlock_bundle::parse_allowed_signers(&text)
        .with_context(|| format!("trusted keys {}", cfg.allowed_signers.display()))?;
    Trust::new(keys, cfg.threshold).with_context(|| {
        format!(
            "trusted keys {} with threshold {}",
            cfg.allowed_signers.display(),
            cfg.threshold
        )
    })
}

/// The disk holding the slots: configured, or the booted root's disk.
pub fn open_disk(cfg: &Config, root_hash: &str) -> Result<Disk> {
    let path = match &cfg.disk {
        Some(p) => p.clone(),
        None => slots::discover_disk(&cfg.by_partuuid, root_hash)?,
    };
    Disk::open(&path, &cfg.sfdisk)
}

/// Takes the bundle from its source: a path to read (local file, dropped
/// file or finished download) and, for a dropped file, that file again.
pub fn fetch(
    cfg: &Config,
    src: &Source,
    http: &HttpOptions,
    log: &mut dyn FnMut(String),
) -> Result<(PathBuf, Option<PathBuf>)> {
    match src {
        Source::File(p) => Ok((p.clone(), None)),
        Source::DropDir(dir) => match source::newest_in_drop_dir(dir)? {
            Some(p) => Ok((p.clone(), Some(p))),
            None => Err(Refused::NothingDropped(dir.clone()).into()),
        },
        Source::Stick(disk) => Ok((
            source::stage_from_stick(disk, &cfg.staging_dir, &load_trust(cfg)?, log)?,
            None,
        )),
        Source::Url(url) => {
            let p = source::download(url, &cfg.staging_dir, http, log)
                .map_err(|e| e.context(Failure::Source))?;
            Ok((p, None))
        }
    }
}

/// Before downloading from `url`: the bundle the server offers, verified
/// from its header. `Some(why)` when there is nothing to download or write:
/// it is the running image, or its entry is on the ESP already, waiting
/// for the next start or marked bad by a failed health gate on this PC (a
/// periodic check does not retry a version that failed here: IT publishes
/// a newer one); `None` when it is worth downloading. A refusal or an
/// unreachable server is recorded, as an apply's would be, so that IT's
/// info page shows it.
pub fn check_server(
    cfg: &Config,
    url: &str,
    http: &HttpOptions,
    log: &mut dyn FnMut(String),
) -> Result<Option<String>> {
    // Held while this may record a result: one writer of the state at a time.
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let _lock = lock(&cfg.state_dir.join("lock"))?;
    let trust = load_trust(cfg)?;
    let booted = system::load_root_hash(&cfg.cmdline)?;
    match source::offered_at(url, &trust, http) {
        Ok(v) => {
            let m = &v.manifest;
            log(format!(
                "{url}: offers {} {} signed by {}",
                m.name,
                m.version,
                v.signers.join(", ")
            ));
            let stem = format!("{}_{}", m.name, m.version);
            if m.root_hash == booted {
                return Ok(Some(format!(
                    "offers {} {}, which is running already",
                    m.name, m.version
                )));
            }
            let installed = Esp::open(&cfg.esp).and_then(|esp| esp.entries_for(&stem))?;
            let pending = installed.iter().find_map(|e| match e.blessing() {
                Blessing::Trying { .. } => Some(format!(
                    "offers {} {}, which is installed already ({}) and starts at the next power-on",
                    m.name, m.version, e.file
                )),
                Blessing::Bad { done } => Some(format!(
                    "offers {} {}, which failed its health gate on this PC ({}, {done} tries): not installed again; publish a newer version",
                    m.name, m.version, e.file
                )),
                Blessing::Good => None,
            });
            if pending.is_some() {
                return Ok(pending);
            }
            // An older or foreign bundle is refused from its header too
            // (the slot sizes are checked once the bundle is here).
            let image = system::load_os_release(&cfg.os_release)?;
            let state = system::load_state(&cfg.state_file())?;
            if let Err(e) = check_against_running(m, &image, &state, None) {
                record(cfg, url, &e, log);
                return Err(e);
            }
            Ok(None)
        }
        Err(e) => {
            let e = if crate::refusal::refused(&e).is_some() {
                e
            } else {
                e.context(Failure::Source)
            };
            record(cfg, url, &e, log);
            Err(e)
        }
    }
}

/// Records a refusal or failure of `what` as the last result.
fn record(cfg: &Config, what: &str, e: &anyhow::Error, log: &mut dyn FnMut(String)) {
    let result = if crate::refusal::refused(e).is_some() {
        "refused"
    } else {
        "failed"
    };
    if let Err(w) = system::record_outcome(
        cfg,
        LastResult::now("apply", result, format!("{what}: {e:#}")),
    ) {
        log(format!("warning: recording the result: {w:#}"));
    }
}

/// The bundle's manifest against the running image: the same image, a
/// compatible, newer version at a security epoch not below the stored one
/// and, when the inactive slot is known, artifacts that fit it.
fn check_against_running(
    m: &Manifest,
    image: &Image,
    state: &system::State,
    inactive: Option<&Slot>,
) -> Result<()> {
    if m.name != image.name {
        return Err(Refused::WrongImage {
            bundle: m.name.clone(),
            running: image.name.clone(),
        }
        .into());
    }
    let running = RunningSystem {
        compatible: image.compatible.clone(),
        version: image.version.clone(),
        stored_epoch: state.security_epoch.max(image.security_epoch),
        root_slot_bytes: inactive.map(|s| s.root.size),
        verity_slot_bytes: inactive.map(|s| s.verity.size),
    };
    check_policy(m, &running).map_err(Refused::from)?;
    Ok(())
}

/// `apply`: fetch, check, write; records the outcome in the state file.
/// A dropped bundle is renamed `*.applied` or `*.refused` afterwards.
pub fn apply(
    cfg: &Config,
    src: &Source,
    opts: &ApplyOptions,
    log: &mut dyn FnMut(String),
) -> Result<Applied> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let _lock = lock(&cfg.state_dir.join("lock"))?;
    let (path, dropped) = match fetch(cfg, src, &opts.http, log) {
        Ok(fetched) => fetched,
        // A download that did not complete is IT's business too (the
        // other sources' failures are on the spot: a stick, a file).
        Err(e) => {
            if let Source::Url(url) = src {
                record(cfg, url, &e, log);
            }
            return Err(e);
        }
    };
    let result = check_and_write(cfg, &path, opts, log);
    match &result {
        Ok(a) => {
            let last = LastResult::now(
                "apply",
                "applied",
                format!(
                    "{} written to slot {} ({}), reboot pending",
                    a.version, a.slot, a.entry
                ),
            );
            if let Err(e) = system::record_outcome(cfg, last) {
                log(format!("warning: recording the result: {e:#}"));
            }
        }
        Err(e) => record(cfg, &path.display().to_string(), e, log),
    }
    let refused = result
        .as_ref()
        .err()
        .is_some_and(|e| crate::refusal::refused(e).is_some());
    if let Some(d) = dropped {
        if result.is_ok() || refused {
            if let Err(e) = source::retire_dropped(&d, if refused { "refused" } else { "applied" })
            {
                log(format!("warning: {e:#}"));
            }
        }
    }
    // A download is fetched anew by the next run (the server's file may
    // change), a stick is read again when plugged in again: the staged
    // copy only takes room on /var.
    if let Source::Url(_) | Source::Stick(_) = src {
        let _ = std::fs::remove_file(&path);
    }
    result
}

fn check_and_write(
    cfg: &Config,
    bundle: &Path,
    opts: &ApplyOptions,
    log: &mut dyn FnMut(String),
) -> Result<Applied> {
    let plan = check(cfg, bundle, log)?;
    write(cfg, &plan, &opts.fail, log)
}

/// Every check; returns what the writes need. Writes nothing.
fn check(cfg: &Config, bundle: &Path, log: &mut dyn FnMut(String)) -> Result<Plan> {
    let trust = load_trust(cfg)?;
    let image = system::load_os_release(&cfg.os_release)?;
    let root_hash = system::load_root_hash(&cfg.cmdline)?;
    let state = system::load_state(&cfg.state_file())?;
    let disk = open_disk(cfg, &root_hash)?;
    let all = slots::slots(&disk.table()?)
        .with_context(|| format!("slots on {}", disk.path.display()))?;
    let (booted, inactive) = slots::booted_and_inactive(&all, &root_hash)?;
    let esp = Esp::open(&cfg.esp)?;

    // 1. Header, signatures, manifest.
    let mut r = open_bundle(bundle)?;
    let verified = airlock_bundle::open(&mut r, &trust).map_err(bundle_error)?;
    let m = &verified.manifest;
    log(format!(
        "{}: {} {} signed by {}",
        bundle.display(),
        m.name,
        m.version,
        verified.signers.join(", ")
    ));

    // 2. The running system.
    check_against_running(m, &image, &state, Some(&inactive))?;
    if m.root_hash == root_hash {
        return Err(Refused::SameRoot.into());
    }
    let uki_size = m.artifact(ArtifactKind::Uki).map(|a| a.size).unwrap_or(0);
    let free = esp_free_bytes(&esp.dir)?;
    // Room for the new UKI, less what step 1 of the writes frees.
    let freed: u64 = match inactive.stem() {
        Some(stem) if Some(stem) != booted.stem() => esp
            .entries_for(stem)?
            .iter()
            .map(|e| {
                std::fs::metadata(esp.dir.join(&e.file))
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .sum(),
        _ => 0,
    };
    let need = uki_size + (1 << 20);
    if free + freed < need {
        return Err(Refused::NoRoom {
            free: free + freed,
            need,
        }
        .into());
    }

    // 3. The running boot is blessed.
    let running_stem = stem_of(&image);
    for e in esp.entries_for(&running_stem)? {
        if matches!(e.blessing(), Blessing::Trying { .. } | Blessing::Bad { .. }) {
            return Err(Refused::NotBlessed { entry: e.file }.into());
        }
    }

    // 4. The whole payload.
    airlock_bundle::read_payload(&mut r, m, &mut |_, _| Ok(()), &mut |_| {})
        .map_err(bundle_error)?;
    log(format!(
        "{}: payload verified; writing slot {} (partitions {} and {} of {})",
        bundle.display(),
        inactive.name,
        inactive.root.number,
        inactive.verity.number,
        disk.path.display()
    ));
    Ok(Plan {
        bundle: bundle.to_path_buf(),
        verified,
        disk,
        booted,
        inactive,
        esp,
    })
}

fn write(
    cfg: &Config,
    plan: &Plan,
    fail: &FailPoints,
    log: &mut dyn FnMut(String),
) -> Result<Applied> {
    let m = &plan.verified.manifest;
    let stem = format!("{}_{}", m.name, m.version);
    let Plan {
        disk,
        inactive,
        esp,
        ..
    } = plan;
    // Opened first (block devices exclusively): a partition in use stops
    // the update before anything changes.
    let root_extent = disk.extent(&inactive.root);
    let verity_extent = disk.extent(&inactive.verity);
    let root_file = open_extent(&root_extent)?;
    let verity_file = open_extent(&verity_extent)?;

    // 1. No entry points at the inactive slot any more.
    let mut stale = vec![stem.clone()];
    stale.extend(
        inactive
            .stem()
            .filter(|s| Some(*s) != plan.booted.stem())
            .map(str::to_owned),
    );
    for s in &stale {
        for file in esp.remove_stem(s)? {
            log(format!("removed ESP entry {file}"));
        }
    }

    // 2. The GPT no longer claims the inactive slot holds an image.
    for part in [&inactive.root, &inactive.verity] {
        if part.label != EMPTY_LABEL {
            disk.set_label(part.number, EMPTY_LABEL)?;
        }
    }

    // 3. Payload into the partitions (and the UKI to staging), then read back.
    std::fs::create_dir_all(&cfg.staging_dir)
        .with_context(|| format!("creating {}", cfg.staging_dir.display()))?;
    let staged_uki = cfg.staging_dir.join(format!("{stem}.efi.staged"));
    {
        let mut r = open_bundle(&plan.bundle)?;
        let again = airlock_bundle::open(&mut r, &load_trust(cfg)?).map_err(bundle_error)?;
        if again.manifest_bytes != plan.verified.manifest_bytes {
            anyhow::bail!(
                "{} changed while it was being installed",
                plan.bundle.display()
            );
        }
        let uki_file = File::create(&staged_uki)
            .with_context(|| format!("creating {}", staged_uki.display()))?;
        let mut written = [0u64; 3];
        let mut total = 0u64;
        let mut sink = |kind: ArtifactKind, bytes: &[u8]| -> std::io::Result<()> {
            if let Some(limit) = fail.stop_slot_write_after {
                if total + bytes.len() as u64 > limit {
                    return Err(std::io::Error::other(format!(
                        "fail point: slot write stopped after {total} bytes"
                    )));
                }
            }
            let (file, base, i) = match kind {
                ArtifactKind::Root => (&root_file, root_extent.offset, 0),
                ArtifactKind::Verity => (&verity_file, verity_extent.offset, 1),
                ArtifactKind::Uki => (&uki_file, 0, 2),
            };
            file.write_all_at(bytes, base + written[i])?;
            written[i] += bytes.len() as u64;
            total += bytes.len() as u64;
            Ok(())
        };
        airlock_bundle::read_payload(&mut r, m, &mut sink, &mut |_| {}).map_err(bundle_error)?;
        for (f, what) in [
            (&root_file, "root partition"),
            (&verity_file, "verity partition"),
            (&uki_file, "staged UKI"),
        ] {
            f.sync_all()
                .with_context(|| format!("flushing the {what}"))?;
        }
    }
    drop((root_file, verity_file));
    for (kind, extent, what) in [
        (ArtifactKind::Root, &root_extent, "root"),
        (ArtifactKind::Verity, &verity_extent, "verity"),
    ] {
        let a = m
            .artifact(kind)
            .context("validated manifest has every artifact")?;
        let actual = read_back(extent, a.size)?;
        if actual != a.sha256 {
            return Err(Failure::ReadBack {
                what: format!("slot {} {what} partition", inactive.name),
                expected: a.sha256.clone(),
                actual,
            }
            .into());
        }
    }
    log(format!("slot {} written and read back", inactive.name));

    // 4., 5. The GPT names the new image.
    let (root_uuid, verity_uuid) = slots::uuids_from_root_hash(&m.root_hash)?;
    disk.set_uuid(inactive.root.number, &root_uuid)?;
    disk.set_uuid(inactive.verity.number, &verity_uuid)?;
    disk.set_label(inactive.root.number, &format!("root_{stem}"))?;
    disk.set_label(inactive.verity.number, &format!("verity_{stem}"))?;
    if fail.stop_before_uki {
        anyhow::bail!("fail point: stopped before installing the UKI");
    }

    // 6. Last: the boot entry.
    let uki = m
        .artifact(ArtifactKind::Uki)
        .context("validated manifest has every artifact")?;
    let entry = esp.install(&staged_uki, &stem, cfg.tries, &uki.sha256)?;
    let _ = std::fs::remove_file(&staged_uki);
    log(format!("installed {} on the ESP: reboot pending", entry));
    Ok(Applied {
        version: m.version.to_string(),
        slot: inactive.name,
        entry,
        signers: plan.verified.signers.clone(),
    })
}

/// A bundle refusal as an error: reading or writing failed (`Io`) is a
/// failure, not a verdict on the bundle; everything else is a refusal.
pub(crate) fn bundle_error(r: airlock_bundle::Refusal) -> anyhow::Error {
    match r {
        airlock_bundle::Refusal::Io { during, error } => anyhow::Error::new(error).context(during),
        other => Refused::from(other).into(),
    }
}

fn stem_of(image: &Image) -> String {
    format!("{}_{}", image.name, image.version)
}

fn open_bundle(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).with_context(|| format!("opening the bundle {}", path.display()))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

fn open_extent(e: &Extent) -> Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).read(true);
    if e.exclusive {
        // A block device opened O_EXCL fails while mounted or in use.
        o.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
    }
    o.open(&e.path)
        .with_context(|| format!("opening {} for writing", e.path.display()))
}

/// Drops the cached pages of an extent and hashes its first `len` bytes
/// as they are on the medium.
fn read_back(e: &Extent, len: u64) -> Result<String> {
    let mut f = File::open(&e.path).with_context(|| format!("opening {}", e.path.display()))?;
    let _ = rustix::fs::fadvise(
        &f,
        e.offset,
        NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
    f.seek(SeekFrom::Start(e.offset))
        .with_context(|| format!("seeking in {}", e.path.display()))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut (&mut f).take(len), &mut h)
        .with_context(|| format!("reading back {}", e.path.display()))?;
    if n != len {
        anyhow::bail!("{} ends after {n} of {len} bytes", e.path.display());
    }
    Ok(hex::encode(h.finalize()))
}

fn esp_free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("free space on {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// An exclusive lock on `path`, held while the guard lives.
fn lock(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| Failure::Busy(path.to_path_buf()))?;
    Ok(f)
}

/// The manifest of a bundle after the header checks (for `check`).
pub fn verify_only(cfg: &Config, bundle: &Path) -> Result<Manifest> {
    let trust = load_trust(cfg)?;
    let mut r = open_bundle(bundle)?;
    let v = airlock_bundle::verify(&mut r, &trust).map_err(bundle_error)?;
    Ok(v.manifest)
}
