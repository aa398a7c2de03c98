//! Stage *disk*: the GPT layout (pure) and its assembly into one raw file.
//!
//! Layout, per the Discoverable Partitions Specification:
//! ESP · root A · root-verity A · root B · root-verity B · data (`/var`).
//! Slot B is reserved for updates and labelled `_empty` (the convention of
//! systemd-sysupdate, which systemd-dissect skips). Root and verity
//! PARTUUIDs are the first and last 128 bits of the root hash, so
//! `roothash=` alone lets systemd find both. Every other UUID derives from
//! the image name and version, so the same inputs give the same disk.
//!
//! No loop devices and no mounts: `sfdisk` writes the table into a plain
//! file and each partition's filesystem image is copied to its offset.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use xshell::cmd;

use crate::exec::Runner;
use crate::manifest::Manifest;

/// Discoverable Partitions Specification type UUIDs (x86-64), as printed by
/// `systemd-id128 show esp root-x86-64 root-x86-64-verity var`.
pub mod types {
    pub const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
    pub const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
    pub const ROOT_X86_64_VERITY: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
    pub const VAR: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";
}

/// Partition labels. The data partition is found by label (`/etc/fstab`).
pub mod labels {
    pub const ESP: &str = "esp";
    pub const DATA: &str = "data";
    /// An unused slot (systemd-sysupdate's convention).
    pub const EMPTY: &str = "_empty";
    pub fn root(stem: &str) -> String {
        format!("root_{stem}")
    }
    pub fn verity(stem: &str) -> String {
        format!("verity_{stem}")
    }
}

const MIB: u64 = 1024 * 1024;
/// Partitions start at 1 MiB, and the backup GPT needs 33 sectors at the end.
const FIRST_OFFSET: u64 = MIB;
const TAIL_RESERVE: u64 = MIB;

/// One partition of the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub number: u32,
    pub label: String,
    pub type_uuid: String,
    pub uuid: String,
    pub offset: u64,
    pub size: u64,
}

/// The whole disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub disk_uuid: String,
    pub size: u64,
    pub partitions: Vec<Partition>,
}

/// A UUID derived from the image identity and a purpose (stable across builds).
pub fn derived_uuid(manifest: &Manifest, purpose: &str) -> Uuid {
    let digest = Sha256::digest(format!(
        "airlock:{}:{}:{purpose}",
        manifest.name, manifest.version
    ));
    uuid_from_bytes(&digest[..16])
}

/// UUID from 16 bytes, marked as a version 4 (random-looking) UUID like
/// systemd's own derived IDs.
fn uuid_from_bytes(bytes: &[u8]) -> Uuid {
    let mut b: [u8; 16] = bytes.try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// Root and verity PARTUUIDs for a root hash, as systemd expects them:
/// first and last 128 bits of the hash, taken verbatim.
pub fn uuids_from_root_hash(root_hash: &str) -> Result<(Uuid, Uuid)> {
    let (root, verity) = airlock_bundle::slot_partition_uuids(root_hash)
        .with_context(|| format!("root hash {root_hash:?} is not 64 hex digits"))?;
    Ok((Uuid::from_bytes(root), Uuid::from_bytes(verity)))
}

/// Computes the partition layout (pure).
pub fn plan_layout(manifest: &Manifest, root_hash: &str) -> Result<Layout> {
    let p = &manifest.partitions;
    let stem = format!("{}_{}", manifest.name, manifest.version);
    let (root_uuid, verity_uuid) = uuids_from_root_hash(root_hash)?;
    let entries: [(String, &str, Uuid, u64); 6] = [
        (
            labels::ESP.into(),
            types::ESP,
            derived_uuid(manifest, "esp"),
            p.esp_mib,
        ),
        (
            labels::root(&stem),
            types::ROOT_X86_64,
            root_uuid,
            p.root_mib,
        ),
        (
            labels::verity(&stem),
            types::ROOT_X86_64_VERITY,
            verity_uuid,
            p.root_verity_mib,
        ),
        (
            labels::EMPTY.into(),
            types::ROOT_X86_64,
            derived_uuid(manifest, "root-b"),
            p.root_mib,
        ),
        (
            labels::EMPTY.into(),
            types::ROOT_X86_64_VERITY,
            derived_uuid(manifest, "verity-b"),
            p.root_verity_mib,
        ),
        (
            labels::DATA.into(),
            types::VAR,
            derived_uuid(manifest, "data"),
            p.data_mib,
        ),
    ];
    let mut offset = FIRST_OFFSET;
    let mut partitions = Vec::new();
    for (i, (label, type_uuid, uuid, mib)) in entries.into_iter().enumerate() {
        let size = mib * MIB;
        partitions.push(Partition {
            number: i as u32 + 1,
            label,
            type_uuid: type_uuid.into(),
            uuid: uuid.to_string(),
            offset,
            size,
        });
        offset += size;
    }
    Ok(Layout {
        disk_uuid: derived_uuid(manifest, "disk").to_string(),
        size: offset + TAIL_RESERVE,
        partitions,
    })
}

impl Layout {
    /// The `sfdisk` script for this layout (pure).
    pub fn sfdisk_script(&self) -> String {
        let mut s = format!(
            "label: gpt\nlabel-id: {}\nunit: sectors\nsector-size: 512\n",
            self.disk_uuid
        );
        for p in &self.partitions {
            s.push_str(&format!(
                "start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
                p.offset / 512,
                p.size / 512,
                p.type_uuid,
                p.uuid,
                p.label
            ));
        }
        s
    }

    pub fn by_label(&self, label: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.label == label)
    }
}

/// A filesystem image to place into a partition.
pub struct Content<'a> {
    pub partition: &'a Partition,
    pub image: &'a Path,
}

/// Writes the GPT disk `out`: table by `sfdisk`, then each content image at
/// its partition's offset. Unwritten space stays a hole (sparse file).
pub fn assemble(
    runner: &Runner,
    layout: &Layout,
    contents: &[Content<'_>],
    out: &Path,
) -> Result<()> {
    {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        file.set_len(layout.size)
            .with_context(|| format!("sizing {}", out.display()))?;
    }
    let script = layout.sfdisk_script();
    let sh = runner.sh();
    runner.run(
        "writing the partition table (sfdisk)",
        cmd!(sh, "sfdisk --quiet --no-reread --no-tell-kernel {out}").stdin(script),
    )?;
    let mut disk = OpenOptions::new()
        .write(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    for c in contents {
        let len = std::fs::metadata(c.image)
            .with_context(|| format!("reading {}", c.image.display()))?
            .len();
        if len > c.partition.size {
            bail!(
                "{} is {} MiB, larger than partition {} ({} MiB); raise its size in the manifest's [partitions]",
                c.image.display(),
                len.div_ceil(MIB),
                c.partition.label,
                c.partition.size / MIB
            );
        }
        copy_sparse(c.image, &mut disk, c.partition.offset).with_context(|| {
            format!(
                "writing {} into partition {}",
                c.image.display(),
                c.partition.label
            )
        })?;
    }
    disk.sync_all().context("flushing disk image")?;
    Ok(())
}

/// Copies `src` into `dst` at `offset`, skipping all-zero blocks (they stay holes).
fn copy_sparse(src: &Path, dst: &mut File, offset: u64) -> Result<()> {
    let mut input = File::open(src)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = offset;
    loop {
        let n = read_full(&mut input, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos))?;
            dst.write_all(&buf[..n])?;
        }
        pos += n as u64;
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// sha256 of the whole image and of each partition, computed from what
/// `assemble` wrote: the disk's own bytes outside the partitions (the GPT),
/// each partition's content image, and zeros for the rest of each partition
/// (the holes of the sparse file), without reading gigabytes of holes back.
/// `SHA256SUMS` lets anyone check the result against the file itself.
pub fn hash_image(
    layout: &Layout,
    image: &Path,
    contents: &[Content<'_>],
) -> Result<(String, Vec<String>)> {
    let mut disk = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut whole = Sha256::new();
    let mut part_hashes = Vec::new();
    let mut pos = 0u64;
    let zeros = vec![0u8; MIB as usize];
    let mut buf = vec![0u8; MIB as usize];
    let mut feed_from =
        |file: &mut File, from: u64, len: u64, hashers: &mut [&mut Sha256]| -> Result<u64> {
            file.seek(SeekFrom::Start(from))?;
            let mut remaining = len;
            while remaining > 0 {
                let want = remaining.min(MIB) as usize;
                let n = read_full(file, &mut buf[..want])?;
                if n == 0 {
                    break;
                }
                for h in hashers.iter_mut() {
                    h.update(&buf[..n]);
                }
                remaining -= n as u64;
            }
            Ok(len - remaining)
        };
    for p in &layout.partitions {
        // Bytes between partitions (the primary GPT before the first one).
        feed_from(&mut disk, pos, p.offset - pos, &mut [&mut whole])?;
        let mut ph = Sha256::new();
        let mut written = 0;
        if let Some(c) = contents.iter().find(|c| c.partition.number == p.number) {
            let mut f =
                File::open(c.image).with_context(|| format!("opening {}", c.image.display()))?;
            written = feed_from(&mut f, 0, p.size, &mut [&mut whole, &mut ph])?;
        }
        let mut remaining = p.size - written;
        while remaining > 0 {
            let n = remaining.min(MIB) as usize;
            whole.update(&zeros[..n]);
            ph.update(&zeros[..n]);
            remaining -= n as u64;
        }
        part_hashes.push(hex::encode(ph.finalize()));
        pos = p.offset + p.size;
    }
    // The backup GPT at the end.
    let tail = feed_from(&mut disk, pos, layout.size - pos, &mut [&mut whole])?;
    if pos + tail != layout.size {
        bail!(
            "{} is shorter than its layout ({} bytes)",
            image.display(),
            layout.size
        );
    }
    Ok((hex::encode(whole.finalize()), part_hashes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        crate::manifest::parse_manifest(
            "name=\"airlock\"\nversion=\"1.0\"\n[distro]\nname=\"debian\"\n",
            "t",
        )
        .unwrap()
    }

    const HASH: &str = "ab6752906f1cec1c66a19bdb64dd57739eb6502906e443c127fd080532e96c66";

    #[test]
    fn root_and_verity_uuids_are_the_root_hash_halves() {
        let (r, v) = uuids_from_root_hash(HASH).unwrap();
        assert_eq!(r.to_string(), "ab675290-6f1c-ec1c-66a1-9bdb64dd5773");
        assert_eq!(v.to_string(), "9eb65029-06e4-43c1-27fd-080532e96c66");
        assert!(uuids_from_root_hash("abcd").is_err());
    }

    #[test]
    fn layout_is_contiguous_aligned_and_ordered() {
        let l = plan_layout(&manifest(), HASH).unwrap();
        let labels: Vec<&str> = l.partitions.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "esp",
                "root_airlock_1.0",
                "verity_airlock_1.0",
                "_empty",
                "_empty",
                "data"
            ]
        );
        assert_eq!(l.partitions[0].offset, MIB);
        for w in l.partitions.windows(2) {
            assert_eq!(w[0].offset + w[0].size, w[1].offset);
        }
        assert!(l.partitions.iter().all(|p| p.offset % MIB == 0));
        let last = l.partitions.last().unwrap();
        assert_eq!(l.size, last.offset + last.size + TAIL_RESERVE);
    }

    #[test]
    fn uuids_are_stable_and_distinct() {
        let a = plan_layout(&manifest(), HASH).unwrap();
        let b = plan_layout(&manifest(), HASH).unwrap();
        assert_eq!(a, b);
        let mut uuids: Vec<&str> = a.partitions.iter().map(|p| p.uuid.as_str()).collect();
        uuids.push(&a.disk_uuid);
        let n = uuids.len();
        uuids.sort();
        uuids.dedup();
        assert_eq!(uuids.len(), n);
    }

    #[test]
    fn image_hashes_match_the_bytes_on_disk() {
        let runner = Runner::new(false).unwrap();
        // A small layout: the shipped minimum sizes make a 500 MiB file.
        let part = |number: u32, offset: u64, size: u64| Partition {
            number,
            label: format!("p{number}"),
            type_uuid: types::ESP.into(),
            uuid: derived_uuid(&manifest(), &number.to_string()).to_string(),
            offset,
            size,
        };
        let layout = Layout {
            disk_uuid: derived_uuid(&manifest(), "d").to_string(),
            size: 8 * MIB,
            partitions: vec![part(1, MIB, 4 * MIB), part(2, 5 * MIB, 2 * MIB)],
        };
        let dir = tempfile::tempdir().unwrap();
        let esp = dir.path().join("esp");
        std::fs::write(&esp, vec![5u8; 3 * MIB as usize + 17]).unwrap();
        let disk = dir.path().join("disk");
        let contents = [Content {
            partition: &layout.partitions[0],
            image: &esp,
        }];
        assemble(&runner, &layout, &contents, &disk).unwrap();
        let (whole, parts) = hash_image(&layout, &disk, &contents).unwrap();
        let bytes = std::fs::read(&disk).unwrap();
        assert_eq!(whole, hex::encode(Sha256::digest(&bytes)));
        for (p, h) in layout.partitions.iter().zip(&parts) {
            assert_eq!(
                h,
                &hex::encode(Sha256::digest(
                    &bytes[p.offset as usize..(p.offset + p.size) as usize]
                )),
                "{}",
                p.label
            );
        }
    }

    #[test]
    fn sfdisk_script_names_types_and_uuids() {
        let l = plan_layout(&manifest(), HASH).unwrap();
        let s = l.sfdisk_script();
        assert!(s.starts_with("label: gpt\n"));
        assert!(s.contains(&format!("start=2048, size=524288, type={}", types::ESP)));
        assert!(s.contains("uuid=ab675290-6f1c-ec1c-66a1-9bdb64dd5773, name=\"root_airlock_1.0\""));
    }
}
