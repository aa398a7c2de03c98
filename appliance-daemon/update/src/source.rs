//! Where a bundle comes from: a local file, the newest `*.airlock` in the
//! drop directory IT pushes to, an update stick (a USB disk IT wrote the
//! bundle onto, raw, with `airlock flash BUNDLE /dev/sdX`), or an HTTP(S)
//! URL downloaded to the staging directory on `/var` with resume (Range
//! requests, `If-Range` on the server's validator so a changed file is
//! fetched whole). Nothing here trusts the bytes: they are verified by the
//! apply step whatever their origin.
//!
//! An update stick carries no filesystem: the host never mounts what
//! somebody plugs in, so no kernel filesystem driver parses an attacker's
//! bytes. The agent reads the bundle's header from the raw disk, checks
//! its signatures, and only then copies exactly the bundle's length to the
//! staging directory and applies that copy (a stick that answers the
//! second read differently, or is pulled out, cannot change what is
//! written).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A download is refused past this many bytes: three artifacts at the
/// bundle format's 16 GiB cap, plus its largest possible header.
pub const MAX_BUNDLE_BYTES: u64 = 3 * airlock_bundle::MAX_ARTIFACT_BYTES + (1 << 20);
/// Attempts per download before giving up (each resumes the last).
pub const DOWNLOAD_ATTEMPTS: u32 = 6;

/// Where to take the bundle from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    DropDir(PathBuf),
    /// A whole disk (`/dev/sdb`) written with a bundle from its first byte.
    Stick(PathBuf),
    Url(String),
}

/// Whether `disk` starts with a bundle's magic: an update stick, not any
/// other USB disk (which the agent leaves alone, unread beyond 8 bytes).
pub fn is_update_stick(disk: &Path) -> Result<bool> {
    let mut magic = [0u8; 8];
    let mut f = File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(magic == airlock_bundle::format::MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", disk.display()))),
    }
}

/// `Some("name version")` when the bundle on `disk` has the root hash the
/// running system booted with (`cmdline`'s `roothash=`); `None` when not,
/// or when either cannot be read (then the apply decides, and says why).
pub fn stick_runs_already(disk: &Path, cmdline: &Path) -> Option<String> {
    let booted = crate::system::load_root_hash(cmdline).ok()?;
    let header = airlock_bundle::format::RawHeader::read(&mut std::io::BufReader::new(
        File::open(disk).ok()?,
    ))
    .ok()?;
    let m = airlock_bundle::Manifest::from_json(&header.manifest).ok()?;
    (m.root_hash == booted).then(|| format!("{} {}", m.name, m.version.as_str()))
}

/// Copies the bundle at the start of `disk` into `staging` once its
/// header's signatures satisfy `trust` (an untrusted stick is refused
/// before a byte of payload is read), exactly the bundle's length; returns
/// the copy. Refusals are the bundle format's (not a bundle, truncated,
/// untrusted, …).
pub fn stage_from_stick(
    disk: &Path,
    staging: &Path,
    trust: &airlock_bundle::Trust,
    log: &mut dyn FnMut(String),
) -> Result<PathBuf> {
    let open = || File::open(disk).with_context(|| format!("opening {}", disk.display()));
    let mut header = std::io::BufReader::new(open()?);
    let verified = airlock_bundle::open(&mut header, trust).map_err(crate::apply::bundle_error)?;
    drop(header);
    let len = verified.bundle_len();
    if len > MAX_BUNDLE_BYTES {
        bail!(
            "{}: a bundle of {len} bytes, more than any bundle ({MAX_BUNDLE_BYTES})",
            disk.display()
        );
    }
    let m = &verified.manifest;
    log(format!(
        "{}: update stick with {} {} signed by {}; copying {} MiB to {}",
        disk.display(),
        m.name,
        m.version,
        verified.signers.join(", "),
        len.div_ceil(1 << 20),
        staging.display()
    ));
    std::fs::create_dir_all(staging)
        .with_context(|| format!("creating the staging directory {}", staging.display()))?;
    let part = staging.join("stick.airlock.part");
    let done = staging.join("stick.airlock");
    let mut out = File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    // No statvfs() first: the policy lets the agent ask the ESP's
    // filesystem for its free space, not /var's; a full /var ends the copy
    // with "No space left on device" and the partial copy is removed.
    let copied = match std::io::copy(&mut open()?.take(len), &mut out) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(anyhow::Error::new(e).context(format!(
                "copying the bundle ({} MiB) from {} to {}",
                len.div_ceil(1 << 20),
                disk.display(),
                part.display()
            )));
        }
    };
    if copied != len {
        let _ = std::fs::remove_file(&part);
        return Err(
            crate::refusal::Refused::Bundle(airlock_bundle::Refusal::Truncated {
                what: "the bundle on the stick",
            })
            .into(),
        );
    }
    out.sync_all()
        .with_context(|| format!("flushing {}", part.display()))?;
    std::fs::rename(&part, &done)
        .with_context(|| format!("renaming {} to {}", part.display(), done.display()))?;
    crate::fsutil::sync_dir(staging)?;
    Ok(done)
}

/// The newest regular `*.airlock` file of `dir` (by modification time,
/// then name), or `None` when there is none.
pub fn newest_in_drop_dir(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir)
        .with_context(|| format!("listing the drop directory {}", dir.display()))?
    {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let path = e.path();
        if path.extension().map_or(true, |x| x != "airlock")
            || path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            continue;
        }
        let mtime = meta
            .modified()
            .with_context(|| format!("reading {}", path.display()))?;
        if best
            .as_ref()
            .map_or(true, |(t, p)| (mtime, &path) > (*t, p))
        {
            best = Some((mtime, path));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Marks a dropped bundle as handled (`<file>.applied` / `<file>.refused`)
/// so the drop directory's path unit does not start again for it.
pub fn retire_dropped(path: &Path, outcome: &str) -> Result<PathBuf> {
    let mut name = path
        .file_name()
        .context("dropped file has a name")?
        .to_os_string();
    name.push(format!(".{outcome}"));
    let to = path.with_file_name(name);
    std::fs::rename(path, &to)
        .with_context(|| format!("renaming {} to {}", path.display(), to.display()))?;
    Ok(to)
}

/// Settings of the HTTP client.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub timeout: Duration,
    pub retry_delay: Duration,
    pub attempts: u32,
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            timeout: Duration::from_secs(60),
            retry_delay: Duration::from_secs(5),
            attempts: DOWNLOAD_ATTEMPTS,
        }
    }
}

/// The staging file name for a URL: its last path segment if that is a
/// plain `*.airlock` name, else `download.airlock` (pure).
pub fn staging_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let last = path.rsplit('/').next().unwrap_or("");
    let plain = !last.starts_with('.')
        && last.len() <= 128
        && last
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
    if plain && last.ends_with(".airlock") && last.len() > ".airlock".len() {
        last.to_string()
    } else {
        "download.airlock".to_string()
    }
}

fn http_agent(opts: &HttpOptions) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(opts.timeout)
        .timeout_read(opts.timeout)
        .redirects(5)
        .build()
}

/// What the server at `url` offers, from the bundle's first bytes only: its
/// header and signed manifest, verified against `trust`. An untrusted or
/// malformed bundle is refused here, before its payload is downloaded; the
/// connection is closed once the header is read (a periodic check costs a
/// few KiB when there is nothing new).
pub fn offered_at(
    url: &str,
    trust: &airlock_bundle::Trust,
    opts: &HttpOptions,
) -> Result<airlock_bundle::VerifiedManifest> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        bail!("{url}: only http:// and https:// URLs are supported");
    }
    // A network that is not there yet, or a server restarting, is worth the
    // download's attempts; an HTTP error status is the server's answer.
    let agent = http_agent(opts);
    let mut attempt = 1;
    let response = loop {
        match agent.get(url).call() {
            Ok(r) => break r,
            Err(ureq::Error::Status(code, _)) => bail!("{url}: HTTP {code}"),
            Err(e) if attempt >= opts.attempts.max(1) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("asking {url} for its bundle ({attempt} attempts)")))
            }
            Err(_) => {
                attempt += 1;
                std::thread::sleep(opts.retry_delay);
            }
        }
    };
    let mut header = std::io::BufReader::new(response.into_reader());
    airlock_bundle::open(&mut header, trust)
        .map_err(crate::apply::bundle_error)
        .map_err(|e| e.context(format!("the bundle at {url}")))
}

/// Downloads `url` into `staging` and returns the complete file. A partial
/// `<name>.part` from an earlier run or attempt is resumed with a Range
/// request; the server's validator (ETag or Last-Modified, kept in
/// `<name>.part.validator`) goes in `If-Range`, so a file that changed on
/// the server is fetched whole instead of spliced.
pub fn download(
    url: &str,
    staging: &Path,
    opts: &HttpOptions,
    log: &mut dyn FnMut(String),
) -> Result<PathBuf> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        bail!("{url}: only http:// and https:// URLs are supported");
    }
    std::fs::create_dir_all(staging)
        .with_context(|| format!("creating the staging directory {}", staging.display()))?;
    let name = staging_name(url);
    let done = staging.join(&name);
    let part = staging.join(format!("{name}.part"));
    let validator_file = staging.join(format!("{name}.part.validator"));
    let agent = http_agent(opts);
    let mut last_error = None;
    for attempt in 1..=opts.attempts.max(1) {
        if attempt > 1 {
            std::thread::sleep(opts.retry_delay);
        }
        match fetch_once(&agent, url, &part, &validator_file, log) {
            Ok(()) => {
                File::open(&part)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("flushing {}", part.display()))?;
                std::fs::rename(&part, &done).with_context(|| {
                    format!("renaming {} to {}", part.display(), done.display())
                })?;
                let _ = std::fs::remove_file(&validator_file);
                crate::fsutil::sync_dir(staging)?;
                return Ok(done);
            }
            Err(Fetch::Fatal(e)) => return Err(e.context(format!("downloading {url}"))),
            Err(Fetch::Retry(e)) => {
                log(format!(
                    "download attempt {attempt} of {}: {e:#}",
                    opts.attempts
                ));
                last_error = Some(e);
            }
        }
    }
    let e = last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made"));
    Err(e.context(format!("downloading {url}: gave up after {} attempts (the partial file {} is kept for the next run)", opts.attempts, part.display())))
}

enum Fetch {
    /// Worth another attempt (network error, server error, short body).
    Retry(anyhow::Error),
    /// Not worth one (404, too large, local I/O).
    Fatal(anyhow::Error),
}

fn fetch_once(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    validator_file: &Path,
    log: &mut dyn FnMut(String),
) -> Result<(), Fetch> {
    let fatal = |e: anyhow::Error| Fetch::Fatal(e);
    let have = match std::fs::metadata(part) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            return Err(fatal(
                anyhow::Error::new(e).context(format!("reading {}", part.display())),
            ))
        }
    };
    let validator = std::fs::read_to_string(validator_file)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
        if let Some(v) = &validator {
            req = req.set("If-Range", v.trim());
        }
        log(format!("resuming {url} at byte {have}"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, r)) if have > 0 => {
            // Range past the end: complete if the server's total is what we have.
            let total = r
                .header("Content-Range")
                .and_then(|v| v.strip_prefix("bytes */"))
                .and_then(|t| t.trim().parse::<u64>().ok());
            if total == Some(have) {
                return Ok(());
            }
            let _ = std::fs::remove_file(part);
            return Err(Fetch::Retry(anyhow::anyhow!(
                "the server refused resuming at byte {have}; starting over"
            )));
        }
        Err(ureq::Error::Status(code, _))
            if (500..600).contains(&code) || code == 408 || code == 429 =>
        {
            return Err(Fetch::Retry(anyhow::anyhow!("HTTP {code}")));
        }
        Err(ureq::Error::Status(code, r)) => {
            return Err(fatal(anyhow::anyhow!("HTTP {code} {}", r.status_text())))
        }
        Err(e @ ureq::Error::Transport(_)) => return Err(Fetch::Retry(anyhow::Error::new(e))),
    };
    let (start, total) = match resp.status() {
        206 => parse_content_range(resp.header("Content-Range")).map_err(fatal)?,
        200 => (
            0,
            resp.header("Content-Length")
                .and_then(|v| v.trim().parse::<u64>().ok()),
        ),
        code => {
            return Err(fatal(anyhow::anyhow!(
                "unexpected HTTP {code} {}",
                resp.status_text()
            )))
        }
    };
    if start != 0 && start != have {
        return Err(fatal(anyhow::anyhow!(
            "the server answered a request for byte {have} with bytes from {start}"
        )));
    }
    if let Some(t) = total {
        if t > MAX_BUNDLE_BYTES {
            return Err(fatal(anyhow::anyhow!(
                "the server announces {t} bytes, more than any bundle ({MAX_BUNDLE_BYTES})"
            )));
        }
    }
    let new_validator = resp
        .header("ETag")
        .or_else(|| resp.header("Last-Modified"))
        .map(str::to_owned);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(|e| fatal(anyhow::Error::new(e).context(format!("opening {}", part.display()))))?;
    if start == 0 {
        if have > 0 {
            log(format!(
                "{url}: the server sent the whole file; starting over"
            ));
        }
        file.set_len(0).map_err(|e| fatal(e.into()))?;
        match &new_validator {
            Some(v) => std::fs::write(validator_file, v),
            None => std::fs::remove_file(validator_file).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
        }
        .map_err(|e| {
            fatal(anyhow::Error::new(e).context(format!("writing {}", validator_file.display())))
        })?;
    }
    file.seek(SeekFrom::Start(start))
        .map_err(|e| fatal(e.into()))?;
    let mut body = resp.into_reader();
    let mut pos = start;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = file.sync_data();
                return Err(Fetch::Retry(
                    anyhow::Error::new(e).context(format!("connection lost after byte {pos}")),
                ));
            }
        };
        pos += n as u64;
        if pos > MAX_BUNDLE_BYTES || total.is_some_and(|t| pos > t) {
            return Err(fatal(anyhow::anyhow!(
                "the server sent more bytes than it announced"
            )));
        }
        file.write_all(&buf[..n]).map_err(|e| {
            fatal(anyhow::Error::new(e).context(format!("writing {}", part.display())))
        })?;
    }
    file.sync_data().map_err(|e| {
        fatal(anyhow::Error::new(e).context(format!("flushing {}", part.display())))
    })?;
    match total {
        Some(t) if pos < t => Err(Fetch::Retry(anyhow::anyhow!(
            "the connection ended at byte {pos} of {t}"
        ))),
        _ => Ok(()),
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (START, TOTAL).
fn parse_content_range(v: Option<&str>) -> Result<(u64, Option<u64>)> {
    let v = v.context("HTTP 206 without Content-Range")?;
    let spec = v
        .trim()
        .strip_prefix("bytes ")
        .with_context(|| format!("Content-Range {v:?} is not in bytes"))?;
    let (range, total) = spec
        .split_once('/')
        .with_context(|| format!("Content-Range {v:?} has no total"))?;
    let start = range
        .split_once('-')
        .and_then(|(s, _)| s.parse().ok())
        .with_context(|| format!("Content-Range {v:?} has no start"))?;
    let total = if total == "*" {
        None
    } else {
        Some(
            total
                .parse()
                .with_context(|| format!("Content-Range {v:?}: bad total"))?,
        )
    };
    Ok((start, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_name_keeps_plain_bundle_names_only() {
        assert_eq!(
            staging_name("https://it.example/u/airlock_1.2.airlock"),
            "airlock_1.2.airlock"
        );
        assert_eq!(
            staging_name("https://it.example/u/airlock_1.2.airlock?sig=abc"),
            "airlock_1.2.airlock"
        );
        assert_eq!(
            staging_name("https://it.example/u/..%2f..%2fetc"),
            "download.airlock"
        );
        assert_eq!(
            staging_name("https://it.example/latest"),
            "download.airlock"
        );
        assert_eq!(
            staging_name("https://it.example/.airlock"),
            "download.airlock"
        );
    }

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(
            parse_content_range(Some("bytes 100-199/200")).unwrap(),
            (100, Some(200))
        );
        assert_eq!(parse_content_range(Some("bytes 0-9/*")).unwrap(), (0, None));
        assert!(parse_content_range(Some("items 0-9/10")).is_err());
        assert!(parse_content_range(None).is_err());
    }

    #[test]
    fn drop_dir_gives_the_newest_bundle_and_ignores_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_in_drop_dir(dir.path()).unwrap(), None);
        let old = dir.path().join("airlock_1.1.airlock");
        let new = dir.path().join("airlock_1.2.airlock");
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&new, b"y").unwrap();
        let past = std::time::SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        std::fs::write(dir.path().join("airlock_1.3.airlock.applied"), b"z").unwrap();
        std::fs::write(dir.path().join(".airlock_1.4.airlock"), b"partial upload").unwrap();
        std::fs::create_dir(dir.path().join("dir.airlock")).unwrap();
        assert_eq!(newest_in_drop_dir(dir.path()).unwrap(), Some(new.clone()));
        let retired = retire_dropped(&new, "applied").unwrap();
        assert!(retired.ends_with("airlock_1.2.airlock.applied"));
        assert_eq!(newest_in_drop_dir(dir.path()).unwrap(), Some(old));
    }
}
