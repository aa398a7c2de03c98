//! Small file helpers with the durability the update needs: atomic
//! replacement (temporary name, fsync, rename, fsync of the directory).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Replaces `path` with `bytes` so that a power cut leaves the old or the
/// new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, None)
}

/// [`write_atomic`] for a file every user may read (mode 0644 whatever the
/// umask: the units run with `UMask=0077`).
pub fn write_atomic_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, Some(0o644))
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    let dir = path
        .parent()
        .context("a file path has a parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .context("a file path has a name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        if let Some(mode) = mode {
            // fchmod is not masked by the umask, unlike open's mode.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        }
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// fsync of a directory, so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing directory {}", dir.display()))
}
