//! The A/B slots on the GPT (the builder's layout, `builder/src/disk.rs`):
//! ESP · root A · verity A · root B · verity B · data. A slot is a root
//! partition and the verity partition after it (the n-th root-type with the
//! n-th verity-type partition). The root and verity PARTUUIDs are the first
//! and last 128 bits of the slot's dm-verity root hash, which is how the
//! initrd finds them from `roothash=` alone; a slot's label is
//! `root_<name>_<version>` / `verity_<name>_<version>`, or `_empty`.
//!
//! The booted slot is the one whose PARTUUIDs are the halves of the
//! `roothash=` on the running kernel's command line (not a partition
//! number or label, which an interrupted update may leave in any state:
//! the root hash is what the kernel actually verifies against). The other
//! slot is the inactive one.
//!
//! The table is read with `sfdisk --json` and edited with `sfdisk
//! --part-uuid/--part-label` (one field per call); the data goes to the
//! partition's node when the disk is a block device, or to the partition's
//! byte range when the disk is a plain image file (tests, images on disk).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Discoverable Partitions Specification type UUIDs (x86-64), as the builder writes them.
pub const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
/// Label of a slot that holds nothing bootable.
pub const EMPTY_LABEL: &str = "_empty";

/// One GPT entry, as `sfdisk --json` prints it (UUIDs lower-cased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    /// Device node (`/dev/vda4`) or, for an image file, sfdisk's made-up name.
    pub node: PathBuf,
    /// Byte offset and length on the disk.
    pub offset: u64,
    pub size: u64,
    pub type_uuid: String,
    pub uuid: String,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub partitions: Vec<Part>,
}

#[derive(Deserialize)]
struct SfdiskOut {
    partitiontable: SfdiskTable,
}

#[derive(Deserialize)]
struct SfdiskTable {
    label: String,
    #[serde(default = "default_sector")]
    sectorsize: u64,
    #[serde(default)]
    partitions: Vec<SfdiskPart>,
}

fn default_sector() -> u64 {
    512
}

#[derive(Deserialize)]
struct SfdiskPart {
    node: String,
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    type_uuid: String,
    uuid: Option<String>,
    name: Option<String>,
}

/// Parses `sfdisk --json` output (pure). Partition numbers come from the
/// node names' trailing digits, as sfdisk numbers them.
pub fn parse_sfdisk_json(text: &str) -> Result<Table> {
    let out: SfdiskOut =
        serde_json::from_str(text).context("sfdisk --json output is not what sfdisk prints")?;
    let t = out.partitiontable;
    if t.label != "gpt" {
        bail!("the disk has a {} partition table, not GPT", t.label);
    }
    let mut partitions = Vec::new();
    for p in t.partitions {
        let digits: String = p
            .node
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let number = digits
            .parse()
            .with_context(|| format!("partition node {:?} does not end in its number", p.node))?;
        let (offset, size) = match (
            p.start.checked_mul(t.sectorsize),
            p.size.checked_mul(t.sectorsize),
        ) {
            (Some(o), Some(s)) => (o, s),
            _ => bail!("partition {} has an impossible extent", p.node),
        };
        partitions.push(Part {
            number,
            node: PathBuf::from(p.node),
            offset,
            size,
            type_uuid: p.type_uuid.to_ascii_lowercase(),
            uuid: p.uuid.unwrap_or_default().to_ascii_lowercase(),
            label: p.name.unwrap_or_default(),
        });
    }
    Ok(Table { partitions })
}

/// A root partition and its verity partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// `A`, `B`, … in partition order.
    pub name: char,
    pub root: Part,
    pub verity: Part,
}

impl Slot {
    /// `<name>_<version>` from the root label, `None` for `_empty` or a
    /// label the builder would not write.
    pub fn stem(&self) -> Option<&str> {
        let stem = self.root.label.strip_prefix("root_")?;
        (self.verity.label.strip_prefix("verity_") == Some(stem)).then_some(stem)
    }

    /// Whether this slot's PARTUUIDs are the halves of `root_hash`.
    pub fn holds(&self, root_hash: &str) -> bool {
        match uuids_from_root_hash(root_hash) {
            Ok((r, v)) => self.root.uuid == r && self.verity.uuid == v,
            Err(_) => false,
        }
    }
}

/// The slots of a table: exactly two root and two verity partitions, each
/// root before its verity partition.
pub fn slots(table: &Table) -> Result<Vec<Slot>> {
    let of = |t: &str| {
        table
            .partitions
            .iter()
            .filter(|p| p.type_uuid == t)
            .cloned()
            .collect::<Vec<_>>()
    };
    let (roots, verities) = (of(ROOT_TYPE), of(VERITY_TYPE));
    if roots.len() != 2 || verities.len() != 2 {
        bail!(
            "expected 2 root and 2 verity partitions (slots A and B), found {} and {}",
            roots.len(),
            verities.len()
        );
    }
    roots
        .into_iter()
        .zip(verities)
        .zip(['A', 'B'])
        .map(|((root, verity), name)| {
            if verity.number < root.number {
                bail!(
                    "slot {name}: verity partition {} comes before its root partition {}",
                    verity.number,
                    root.number
                );
            }
            Ok(Slot { name, root, verity })
        })
        .collect()
}

/// Booted and inactive slot, decided by the running root hash (pure).
pub fn booted_and_inactive(slots: &[Slot], root_hash: &str) -> Result<(Slot, Slot)> {
    let booted: Vec<&Slot> = slots.iter().filter(|s| s.holds(root_hash)).collect();
    match booted.as_slice() {
        [b] => {
            let inactive = slots.iter().find(|s| s.name != b.name).context("a second slot")?;
            Ok(((*b).clone(), inactive.clone()))
        }
        [] => bail!("no slot has the PARTUUIDs of the running roothash={root_hash}: this system was not booted from this disk's slots"),
        _ => bail!("both slots carry the PARTUUIDs of roothash={root_hash}"),
    }
}

/// PARTUUIDs for a root hash: its first and last 128 bits (lower case).
pub fn uuids_from_root_hash(root_hash: &str) -> Result<(String, String)> {
    let (root, verity) = airlock_bundle::slot_partition_uuids(root_hash)
        .with_context(|| format!("root hash {root_hash:?} is not 64 hex digits"))?;
    Ok((
        uuid::Uuid::from_bytes(root).to_string(),
        uuid::Uuid::from_bytes(verity).to_string(),
    ))
}

/// The disk that holds the slots, and how to reach it.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// Block device (write through partition nodes) or image file (write at offsets).
    pub is_block: bool,
    sfdisk: PathBuf,
}

/// Where one partition's bytes are: a file and a byte range in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// Open with `O_EXCL` (block devices: refuses a partition in use).
    pub exclusive: bool,
}

impl Disk {
    pub fn open(path: &Path, sfdisk: &Path) -> Result<Disk> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path).with_context(|| format!("disk {}", path.display()))?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            bail!(
                "disk {} is neither a block device nor a disk image file",
                path.display()
            );
        }
        Ok(Disk {
            path: path.to_path_buf(),
            is_block,
            sfdisk: sfdisk.to_path_buf(),
        })
    }

    /// Reads the partition table.
    pub fn table(&self) -> Result<Table> {
        let out = self.sfdisk(
            &[std::ffi::OsStr::new("--json"), self.path.as_os_str()],
            "reading the partition table",
        )?;
        parse_sfdisk_json(&out)
            .with_context(|| format!("partition table of {}", self.path.display()))
    }

    /// The bytes of a partition.
    pub fn extent(&self, part: &Part) -> Extent {
        if self.is_block {
            Extent {
                path: part.node.clone(),
                offset: 0,
                len: part.size,
                exclusive: true,
            }
        } else {
            Extent {
                path: self.path.clone(),
                offset: part.offset,
                len: part.size,
                exclusive: false,
            }
        }
    }

    /// Sets a partition's GPT name (label).
    pub fn set_label(&self, number: u32, label: &str) -> Result<()> {
        let n = number.to_string();
        let args = ["--no-reread", "--no-tell-kernel", "--part-label"].map(std::ffi::OsStr::new);
        let all = [
            &args[..],
            &[self.path.as_os_str(), n.as_ref(), label.as_ref()],
        ]
        .concat();
        self.sfdisk(
            &all,
            &format!("setting the label of partition {number} to {label:?}"),
        )
        .map(drop)
    }

    /// Sets a partition's PARTUUID.
    pub fn set_uuid(&self, number: u32, uuid: &str) -> Result<()> {
        let n = number.to_string();
        let args = ["--no-reread", "--no-tell-kernel", "--part-uuid"].map(std::ffi::OsStr::new);
        let all = [
            &args[..],
            &[self.path.as_os_str(), n.as_ref(), uuid.as_ref()],
        ]
        .concat();
        self.sfdisk(
            &all,
            &format!("setting the PARTUUID of partition {number} to {uuid}"),
        )
        .map(drop)
    }

    fn sfdisk(&self, args: &[&std::ffi::OsStr], what: &str) -> Result<String> {
        let out = Command::new(&self.sfdisk)
            .args(args)
            .env("LC_ALL", "C")
            .output()
            .with_context(|| format!("{what}: running {}", self.sfdisk.display()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "{what}: sfdisk {} exited {}: {}",
                self.path.display(),
                out.status,
                tail.join(" / ")
            );
        }
        String::from_utf8(out.stdout).with_context(|| format!("{what}: sfdisk printed non-UTF-8"))
    }
}

/// The disk of the booted root: `/dev/disk/by-partuuid/<root uuid>` is a
/// partition node; its parent in sysfs is the disk.
pub fn discover_disk(by_partuuid: &Path, root_hash: &str) -> Result<PathBuf> {
    let (root_uuid, _) = uuids_from_root_hash(root_hash)?;
    let link = by_partuuid.join(&root_uuid);
    let node = std::fs::canonicalize(&link)
        .with_context(|| format!("finding the booted root partition {}", link.display()))?;
    let name = node.file_name().context("partition node has a name")?;
    let sys = Path::new("/sys/class/block").join(name);
    let sys =
        std::fs::canonicalize(&sys).with_context(|| format!("resolving {}", sys.display()))?;
    let disk = sys
        .parent()
        .and_then(|p| p.file_name())
        .with_context(|| format!("{} has no parent disk", sys.display()))?;
    Ok(Path::new("/dev").join(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_A: &str = "ab6752906f1cec1c66a19bdb64dd57739eb6502906e443c127fd080532e96c66";

    pub(crate) fn sample_json() -> String {
        let part = |n: u32, start: u64, t: &str, uuid: &str, name: &str| {
            format!(
                r#"{{"node":"/dev/vda{n}","start":{start},"size":2048,"type":"{}","uuid":"{}","name":"{name}"}}"#,
                t.to_uppercase(),
                uuid.to_uppercase()
            )
        };
        let parts = [
            part(
                1,
                2048,
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                "11111111-1111-4111-8111-111111111111",
                "esp",
            ),
            part(
                2,
                4096,
                ROOT_TYPE,
                "ab675290-6f1c-ec1c-66a1-9bdb64dd5773",
                "root_airlock_1.0",
            ),
            part(
                3,
                6144,
                VERITY_TYPE,
                "9eb65029-06e4-43c1-27fd-080532e96c66",
                "verity_airlock_1.0",
            ),
            part(
                4,
                8192,
                ROOT_TYPE,
                "22222222-2222-4222-8222-222222222222",
                "_empty",
            ),
            part(
                5,
                10240,
                VERITY_TYPE,
                "33333333-3333-4333-8333-333333333333",
                "_empty",
            ),
            part(
                6,
                12288,
                "4D21B016-B534-45C2-A9FB-5C16E091FD2D",
                "44444444-4444-4444-8444-444444444444",
                "data",
            ),
        ];
        format!(
            r#"{{"partitiontable":{{"label":"gpt","sectorsize":512,"partitions":[{}]}}}}"#,
            parts.join(",")
        )
    }

    #[test]
    fn sfdisk_json_is_parsed_with_byte_extents() {
        let t = parse_sfdisk_json(&sample_json()).unwrap();
        assert_eq!(t.partitions.len(), 6);
        let p = &t.partitions[3];
        assert_eq!(
            (p.number, p.offset, p.size, p.label.as_str()),
            (4, 8192 * 512, 2048 * 512, "_empty")
        );
        assert_eq!(p.type_uuid, ROOT_TYPE);
        assert!(
            parse_sfdisk_json(r#"{"partitiontable":{"label":"dos","partitions":[]}}"#).is_err()
        );
    }

    #[test]
    fn booted_slot_is_the_one_holding_the_running_root_hash() {
        let s = slots(&parse_sfdisk_json(&sample_json()).unwrap()).unwrap();
        let (booted, inactive) = booted_and_inactive(&s, HASH_A).unwrap();
        assert_eq!(
            (booted.name, booted.root.number, booted.verity.number),
            ('A', 2, 3)
        );
        assert_eq!(
            (inactive.name, inactive.root.number, inactive.verity.number),
            ('B', 4, 5)
        );
        assert_eq!(booted.stem(), Some("airlock_1.0"));
        assert_eq!(inactive.stem(), None);
        let e = booted_and_inactive(&s, &"00".repeat(32)).unwrap_err();
        assert!(e.to_string().contains("no slot"), "{e}");
    }

    #[test]
    fn a_disk_without_two_slots_is_refused() {
        let mut t = parse_sfdisk_json(&sample_json()).unwrap();
        t.partitions.remove(4);
        assert!(slots(&t)
            .unwrap_err()
            .to_string()
            .contains("2 root and 2 verity"));
    }

    #[test]
    fn root_hash_halves_are_the_partuuids() {
        let (r, v) = uuids_from_root_hash(HASH_A).unwrap();
        assert_eq!(r, "ab675290-6f1c-ec1c-66a1-9bdb64dd5773");
        assert_eq!(v, "9eb65029-06e4-43c1-27fd-080532e96c66");
    }
}
