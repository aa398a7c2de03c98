//! A minimal initramfs as an uncompressed newc cpio archive
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//! Entries are written in the order given, owned by root, with mtime 0.

use std::io::{self, Write};
use std::path::Path;

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// An initramfs being put together.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory (parents must be added first).
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entries.push(Entry::Dir {
            path: path.to_owned(),
            mode: 0o755,
        });
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Self {
        self.entries.push(Entry::File {
            path: path.to_owned(),
            mode,
            data,
        });
        self
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.entries.push(Entry::CharDev {
            path: path.to_owned(),
            mode,
            major,
            minor,
        });
        self
    }

    /// The archive bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let ino = i as u32 + 1;
            match entry {
                Entry::Dir { path, mode } => {
                    header(&mut out, ino, S_IFDIR | mode, 2, 0, (0, 0), path, &[])
                }
                Entry::File { path, mode, data } => header(
                    &mut out,
                    ino,
                    S_IFREG | mode,
                    1,
                    data.len(),
                    (0, 0),
                    path,
                    data,
                ),
                Entry::CharDev {
                    path,
                    mode,
                    major,
                    minor,
                } => header(
                    &mut out,
                    ino,
                    S_IFCHR | mode,
                    1,
                    0,
                    (*major, *minor),
                    path,
                    &[],
                ),
            }
        }
        header(&mut out, 0, 0, 1, 0, (0, 0), "TRAILER!!!", &[]);
        out
    }

    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&self.to_bytes())?;
        f.sync_all()
    }
}

#[allow(clippy::too_many_arguments)]
fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

/// The test guest's initramfs: `/init` (the static test-guest binary),
/// `/dev/console`, mount points, and kernel modules (`.ko` or `.ko.xz`) put
/// in `/lib/modules/` and loaded by `/init` in the order given.
pub fn test_guest(init: &[u8], modules: &[(String, Vec<u8>)]) -> Initramfs {
    let mut fs = Initramfs::new();
    fs.dir("dev")
        .char_dev("dev/console", 0o600, 5, 1)
        .dir("proc")
        .dir("sys")
        .dir("lib")
        .dir("lib/modules");
    for (name, data) in modules {
        fs.file(&format!("lib/modules/{name}"), 0o644, data.clone());
    }
    let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
    fs.file("lib/modules/order", 0o644, order.into_bytes());
    fs.file("init", 0o755, init.to_vec());
    fs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_exact() {
        let mut fs = Initramfs::new();
        fs.file("init", 0o755, b"abc".to_vec());
        let bytes = fs.to_bytes();
        // Header (110 bytes) + "init\0" = 115, padded to 116; data 3 padded to 4.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001"); // ino
        assert_eq!(&bytes[14..22], b"000081ed"); // regular file, 0755
        assert_eq!(&bytes[54..62], b"00000003"); // size
        assert_eq!(&bytes[94..102], b"00000005"); // name size incl. NUL
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..119], b"abc");
        assert_eq!(bytes.len() % 4, 0);
        let trailer = &bytes[120..];
        assert!(trailer.windows(10).any(|w| w == b"TRAILER!!!"));
        // Reproducible.
        assert_eq!(bytes, fs.to_bytes());
    }

    #[test]
    fn test_guest_has_console_and_init() {
        let bytes = test_guest(b"ELF", &[("button.ko.xz".into(), vec![1, 2])]).to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        for name in [
            "dev/console",
            "lib/modules/button.ko.xz",
            "lib/modules/order",
            "init\0",
        ] {
            assert!(text.contains(name), "{name}");
        }
        // mode, uid, gid, nlink, mtime, size, devmajor, devminor, rdevmajor, rdevminor
        let console: String = [0o020600u32, 0, 0, 1, 0, 0, 0, 0, 5, 1]
            .iter()
            .map(|f| format!("{f:08x}"))
            .collect();
        assert!(text.contains(&console), "console is c 5:1 0600");
    }
}
