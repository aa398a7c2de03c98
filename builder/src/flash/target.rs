//! The flash target: what it is (a whole-disk block device or an image
//! file), how big, and the refusals that protect the host — the disk the
//! host runs from, and a target in use (a partition of it mounted, used as
//! swap, or held by a device-mapper or md device; for an image file, a loop
//! device over it).
//!
//! The decisions are pure functions of `/proc/self/mountinfo`, `/proc/swaps`
//! and a sysfs tree ([`Sysfs`] takes its root, so unit tests give it a fake
//! one); [`probe`] reads the real ones.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A refusal: one line, naming the target and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{target} does not exist: give a whole disk (/dev/sdX, /dev/nvmeXnY) or an existing image file (make one with `truncate -s 64G {target}`)")]
    Missing { target: String },
    #[error("{target} is neither a block device nor a regular file")]
    NotADisk { target: String },
    #[error("{target} is a partition ({name}); give the whole disk, /dev/{disk}")]
    Partition {
        target: String,
        name: String,
        disk: String,
    },
    #[error("{target} is the disk this host runs from (/ is on {via}); refusing to overwrite it")]
    HostDisk { target: String, via: String },
    #[error("{target} is in use: {what}; unmount or detach it first")]
    InUse { target: String, what: String },
    #[error("{target} is the image itself ({image}); give another disk or file")]
    SameAsImage { target: String, image: String },
    #[error("{target}: cannot tell whether it is in use: {why}; refusing")]
    CannotCheck { target: String, why: String },
    #[error("{target} is too small: {target_size} bytes ({target_mib} MiB), the image needs {image_size} bytes ({image_mib} MiB)")]
    TooSmall {
        target: String,
        target_size: u64,
        target_mib: u64,
        image_size: u64,
        image_mib: u64,
    },
}

impl Refusal {
    pub fn too_small(target: &Path, target_size: u64, image_size: u64) -> Refusal {
        Refusal::TooSmall {
            target: target.display().to_string(),
            target_size,
            target_mib: target_size >> 20,
            image_size,
            image_mib: image_size.div_ceil(1 << 20),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole-disk block device (its kernel name, e.g. `sdb`, `loop3`).
    Block,
    /// A regular file, taken as a disk of its current size.
    File,
}

/// A target that passed every check.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: (u32, u32),
    pub mount_point: String,
    pub source: String,
}

/// Parses `/proc/self/mountinfo` (octal escapes such as `\040` undone).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(dev), Some(mount_point), Some(source)) =
            (fields.get(2), fields.get(4), fields.get(sep + 2))
        else {
            continue;
        };
        let Some(dev) = parse_dev(dev) else { continue };
        mounts.push(Mount {
            dev,
            mount_point: unescape(mount_point),
            source: unescape(source),
        });
    }
    mounts
}

/// The device paths of `/proc/swaps`.
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(unescape)
        .collect()
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A sysfs tree (`/sys`, or a fake one in tests): block devices by kernel
/// name under `class/block/`, by number under `dev/block/MAJ:MIN`.
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    fn block(&self, name: &str) -> PathBuf {
        self.root.join("class/block").join(name)
    }

    /// The kernel name of block device `dev`, if sysfs knows it.
    pub fn name_of(&self, dev: (u32, u32)) -> Option<String> {
        let link =
            std::fs::read_link(self.root.join(format!("dev/block/{}:{}", dev.0, dev.1))).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn is_partition(&self, name: &str) -> bool {
        self.block(name).join("partition").exists()
    }

    /// The whole disk a device belongs to (itself unless a partition).
    pub fn disk_of(&self, name: &str) -> String {
        if self.is_partition(name) {
            if let Some(parent) = std::fs::canonicalize(self.block(name)).ok().and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            }) {
                return parent;
            }
        }
        name.to_owned()
    }

    /// The partitions of a whole disk.
    pub fn partitions(&self, disk: &str) -> Vec<String> {
        let Ok(dir) = std::fs::canonicalize(self.block(disk)) else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut parts: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join("partition").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        parts.sort();
        parts
    }

    fn related(&self, name: &str, dir: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.block(name).join(dir)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Everything built on top of `names` (device-mapper, md), transitively.
    pub fn holders_closure(&self, names: &[String]) -> BTreeSet<String> {
        self.closure(names, "holders")
    }

    /// Everything `names` is built from, transitively.
    pub fn slaves_closure(&self, names: &[String]) -> BTreeSet<String> {
        self.closure(names, "slaves")
    }

    fn closure(&self, names: &[String], dir: &str) -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = names.to_vec();
        while let Some(n) = todo.pop() {
            if seen.insert(n.clone()) {
                todo.extend(self.related(&n, dir));
            }
        }
        seen
    }

    /// Loop devices whose backing file is `file`.
    pub fn loops_backed_by(&self, file: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("class/block")) else {
            return Vec::new();
        };
        let mut loops = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if Path::new(backing.trim_end()) == file {
                loops.push(name);
            }
        }
        loops.sort();
        loops
    }
}

/// The whole disks the host's `/` lives on (through partitions,
/// device-mapper and md), and the volumes between, as kernel names.
pub fn host_disks(sysfs: &Sysfs, mounts: &[Mount]) -> BTreeSet<String> {
    let roots: Vec<String> = mounts
        .iter()
        .filter(|m| m.mount_point == "/")
        .filter_map(|m| sysfs.name_of(m.dev))
        .collect();
    sysfs
        .slaves_closure(&roots)
        .iter()
        .map(|n| sysfs.disk_of(n))
        .collect()
}

/// Why the devices `names` (a disk and its partitions, or the loop devices
/// over an image file) are in use, or `None`.
pub fn in_use(
    sysfs: &Sysfs,
    mounts: &[Mount],
    swaps: &[String],
    names: &[String],
) -> Option<String> {
    let all = sysfs.holders_closure(names);
    for m in mounts {
        let by_number = sysfs.name_of(m.dev).is_some_and(|n| all.contains(&n));
        let by_source = m
            .source
            .strip_prefix("/dev/")
            .is_some_and(|n| all.contains(n));
        if by_number || by_source {
            let name = sysfs.name_of(m.dev).unwrap_or_else(|| m.source.clone());
            return Some(format!(
                "/dev/{} is mounted on {}",
                name.trim_start_matches("/dev/"),
                m.mount_point
            ));
        }
    }
    for s in swaps {
        if s.strip_prefix("/dev/").is_some_and(|n| all.contains(n)) {
            return Some(format!("{s} is used as swap"));
        }
    }
    let given: BTreeSet<&String> = names.iter().collect();
    if let Some(holder) = all
        .iter()
        .find(|n| !given.contains(n) && !sysfs.is_partition(n))
    {
        return Some(format!("it is held by /dev/{holder} (device-mapper or md)"));
    }
    None
}

/// Kernel device number of `rdev` as (major, minor).
fn major_minor(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Checks `path` against the real system: exists, a whole disk or a file,
/// not the host's disk, not in use. The size check against the image is the
/// caller's ([`Refusal::too_small`]).
pub fn probe(path: &Path, image: &Path) -> Result<Target, Refusal> {
    let shown = path.display().to_string();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Err(Refusal::Missing { target: shown }),
    };
    if let Ok(im) = std::fs::metadata(image) {
        if (im.dev(), im.ino()) == (meta.dev(), meta.ino()) {
            return Err(Refusal::SameAsImage {
                target: shown,
                image: image.display().to_string(),
            });
        }
    }
    let cannot = |why: String| Refusal::CannotCheck {
        target: shown.clone(),
        why,
    };
    // Without these the checks would see nothing in use: refuse instead.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| cannot(format!("reading /proc/self/mountinfo: {e}")))?;
    let mounts = parse_mountinfo(&mountinfo);
    if mounts.is_empty() {
        return Err(cannot("/proc/self/mountinfo lists no mount".into()));
    }
    if !Path::new("/sys/class/block").is_dir() {
        return Err(cannot("/sys is not mounted (no /sys/class/block)".into()));
    }
    let sysfs = Sysfs::new("/sys");
    let swaps = match std::fs::read_to_string("/proc/swaps") {
        Ok(text) => parse_swaps(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(cannot(format!("reading /proc/swaps: {e}"))),
    };
    let (kind, names) = if meta.file_type().is_block_device() {
        let dev = major_minor(meta.rdev());
        let Some(name) = sysfs.name_of(dev) else {
            return Err(Refusal::NotADisk { target: shown });
        };
        let disk = sysfs.disk_of(&name);
        if disk != name {
            return Err(Refusal::Partition {
                target: shown,
                name,
                disk,
            });
        }
        if let (Ok(backing), Ok(image)) = (
            std::fs::read_to_string(sysfs.block(&name).join("loop/backing_file")),
            std::fs::canonicalize(image),
        ) {
            if Path::new(backing.trim_end()) == image {
                return Err(Refusal::SameAsImage {
                    target: shown,
                    image: image.display().to_string(),
                });
            }
        }
        if host_disks(&sysfs, &mounts).contains(&name) {
            let via = mounts
                .iter()
                .find(|m| m.mount_point == "/")
                .map(|m| m.source.clone())
                .unwrap_or_default();
            return Err(Refusal::HostDisk { target: shown, via });
        }
        let mut names = vec![name.clone()];
        names.extend(sysfs.partitions(&name));
        (Kind::Block, names)
    } else if meta.file_type().is_file() {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut names = Vec::new();
        for l in sysfs.loops_backed_by(&canonical) {
            names.extend(sysfs.partitions(&l));
            names.push(l);
        }
        (Kind::File, names)
    } else {
        return Err(Refusal::NotADisk { target: shown });
    };
    if let Some(what) = in_use(&sysfs, &mounts, &swaps, &names) {
        return Err(Refusal::InUse {
            target: shown,
            what,
        });
    }
    if kind == Kind::File && !names.is_empty() {
        let loops: Vec<String> = names
            .iter()
            .filter(|n| !sysfs.is_partition(n))
            .map(|n| format!("/dev/{n}"))
            .collect();
        return Err(Refusal::InUse {
            target: shown,
            what: format!("it is attached to {} (losetup -d)", loops.join(", ")),
        });
    }
    let size = match kind {
        Kind::File => meta.len(),
        Kind::Block => File::open(path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(|_| Refusal::NotADisk {
                target: shown.clone(),
            })?,
    };
    Ok(Target {
        path: path.to_path_buf(),
        kind,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
23 22 8:1 / /boot rw,relatime shared:2 - ext4 /dev/sda1 rw
24 22 0:21 / /proc rw - proc proc rw
30 22 8:17 / /media/usb\\040stick rw,relatime shared:9 - vfat /dev/sdb1 rw
";

    #[test]
    fn mountinfo_lines_give_device_mount_point_and_source() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[0],
            Mount {
                dev: (253, 0),
                mount_point: "/".into(),
                source: "/dev/mapper/vg-root".into()
            }
        );
        assert_eq!(m[3].mount_point, "/media/usb stick");
        assert_eq!(
            parse_swaps("Filename Type Size Used Priority\n/dev/sdc2 partition 100 0 -2\n"),
            ["/dev/sdc2"]
        );
        assert!(parse_mountinfo("garbage\n\n1 2 x:y / / - a b c").is_empty());
    }

    /// A fake sysfs: disks `sda` (sda1, sda2), `sdb` (sdb1), `sdc` (sdc1,
    /// sdc2), `sdd` (sdd1), `loop3` over /images/pc.raw (loop3p1), and
    /// `dm-0` built on sda2 (the host's root volume) and `dm-1` on sdd1
    /// (open, not mounted).
    fn fake_sysfs() -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut number = 0;
        let mut add = |path: &str, partition: bool| {
            let devdir = root.join("devices").join(path);
            std::fs::create_dir_all(devdir.join("holders")).unwrap();
            std::fs::create_dir_all(devdir.join("slaves")).unwrap();
            let name = Path::new(path)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let major = if name.starts_with("dm") {
                253
            } else if name.starts_with("loop") {
                7
            } else {
                8
            };
            number += 1;
            std::fs::write(devdir.join("dev"), format!("{major}:{number}\n")).unwrap();
            if partition {
                std::fs::write(devdir.join("partition"), "1\n").unwrap();
            }
            std::fs::create_dir_all(root.join("class/block")).unwrap();
            std::fs::create_dir_all(root.join("dev/block")).unwrap();
            symlink(&devdir, root.join("class/block").join(&name)).unwrap();
            symlink(&devdir, root.join(format!("dev/block/{major}:{number}"))).unwrap();
            (major, number)
        };
        for (p, part) in [
            ("sda", false),
            ("sda/sda1", true),
            ("sda/sda2", true),
            ("sdb", false),
            ("sdb/sdb1", true),
            ("sdc", false),
            ("sdc/sdc1", true),
            ("sdc/sdc2", true),
            ("sdd", false),
            ("sdd/sdd1", true),
            ("loop3", false),
            ("loop3/loop3p1", true),
            ("dm-0", false),
            ("dm-1", false),
        ] {
            add(p, part);
        }
        let link = |from: &str, dir: &str, to: &str| {
            symlink(
                root.join("class/block").join(to),
                root.join("class/block").join(from).join(dir).join(to),
            )
            .unwrap();
        };
        link("sda2", "holders", "dm-0");
        link("dm-0", "slaves", "sda2");
        link("sdd1", "holders", "dm-1");
        link("dm-1", "slaves", "sdd1");
        std::fs::create_dir_all(root.join("devices/loop3/loop")).unwrap();
        std::fs::write(
            root.join("devices/loop3/loop/backing_file"),
            "/images/pc.raw\n",
        )
        .unwrap();
        let sysfs = Sysfs::new(root);
        (dir, sysfs)
    }

    fn dev(sysfs: &Sysfs, name: &str) -> (u32, u32) {
        parse_dev(&std::fs::read_to_string(sysfs.block(name).join("dev")).unwrap()).unwrap()
    }

    #[test]
    fn the_host_disk_is_found_through_device_mapper() {
        let (_d, sysfs) = fake_sysfs();
        let mounts = vec![Mount {
            dev: dev(&sysfs, "dm-0"),
            mount_point: "/".into(),
            source: "/dev/mapper/vg-root".into(),
        }];
        // The volume itself counts too: flashing /dev/dm-0 would destroy the host as surely.
        assert_eq!(
            host_disks(&sysfs, &mounts).into_iter().collect::<Vec<_>>(),
            ["dm-0", "sda"]
        );
        // A root directly on a partition, and on a whole disk.
        let on_part = vec![Mount {
            dev: dev(&sysfs, "sdc2"),
            mount_point: "/".into(),
            source: "/dev/sdc2".into(),
        }];
        assert_eq!(
            host_disks(&sysfs, &on_part).into_iter().collect::<Vec<_>>(),
            ["sdc"]
        );
        let whole = vec![Mount {
            dev: dev(&sysfs, "sdb"),
            mount_point: "/".into(),
            source: "/dev/sdb".into(),
        }];
        assert_eq!(
            host_disks(&sysfs, &whole).into_iter().collect::<Vec<_>>(),
            ["sdb"]
        );
        // A root the sysfs does not know (overlay, tmpfs: a live system) names no disk.
        assert!(host_disks(
            &sysfs,
            &[Mount {
                dev: (0, 30),
                mount_point: "/".into(),
                source: "overlay".into()
            }]
        )
        .is_empty());
    }

    #[test]
    fn partitions_and_disks() {
        let (_d, sysfs) = fake_sysfs();
        assert_eq!(sysfs.disk_of("sdc2"), "sdc");
        assert_eq!(sysfs.disk_of("sdc"), "sdc");
        assert_eq!(sysfs.partitions("sdc"), ["sdc1", "sdc2"]);
        assert_eq!(
            sysfs.loops_backed_by(Path::new("/images/pc.raw")),
            ["loop3"]
        );
        assert!(sysfs
            .loops_backed_by(Path::new("/images/other.raw"))
            .is_empty());
    }

    #[test]
    fn in_use_names_the_mount_the_swap_or_the_holder() {
        let (_d, sysfs) = fake_sysfs();
        let mounts = vec![
            Mount {
                dev: dev(&sysfs, "dm-0"),
                mount_point: "/".into(),
                source: "/dev/mapper/vg-root".into(),
            },
            Mount {
                dev: dev(&sysfs, "sdb1"),
                mount_point: "/media/usb".into(),
                source: "/dev/sdb1".into(),
            },
            Mount {
                dev: dev(&sysfs, "loop3p1"),
                mount_point: "/mnt/x".into(),
                source: "/dev/loop3p1".into(),
            },
        ];
        let names = |d: &str| {
            let mut v = vec![d.to_owned()];
            v.extend(sysfs.partitions(d));
            v
        };
        assert_eq!(
            in_use(&sysfs, &mounts, &[], &names("sdb")).unwrap(),
            "/dev/sdb1 is mounted on /media/usb"
        );
        assert_eq!(
            in_use(&sysfs, &mounts, &[], &names("sda")).unwrap(),
            "/dev/dm-0 is mounted on /"
        );
        assert_eq!(
            in_use(&sysfs, &mounts, &[], &names("loop3")).unwrap(),
            "/dev/loop3p1 is mounted on /mnt/x"
        );
        assert_eq!(
            in_use(&sysfs, &mounts, &["/dev/sdc2".into()], &names("sdc")).unwrap(),
            "/dev/sdc2 is used as swap"
        );
        assert_eq!(
            in_use(&sysfs, &mounts, &[], &names("sdd")).unwrap(),
            "it is held by /dev/dm-1 (device-mapper or md)"
        );
        assert_eq!(in_use(&sysfs, &mounts, &[], &names("sdc")), None);
    }

    #[test]
    fn device_numbers_split_like_the_kernel() {
        assert_eq!(major_minor(0x0811), (8, 17));
        assert_eq!(major_minor((259u64 << 8) | 3), (259, 3));
    }
}
