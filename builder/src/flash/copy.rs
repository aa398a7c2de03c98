//! Writing the image onto the target, and reading it back.
//!
//! The image is read once: its sha256 is computed from the very bytes that
//! are written. After `fsync` the target's cached pages are dropped
//! (`POSIX_FADV_DONTNEED`) so the read-back sees the device (or the file's
//! blocks), not the page cache of the write; the first `image size` bytes of
//! the target must hash the same.
//!
//! An image-file target is emptied and set to its former size first, so the
//! image's all-zero blocks stay holes (a 64 GiB target file costs only what
//! the image holds); a block device gets every byte.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::target::{Kind, Target};

const CHUNK: usize = 4 << 20;
/// Plain progress lines (not a terminal): every this many percent…
const LINE_EVERY_PERCENT: u64 = 5;
/// …or this often, whichever comes first.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Byte progress: a bar on a terminal, otherwise a plain line every 5 % or 5 s.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    bar: Option<ProgressBar>,
    last_percent: u64,
    last_line: Instant,
    started: Instant,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let pb = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                pb.set_style(style.progress_chars("=> "));
            }
            pb.set_prefix(what.to_owned());
            pb
        });
        if bar.is_none() {
            println!("airlock: {what}: 0% of {} MiB", total >> 20);
        }
        Progress {
            what: what.to_owned(),
            total,
            done: 0,
            bar,
            last_percent: 0,
            last_line: Instant::now(),
            started: Instant::now(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(pb) => pb.set_position(self.done),
            None => {
                let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
                if percent >= self.last_percent + LINE_EVERY_PERCENT
                    || (self.last_line.elapsed() >= LINE_EVERY && percent < 100)
                {
                    println!(
                        "airlock: {}: {percent}% ({} of {} MiB)",
                        self.what,
                        self.done >> 20,
                        self.total >> 20
                    );
                    self.last_percent = percent - percent % LINE_EVERY_PERCENT;
                    self.last_line = Instant::now();
                }
            }
        }
    }

    pub fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        match self.bar {
            Some(pb) => pb.finish(),
            None if self.last_percent < 100 => println!(
                "airlock: {}: 100% ({} MiB) in {secs:.1}s",
                self.what,
                self.done >> 20
            ),
            None => println!("airlock: {}: done in {secs:.1}s", self.what),
        }
    }
}

/// Fills `buf` as far as the input goes; returns how much was read.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Opens the target for writing: a block device exclusively (`O_EXCL`: the
/// kernel refuses if anything mounted or holds it, whatever our checks saw).
pub fn open_for_write(target: &Target) -> Result<File> {
    let mut options = OpenOptions::new();
    options.write(true);
    if target.kind == Kind::Block {
        options.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
    }
    options
        .open(&target.path)
        .with_context(|| format!("opening {} for writing", target.path.display()))
}

/// Writes `image` onto the target, syncs, and returns the image's sha256.
pub fn write_image(image: &Path, image_size: u64, target: &Target) -> Result<String> {
    let mut input = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut out = open_for_write(target)?;
    if target.kind == Kind::File {
        out.set_len(0)
            .and_then(|()| out.set_len(target.size))
            .with_context(|| format!("emptying {}", target.path.display()))?;
    }
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut progress = Progress::new("writing", image_size);
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut input, &mut buf)
            .with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        let skip = target.kind == Kind::File && buf[..n].iter().all(|&b| b == 0);
        if !skip {
            out.seek(SeekFrom::Start(pos))
                .and_then(|_| out.write_all(&buf[..n]))
                .with_context(|| format!("writing {} at byte {pos}", target.path.display()))?;
        }
        pos += n as u64;
        progress.add(n as u64);
    }
    if pos != image_size {
        bail!(
            "{} changed while it was written: read {pos} bytes, expected {image_size}",
            image.display()
        );
    }
    out.sync_all()
        .with_context(|| format!("flushing {} (fsync)", target.path.display()))?;
    drop_cache(&out);
    progress.finish();
    Ok(hex::encode(hash.finalize()))
}

/// Drops the cached pages of `file`, so a later read comes from the device.
pub fn drop_cache(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

/// sha256 of the first `len` bytes of `path`, read back from the device.
pub fn read_back(path: &Path, len: u64) -> Result<String> {
    let mut f =
        File::open(path).with_context(|| format!("opening {} to read it back", path.display()))?;
    drop_cache(&f);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    let mut progress = Progress::new("verifying", len);
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = read_full(&mut f, &mut buf[..want])
            .with_context(|| format!("reading {} back", path.display()))?;
        if n == 0 {
            bail!(
                "{} ended {left} bytes early while reading it back",
                path.display()
            );
        }
        hash.update(&buf[..n]);
        left -= n as u64;
        progress.add(n as u64);
    }
    progress.finish();
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_target_keeps_its_size_and_the_image_bytes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let mut bytes = vec![0u8; 9 << 20];
        bytes[..4].copy_from_slice(b"GPT!");
        bytes[(6 << 20) + 7] = 0x5a;
        std::fs::write(&image, &bytes).unwrap();
        let target_path = dir.path().join("target");
        std::fs::write(&target_path, vec![0xffu8; 16 << 20]).unwrap();
        let target = Target {
            path: target_path.clone(),
            kind: Kind::File,
            size: 16 << 20,
        };
        let sha = write_image(&image, bytes.len() as u64, &target).unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(read_back(&target_path, bytes.len() as u64).unwrap(), sha);
        let written = std::fs::read(&target_path).unwrap();
        assert_eq!(written.len(), 16 << 20);
        // Old bytes past the image are gone too (the file was emptied first).
        assert!(written[bytes.len()..].iter().all(|&b| b == 0));
    }
}
