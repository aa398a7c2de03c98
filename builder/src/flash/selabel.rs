//! SELinux labels for what provisioning writes on the data partition,
//! looked up in the file contexts of `policy/airlock.fc` (compiled into this
//! binary), because the host that flashes is not SELinux-enforcing and has
//! no policy of the image's: the `security.selinux` xattrs are set
//! explicitly, as the image's own `setfiles` would.
//!
//! Only the patterns `airlock.fc` uses are understood: literal paths with
//! `\.` escapes, optionally ending in `(/.*)?` (the path and everything
//! under it). Anything else fails the unit test that parses the whole file,
//! so a new kind of pattern cannot be silently mislabelled. As in
//! libselinux, an exact path wins over a pattern.

use anyhow::{bail, Context, Result};

/// `policy/airlock.fc`, as the image was built with.
pub const AIRLOCK_FC: &str = include_str!("../../../policy/airlock.fc");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Any,
    Dir,
    File,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub subtree: bool,
    pub file_type: FileType,
    /// The SELinux type, e.g. `airlock_classified_disk_t`.
    pub type_: String,
}

/// Parses an `.fc` file of the form `PATTERN [-d|--|-s] gen_context(user:role:type,level)`.
pub fn parse_fc(text: &str) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (pattern, file_type, context) = match fields.as_slice() {
            [p, c] => (*p, FileType::Any, *c),
            [p, t, c] => (
                *p,
                match *t {
                    "-d" => FileType::Dir,
                    "--" => FileType::File,
                    "-s" => FileType::Socket,
                    other => bail!(
                        "airlock.fc line {}: file type {other:?} not understood",
                        i + 1
                    ),
                },
                *c,
            ),
            _ => bail!(
                "airlock.fc line {}: expected `pattern [type] context`",
                i + 1
            ),
        };
        let inner = context
            .strip_prefix("gen_context(")
            .and_then(|c| c.strip_suffix(')'))
            .with_context(|| {
                format!("airlock.fc line {}: context is not gen_context(...)", i + 1)
            })?;
        let type_ = inner
            .split(',')
            .next()
            .and_then(|c| c.split(':').nth(2))
            .with_context(|| format!("airlock.fc line {}: no type in {context}", i + 1))?;
        let (body, subtree) = match pattern.strip_suffix("(/.*)?") {
            Some(b) => (b, true),
            None => (pattern, false),
        };
        let mut path = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    path.push(chars.next().with_context(|| {
                        format!("airlock.fc line {}: trailing backslash", i + 1)
                    })?)
                }
                '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => {
                    bail!("airlock.fc line {}: pattern {pattern:?} uses regular-expression syntax flash does not understand", i + 1)
                }
                c => path.push(c),
            }
        }
        entries.push(Entry {
            path,
            subtree,
            file_type,
            type_: type_.to_owned(),
        });
    }
    Ok(entries)
}

/// The type `path` (a path on the appliance, e.g. `/var/lib/airlock/provision/appliance.toml`)
/// gets: an exact entry before a subtree entry, the longest subtree first.
pub fn lookup<'a>(entries: &'a [Entry], path: &str, file_type: FileType) -> Option<&'a str> {
    let fits = |e: &&Entry| e.file_type == FileType::Any || e.file_type == file_type;
    if let Some(e) = entries
        .iter()
        .filter(fits)
        .find(|e| !e.subtree && e.path == path)
    {
        return Some(&e.type_);
    }
    entries
        .iter()
        .filter(fits)
        .filter(|e| {
            e.subtree
                && (e.path == path
                    || path
                        .strip_prefix(e.path.as_str())
                        .is_some_and(|rest| rest.starts_with('/')))
        })
        .max_by_key(|e| e.path.len())
        .map(|e| e.type_.as_str())
}

/// A full context for `type_`, with the user, role and level of `like` (a
/// label from the image, e.g. its `/var`: `system_u:object_r:var_t:s0`).
pub fn context_like(like: &str, type_: &str) -> Result<String> {
    let parts: Vec<&str> = like.trim_end_matches('\0').splitn(4, ':').collect();
    match parts.as_slice() {
        [user, role, _] => Ok(format!("{user}:{role}:{type_}")),
        [user, role, _, level] => Ok(format!("{user}:{role}:{type_}:{level}")),
        _ => bail!("{like:?} is not an SELinux context"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_of_airlock_fc_is_understood() {
        let entries = parse_fc(AIRLOCK_FC).unwrap();
        assert!(entries.len() >= 30, "{}", entries.len());
    }

    #[test]
    fn provisioned_paths_get_the_contract_types() {
        let e = parse_fc(AIRLOCK_FC).unwrap();
        let cases = [
            ("/var/lib/airlock", FileType::Dir, "airlock_var_lib_t"),
            (
                "/var/lib/airlock/provision",
                FileType::Dir,
                "airlock_conf_t",
            ),
            (
                "/var/lib/airlock/provision/appliance.toml",
                FileType::File,
                "airlock_conf_t",
            ),
            (
                "/var/lib/airlock/provision/wg-classified.key",
                FileType::File,
                "airlock_wg_key_t",
            ),
            (
                "/var/lib/airlock/classified",
                FileType::Dir,
                "airlock_classified_disk_t",
            ),
            (
                "/var/lib/airlock/classified/disk",
                FileType::Dir,
                "airlock_classified_disk_t",
            ),
            (
                "/var/lib/airlock/classified/disk/windows.qcow2",
                FileType::File,
                "airlock_classified_disk_t",
            ),
            (
                "/var/lib/airlock/general/disk/windows.qcow2",
                FileType::File,
                "airlock_general_disk_t",
            ),
            (
                "/run/airlock/control.sock",
                FileType::Socket,
                "airlock_control_sock_t",
            ),
        ];
        for (path, ft, want) in cases {
            assert_eq!(lookup(&e, path, ft), Some(want), "{path}");
        }
        // Not ours, or the wrong file type: no answer rather than a guess.
        assert_eq!(lookup(&e, "/var/lib/airlockx", FileType::Dir), None);
        assert_eq!(lookup(&e, "/var/lib/airlock", FileType::File), None);
        assert_eq!(lookup(&e, "/var/lib", FileType::Dir), None);
    }

    #[test]
    fn unknown_syntax_is_refused() {
        assert!(parse_fc("/var/lib/x[0-9]+ gen_context(system_u:object_r:x_t,s0)\n").is_err());
        assert!(parse_fc("/var/lib/x -b gen_context(system_u:object_r:x_t,s0)\n").is_err());
        assert!(parse_fc("/var/lib/x system_u:object_r:x_t:s0\n").is_err());
    }

    #[test]
    fn context_takes_user_role_and_level_from_the_image() {
        assert_eq!(
            context_like("system_u:object_r:var_t:s0", "airlock_conf_t").unwrap(),
            "system_u:object_r:airlock_conf_t:s0"
        );
        assert_eq!(
            context_like("system_u:object_r:var_t:s0:c0.c1023\0", "x_t").unwrap(),
            "system_u:object_r:x_t:s0:c0.c1023"
        );
        assert_eq!(
            context_like("system_u:object_r:var_t", "x_t").unwrap(),
            "system_u:object_r:x_t"
        );
        assert!(context_like("nonsense", "x_t").is_err());
    }
}
