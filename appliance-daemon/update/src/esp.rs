//! Boot entries on the ESP: type #2 entries (UKIs) in `EFI/Linux`, named
//! `<name>_<version>[+LEFT[-DONE]].efi` (systemd's boot counting: LEFT tries
//! left, DONE tries used; no counter = blessed or never counted; `+0` = tries
//! exhausted, systemd-boot sorts it last and boots the previous entry).
//!
//! Installing is the last step of an update: the UKI is copied to a name
//! systemd-boot ignores (`.<file>.tmp`, not `*.efi`), flushed, re-read and
//! hashed, then renamed to `<name>_<version>+3.efi` and the directory
//! flushed. systemd-boot picks the entry with the highest version first.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A boot entry's file name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub file: String,
    /// `<name>_<version>`.
    pub stem: String,
    /// `+LEFT[-DONE]`; `None` when there is no counter.
    pub counter: Option<(u32, u32)>,
}

/// What boot counting says about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blessing {
    /// No counter: blessed by `systemd-bless-boot`, or installed without counting.
    Good,
    /// Counter with tries left: on trial.
    Trying { left: u32, done: u32 },
    /// `+0…`: every try failed; systemd-boot falls back to the previous entry.
    Bad { done: u32 },
}

impl Entry {
    /// Parses an `EFI/Linux` file name (pure); `None` for anything that is not `*.efi`.
    pub fn parse(file: &str) -> Option<Entry> {
        let base = file.strip_suffix(".efi")?;
        if base.is_empty() || base.starts_with('.') {
            return None;
        }
        if let Some((stem, counter)) = base.rsplit_once('+') {
            let (left, done) = match counter.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                None => (counter.parse().ok()?, 0),
            };
            return Some(Entry {
                file: file.into(),
                stem: stem.into(),
                counter: Some((left, done)),
            });
        }
        Some(Entry {
            file: file.into(),
            stem: base.into(),
            counter: None,
        })
    }

    pub fn blessing(&self) -> Blessing {
        match self.counter {
            None => Blessing::Good,
            Some((0, done)) => Blessing::Bad { done },
            Some((left, done)) => Blessing::Trying { left, done },
        }
    }
}

impl std::fmt::Display for Blessing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blessing::Good => f.write_str("blessed"),
            Blessing::Trying { left, done } => {
                write!(f, "on trial ({left} tries left, {done} used)")
            }
            Blessing::Bad { done } => write!(f, "bad (all {done} tries failed)"),
        }
    }
}

/// The ESP's `EFI/Linux` directory.
pub struct Esp {
    pub dir: PathBuf,
}

impl Esp {
    /// The ESP mounted at `root`; it must have `EFI/Linux`.
    pub fn open(root: &Path) -> Result<Esp> {
        let dir = root.join("EFI/Linux");
        if !dir.is_dir() {
            bail!(
                "{} is not a directory: is the ESP mounted at {}?",
                dir.display(),
                root.display()
            );
        }
        Ok(Esp { dir })
    }

    /// Every boot entry, sorted by file name.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
        {
            let e = e.with_context(|| format!("listing {}", self.dir.display()))?;
            if let Some(entry) = e.file_name().to_str().and_then(Entry::parse) {
                out.push(entry);
            }
        }
        out.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(out)
    }

    /// Entries for one `<name>_<version>`.
    pub fn entries_for(&self, stem: &str) -> Result<Vec<Entry>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| e.stem == stem)
            .collect())
    }

    /// Removes the entries of `stem` and leftovers of interrupted installs,
    /// then flushes the directory.
    pub fn remove_stem(&self, stem: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for e in self.entries_for(stem)? {
            let path = self.dir.join(&e.file);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(e.file);
        }
        for e in std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
        {
            let name = e
                .with_context(|| format!("listing {}", self.dir.display()))?
                .file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let path = self.dir.join(&*name);
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(name.into_owned());
            }
        }
        crate::fsutil::sync_dir(&self.dir)?;
        Ok(removed)
    }

    /// Installs `uki` (whose SHA-256 must be `sha256`) as
    /// `<stem>+<tries>.efi`: temporary name, flush, re-read and hash,
    /// rename, flush the directory. Returns the file name.
    pub fn install(&self, uki: &Path, stem: &str, tries: u32, sha256: &str) -> Result<String> {
        let name = format!("{stem}+{tries}.efi");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        {
            let mut src = File::open(uki).with_context(|| format!("opening {}", uki.display()))?;
            let mut dst =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            std::io::copy(&mut src, &mut dst)
                .with_context(|| format!("copying the UKI to {}", tmp.display()))?;
            dst.flush()?;
            dst.sync_all()
                .with_context(|| format!("flushing {}", tmp.display()))?;
        }
        crate::fsutil::sync_dir(&self.dir)?;
        let actual = sha256_file(&tmp)?;
        if actual != sha256 {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "the UKI copied to {} reads back with sha256 {actual}, expected {sha256}",
                tmp.display()
            );
        }
        let target = self.dir.join(&name);
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
        crate::fsutil::sync_dir(&self.dir)?;
        Ok(name)
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_parsed_like_systemd_boot_does() {
        let cases = [
            ("airlock_1.0.efi", Some(("airlock_1.0", None))),
            ("airlock_1.1+3.efi", Some(("airlock_1.1", Some((3, 0))))),
            ("airlock_1.1+2-1.efi", Some(("airlock_1.1", Some((2, 1))))),
            ("airlock_1.1+0-3.efi", Some(("airlock_1.1", Some((0, 3))))),
            ("airlock_1.1+x.efi", None),
            (".airlock_1.1+3.efi.tmp", None),
            ("loader.conf", None),
        ];
        for (file, want) in cases {
            let got = Entry::parse(file).map(|e| (e.stem.clone(), e.counter));
            assert_eq!(got, want.map(|(s, c)| (s.to_string(), c)), "{file}");
        }
        assert_eq!(
            Entry::parse("a_1+2-1.efi").unwrap().blessing(),
            Blessing::Trying { left: 2, done: 1 }
        );
        assert_eq!(
            Entry::parse("a_1+0-3.efi").unwrap().blessing(),
            Blessing::Bad { done: 3 }
        );
        assert_eq!(Entry::parse("a_1.efi").unwrap().blessing(), Blessing::Good);
    }

    #[test]
    fn install_renames_last_and_refuses_a_bad_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("EFI/Linux")).unwrap();
        let esp = Esp::open(dir.path()).unwrap();
        let uki = dir.path().join("uki");
        std::fs::write(&uki, b"MZ uki").unwrap();
        let good = sha256_file(&uki).unwrap();
        assert!(esp
            .install(&uki, "airlock_1.1", 3, &"00".repeat(32))
            .is_err());
        assert!(esp.entries().unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(&esp.dir).unwrap().count(),
            0,
            "temporary file left behind"
        );
        assert_eq!(
            esp.install(&uki, "airlock_1.1", 3, &good).unwrap(),
            "airlock_1.1+3.efi"
        );
        assert_eq!(
            std::fs::read(esp.dir.join("airlock_1.1+3.efi")).unwrap(),
            b"MZ uki"
        );
        std::fs::write(esp.dir.join(".x.efi.tmp"), b"left over").unwrap();
        assert_eq!(
            esp.remove_stem("airlock_1.1").unwrap(),
            ["airlock_1.1+3.efi", ".x.efi.tmp"]
        );
    }
}
