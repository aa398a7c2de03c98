//! The data partition as a LUKS2 container, made at flash time without
//! device-mapper (`docs/design/measured-boot.md` §3, §6).
//!
//! `airlock flash` builds `/var` in plain text in a staging file on the IT
//! host (never on the PC's disk), then:
//!
//! 1. makes a fresh 512-bit volume key and a recovery key (32 random bytes
//!    in systemd's modhex groups, as `systemd-cryptenroll --recovery-key`
//!    prints them);
//! 2. `cryptsetup luksFormat` on the target's data partition with that
//!    volume key (LUKS2, aes-xts-plain64, 4096-byte sectors, data at
//!    16 MiB), the recovery key in slot 0 and an empty passphrase in slot 1
//!    — the one-time slot the PC's first boot replaces by its TPM
//!    (`airlock-seal.service`, `--wipe-slot=empty`);
//! 3. checks the header it made (`luksDump --dump-json-metadata`) is the
//!    one this writer encrypts for;
//! 4. encrypts the blocks the staging ext4 uses (its block bitmap, from
//!    `dumpe2fs`) with AES-XTS in userspace and writes them at the data
//!    segment's offset. Free blocks are skipped: ext4 never reads a free
//!    block before writing it, and metadata it expects zeroed (inode tables)
//!    is marked in use, so it is written (zeros, encrypted).
//!
//! dm-crypt's `plain64` IV for LUKS2 counts 512-byte sectors whatever the
//! encryption sector size (cryptsetup sets `iv_large_sectors` only for
//! plain and BitLocker devices): the tweak of 4096-byte sector `n` is
//! `8·n + iv_tweak`, little-endian.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes::cipher::KeyInit;
use aes::Aes256;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::cmd;
use xts_mode::Xts128;

use super::copy::{drop_cache, read_full, Progress};
use crate::exec::Runner;

/// Bytes per encryption sector (and the ext4 block size flash expects).
pub const SECTOR: u64 = 4096;
/// Where the data segment starts: after the LUKS2 header and keyslots.
pub const DATA_OFFSET: u64 = 16 << 20;
/// The cipher this writer implements.
pub const CIPHER: &str = "aes-xts-plain64";
/// The volume key: two AES-256 keys (data, tweak).
pub const VOLUME_KEY_BYTES: usize = 64;
/// Encrypt and write in chunks of this many bytes.
const CHUNK: u64 = 4 << 20;

/// systemd's modhex alphabet (recovery keys are typed on any keyboard layout).
const MODHEX: &[u8; 16] = b"cbdefghijklnrtuv";

/// A volume key, wiped from memory when dropped.
pub struct VolumeKey([u8; VOLUME_KEY_BYTES]);

impl VolumeKey {
    pub fn random() -> Result<VolumeKey> {
        let mut key = [0u8; VOLUME_KEY_BYTES];
        getrandom::getrandom(&mut key).context("reading random bytes for the volume key")?;
        Ok(VolumeKey(key))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<VolumeKey> {
        let key: [u8; VOLUME_KEY_BYTES] = bytes.try_into().with_context(|| {
            format!(
                "a volume key has {VOLUME_KEY_BYTES} bytes, not {}",
                bytes.len()
            )
        })?;
        Ok(VolumeKey(key))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        // Not a guarantee (copies may exist), but no key left lying in freed memory by us.
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

/// 32 bytes as systemd's recovery-key text: 8 groups of 8 modhex
/// characters separated by dashes (pure).
pub fn modhex_groups(bytes: &[u8; 32]) -> String {
    let chars: Vec<u8> = bytes
        .iter()
        .flat_map(|b| [MODHEX[(b >> 4) as usize], MODHEX[(b & 0xf) as usize]])
        .collect();
    chars
        .chunks(8)
        .map(|group| String::from_utf8_lossy(group).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

/// A fresh recovery key (256 bits).
pub fn random_recovery_key() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).context("reading random bytes for the recovery key")?;
    Ok(modhex_groups(&bytes))
}

/// AES-XTS for the data segment, as dm-crypt does it for LUKS2.
pub struct SegmentCipher {
    xts: Xts128<Aes256>,
    iv_tweak: u64,
}

impl SegmentCipher {
    pub fn new(key: &VolumeKey, iv_tweak: u64) -> SegmentCipher {
        let (data_key, tweak_key) = key.0.split_at(VOLUME_KEY_BYTES / 2);
        let xts = Xts128::new(
            Aes256::new_from_slice(data_key).expect("32-byte AES key"),
            Aes256::new_from_slice(tweak_key).expect("32-byte AES key"),
        );
        SegmentCipher { xts, iv_tweak }
    }

    fn tweak(&self, sector: u64) -> [u8; 16] {
        // plain64: the 512-byte sector number, little-endian, zero-padded.
        u128::from(sector * (SECTOR / 512) + self.iv_tweak).to_le_bytes()
    }

    /// Encrypts whole sectors in place; `first_sector` counts 4096-byte
    /// sectors from the segment's start.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        assert_eq!(buf.len() as u64 % SECTOR, 0, "whole sectors only");
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            self.xts
                .encrypt_sector(sector, self.tweak(first_sector + i as u64));
        }
    }

    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        assert_eq!(buf.len() as u64 % SECTOR, 0, "whole sectors only");
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            self.xts
                .decrypt_sector(sector, self.tweak(first_sector + i as u64));
        }
    }
}

/// The data segment of a LUKS2 header, as `luksDump --dump-json-metadata` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub sector_size: u64,
    pub encryption: String,
    pub iv_tweak: u64,
    pub keyslots: usize,
}

/// Parses the JSON metadata of a LUKS2 header: its one crypt segment (pure).
pub fn parse_metadata(json: &str) -> Result<Segment> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("parsing the LUKS2 metadata (JSON)")?;
    let segments = v["segments"]
        .as_object()
        .context("LUKS2 metadata without segments")?;
    let [(_, s)] = segments.iter().collect::<Vec<_>>()[..] else {
        bail!("expected one data segment, found {}", segments.len());
    };
    // LUKS2 writes offsets as decimal strings (64-bit safe JSON).
    let number = |key: &str| -> Result<u64> {
        let field = &s[key];
        field
            .as_str()
            .map(str::parse)
            .transpose()
            .ok()
            .flatten()
            .or_else(|| field.as_u64())
            .with_context(|| format!("segment field {key:?} is not a number: {field}"))
    };
    if s["type"].as_str() != Some("crypt") {
        bail!("the data segment is of type {}, not crypt", s["type"]);
    }
    Ok(Segment {
        offset: number("offset")?,
        sector_size: s["sector_size"]
            .as_u64()
            .context("segment without sector_size")?,
        encryption: s["encryption"].as_str().unwrap_or_default().to_owned(),
        iv_tweak: number("iv_tweak")?,
        keyslots: v["keyslots"].as_object().map_or(0, |k| k.len()),
    })
}

/// Refuses a segment this writer does not encrypt for (pure).
pub fn check_segment(segment: &Segment) -> Result<()> {
    if segment.encryption != CIPHER
        || segment.sector_size != SECTOR
        || segment.offset != DATA_OFFSET
    {
        bail!(
            "cryptsetup made a data segment of {} with {}-byte sectors at byte {}; airlock writes {CIPHER}, {SECTOR}-byte sectors at byte {DATA_OFFSET}",
            segment.encryption,
            segment.sector_size,
            segment.offset
        );
    }
    Ok(())
}

/// A file only root can read, removed when dropped (keys on their way to cryptsetup).
struct SecretFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl SecretFile {
    fn new(name: &str, bytes: &[u8]) -> Result<SecretFile> {
        let dir = tempfile::Builder::new()
            .prefix("airlock-luks-")
            .tempdir()
            .context("creating a private directory for a key")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let path = dir.path().join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(SecretFile { _dir: dir, path })
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        // Overwrite before the directory goes (tmpfs or not, no copy left behind by us).
        if let Ok(mut f) = OpenOptions::new().write(true).open(&self.path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.write_all(&vec![0u8; len as usize]);
        }
    }
}

/// Makes the LUKS2 header on `device` (a loop device over the data
/// partition): `key` as volume key, the recovery key in one slot, the empty
/// passphrase in another. Returns the checked segment.
pub fn format(runner: &Runner, device: &Path, key: &VolumeKey, recovery: &str) -> Result<Segment> {
    let volume_key = SecretFile::new("volume.key", key.bytes())?;
    let recovery_key = SecretFile::new("recovery.key", recovery.as_bytes())?;
    let empty = SecretFile::new("empty.key", b"")?;
    let (vk, rk, ek) = (&volume_key.path, &recovery_key.path, &empty.path);
    let sh = runner.sh();
    let offset = (DATA_OFFSET / 512).to_string();
    let sector = SECTOR.to_string();
    // PBKDF2 with few iterations: both secrets are high-entropy or (the
    // empty one) worthless by design; systemd uses the same for its
    // recovery and TPM slots, and unlocking stays fast.
    runner.run(
        "making the LUKS2 header (cryptsetup luksFormat)",
        cmd!(
            sh,
            "cryptsetup luksFormat -q --type luks2 --cipher {CIPHER} --key-size 512 --sector-size {sector} --offset {offset} --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --volume-key-file={vk} --key-file={rk} {device}"
        ),
    )?;
    runner.run(
        "adding the first-boot slot (empty passphrase, replaced by the TPM on first boot)",
        cmd!(
            sh,
            "cryptsetup luksAddKey -q --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file={rk} {device} {ek}"
        ),
    )?;
    let json = runner.run(
        "reading the LUKS2 header back (cryptsetup luksDump)",
        cmd!(sh, "cryptsetup luksDump --dump-json-metadata {device}"),
    )?;
    let segment = parse_metadata(&json)?;
    check_segment(&segment)?;
    if segment.keyslots != 2 {
        bail!(
            "the LUKS2 header has {} keyslots, expected 2 (recovery, first boot)",
            segment.keyslots
        );
    }
    Ok(segment)
}

/// The byte ranges `[start, end)` an ext4 filesystem uses, from `dumpe2fs`
/// output: every block not listed as free in a group (pure).
pub fn used_ranges(dumpe2fs: &str) -> Result<Vec<(u64, u64)>> {
    let header = |key: &str| -> Result<u64> {
        dumpe2fs
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs output without {key:?}"))
    };
    let block_size = header("Block size:")?;
    let block_count = header("Block count:")?;
    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut in_groups = false;
    for line in dumpe2fs.lines() {
        if line.starts_with("Group ") {
            in_groups = true;
            continue;
        }
        // Before the first group, "Free blocks:" is the header's count.
        let Some(list) = line.trim().strip_prefix("Free blocks:") else {
            continue;
        };
        if !in_groups {
            continue;
        }
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b): (u64, u64) = (
                a.parse()
                    .with_context(|| format!("dumpe2fs free range {item:?}"))?,
                b.parse()
                    .with_context(|| format!("dumpe2fs free range {item:?}"))?,
            );
            if b < a || b >= block_count {
                bail!("dumpe2fs free range {item:?} outside the filesystem");
            }
            free.push((a, b + 1));
        }
    }
    if !in_groups {
        bail!("dumpe2fs output without block groups");
    }
    free.sort_unstable();
    let mut used = Vec::new();
    let mut next = 0u64;
    for (a, b) in free {
        if a > next {
            used.push((next * block_size, a * block_size));
        }
        next = next.max(b);
    }
    if next < block_count {
        used.push((next * block_size, block_count * block_size));
    }
    Ok(used)
}

/// The blocks the ext4 in `plain` uses, read with `dumpe2fs`.
pub fn filesystem_used_ranges(runner: &Runner, plain: &Path) -> Result<Vec<(u64, u64)>> {
    let sh = runner.sh();
    let out = runner.run(
        "reading the data filesystem's block bitmap (dumpe2fs)",
        cmd!(sh, "dumpe2fs {plain}"),
    )?;
    Ok(align_to_sectors(&used_ranges(&out)?))
}

/// Ranges widened to whole encryption sectors and merged where they then
/// touch (a filesystem of 1 KiB blocks: its free neighbours are encrypted
/// too, which costs nothing) (pure).
pub fn align_to_sectors(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut aligned: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in ranges {
        let (a, b) = (a / SECTOR * SECTOR, b.div_ceil(SECTOR) * SECTOR);
        match aligned.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => aligned.push((a, b)),
        }
    }
    aligned
}

/// Encrypts `ranges` of `plain` and writes them into `target` at
/// `segment_start` (the data segment's first byte on the target), syncs,
/// reads the written bytes back and compares. Returns the bytes written.
pub fn write_encrypted(
    plain: &Path,
    ranges: &[(u64, u64)],
    cipher: &SegmentCipher,
    target: &mut File,
    target_name: &Path,
    segment_start: u64,
) -> Result<u64> {
    let total: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    let mut input = File::open(plain).with_context(|| format!("opening {}", plain.display()))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = Sha256::new();
    let mut progress = Progress::new("encrypting /var", total);
    for &(start, end) in ranges {
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(CHUNK) as usize;
            input.seek(SeekFrom::Start(pos))?;
            let n = read_full(&mut input, &mut buf[..len])
                .with_context(|| format!("reading {}", plain.display()))?;
            // Past the end of a (sparse, truncated) staging file: zeros.
            buf[n..len].fill(0);
            cipher.encrypt(&mut buf[..len], pos / SECTOR);
            written.update(&buf[..len]);
            target
                .seek(SeekFrom::Start(segment_start + pos))
                .and_then(|_| target.write_all(&buf[..len]))
                .with_context(|| {
                    format!(
                        "writing {} at byte {}",
                        target_name.display(),
                        segment_start + pos
                    )
                })?;
            pos += len as u64;
            progress.add(len as u64);
        }
    }
    target
        .sync_all()
        .with_context(|| format!("flushing {} (fsync)", target_name.display()))?;
    drop_cache(target);
    progress.finish();

    let mut back = Sha256::new();
    let mut device = File::open(target_name)
        .with_context(|| format!("opening {} to read it back", target_name.display()))?;
    drop_cache(&device);
    for &(start, end) in ranges {
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(CHUNK) as usize;
            device.seek(SeekFrom::Start(segment_start + pos))?;
            let n = read_full(&mut device, &mut buf[..len])?;
            if n != len {
                bail!(
                    "{} ended early while reading the encrypted /var back",
                    target_name.display()
                );
            }
            back.update(&buf[..len]);
            pos += len as u64;
        }
    }
    if back.finalize() != written.finalize() {
        bail!(
            "{}: the encrypted /var read back differs from what was written",
            target_name.display()
        );
    }
    println!(
        "airlock: /var encrypted: {} MiB written and read back (aes-xts-plain64)",
        total.div_ceil(1 << 20)
    );
    Ok(total)
}

/// Reads `len` bytes of `file` at `offset` (for the tests' decryption checks).
pub fn read_at(file: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = File::open(file)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)
        .with_context(|| format!("reading {} bytes at {offset} of {}", len, file.display()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_keys_look_like_systemds() {
        let key = modhex_groups(&[0u8; 32]);
        assert_eq!(key, ["cccccccc"; 8].join("-"));
        let key = modhex_groups(&[0xff; 32]);
        assert_eq!(key.len(), 8 * 8 + 7);
        assert!(key.starts_with("vvvvvvvv-"));
        let a = random_recovery_key().unwrap();
        let b = random_recovery_key().unwrap();
        assert_ne!(a, b);
        assert!(a
            .split('-')
            .all(|g| g.len() == 8 && g.bytes().all(|c| MODHEX.contains(&c))));
    }

    /// IEEE 1619 XTS-AES-256 test vector 10 (first 32 bytes of the 512-byte
    /// sector, data unit sequence number 0xff): the primitive is standard XTS.
    #[test]
    fn xts_matches_the_ieee_1619_vector() {
        let key = hex::decode(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ))
        .unwrap();
        let xts = Xts128::new(
            Aes256::new_from_slice(&key[..32]).unwrap(),
            Aes256::new_from_slice(&key[32..]).unwrap(),
        );
        let mut sector: Vec<u8> = (0..512).map(|i| i as u8).collect();
        xts.encrypt_sector(&mut sector, 0xffu128.to_le_bytes());
        assert_eq!(
            hex::encode(&sector[..32]),
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
        );
    }

    #[test]
    fn the_tweak_counts_512_byte_sectors_from_the_iv_tweak() {
        let key = VolumeKey::from_bytes(&[7u8; 64]).unwrap();
        let cipher = SegmentCipher::new(&key, 0);
        assert_eq!(cipher.tweak(0), [0u8; 16]);
        assert_eq!(cipher.tweak(1)[0], 8);
        assert_eq!(SegmentCipher::new(&key, 3).tweak(2)[0], 19);
        // Round trip, and sectors differ with their position.
        let plain = vec![0u8; 2 * SECTOR as usize];
        let mut buf = plain.clone();
        cipher.encrypt(&mut buf, 5);
        assert_ne!(buf[..SECTOR as usize], buf[SECTOR as usize..]);
        cipher.decrypt(&mut buf, 5);
        assert_eq!(buf, plain);
        assert!(VolumeKey::from_bytes(&[0u8; 32]).is_err());
    }

    #[test]
    fn the_luks2_metadata_gives_the_segment() {
        let json = r#"{"keyslots":{"0":{"type":"luks2"},"1":{"type":"luks2"}},"tokens":{},
          "segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
          "encryption":"aes-xts-plain64","sector_size":4096}},"digests":{},"config":{}}"#;
        let s = parse_metadata(json).unwrap();
        assert_eq!(
            s,
            Segment {
                offset: DATA_OFFSET,
                sector_size: 4096,
                encryption: CIPHER.into(),
                iv_tweak: 0,
                keyslots: 2
            }
        );
        check_segment(&s).unwrap();
        let small = parse_metadata(&json.replace("4096", "512")).unwrap();
        assert!(check_segment(&small)
            .unwrap_err()
            .to_string()
            .contains("512-byte sectors"));
        assert!(parse_metadata(&json.replace("crypt", "linear")).is_err());
    }

    #[test]
    fn used_blocks_are_the_complement_of_the_free_ones() {
        let out = "Block count:              100\nFree blocks:              40\nBlock size:               4096\n\
            Group 0: (Blocks 0-49)\n  Free blocks: 10-19, 30\nGroup 1: (Blocks 50-99)\n  Free blocks: 60-89\n  Free inodes: 3-9\n";
        let used = used_ranges(out).unwrap();
        let blocks: Vec<(u64, u64)> = used.iter().map(|(a, b)| (a / 4096, b / 4096)).collect();
        assert_eq!(blocks, vec![(0, 10), (20, 30), (31, 60), (90, 100)]);
        assert!(used_ranges("Block count: 1\nBlock size: 4096\n").is_err());
        let kib = align_to_sectors(&[(0, 3072), (5120, 6144), (8192, 9216)]);
        assert_eq!(kib, vec![(0, 12288)]);
        assert_eq!(
            align_to_sectors(&[(0, 4096), (16384, 20480)]),
            vec![(0, 4096), (16384, 20480)]
        );
        assert!(used_ranges(&out.replace("60-89", "60-200")).is_err());
    }
}
