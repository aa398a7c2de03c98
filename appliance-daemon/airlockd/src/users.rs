//! Looking up the system users QEMU runs as, and the control socket's group,
//! in `/etc/passwd` and `/etc/group` (systemd-sysusers writes them; the
//! appliance has no other name service).

use std::path::Path;

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// A user to switch to: ids and supplementary groups (e.g. `kvm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub ids: Ids,
    pub groups: Vec<u32>,
}

/// `name:x:uid:gid:...` lines: the uid and primary gid of `name`.
pub fn parse_passwd(text: &str, name: &str) -> Option<Ids> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(Ids { uid, gid })
    })
}

/// `name:x:gid:members` lines: the gid of `name`.
pub fn parse_group(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        f.next()?.parse().ok()
    })
}

/// Groups that list `name` as a member.
pub fn parse_member_groups(text: &str, name: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() == 4 && f[3].split(',').any(|m| m == name))
                .then(|| f[2].parse().ok())
                .flatten()
        })
        .collect()
}

/// System user `name` with its supplementary groups.
pub fn lookup_account(name: &str) -> Result<Account> {
    let ids = lookup_user(name)?;
    let text = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    Ok(Account {
        name: name.to_owned(),
        ids,
        groups: parse_member_groups(&text, name),
    })
}

/// The uid and gid of system user `name`.
pub fn lookup_user(name: &str) -> Result<Ids> {
    let path = Path::new("/etc/passwd");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_passwd(&text, name).with_context(|| {
        format!("user {name:?} does not exist (the image's sysusers.d creates it)")
    })
}

/// The gid of group `name`, if it exists.
pub fn lookup_group(name: &str) -> Result<Option<u32>> {
    let path = Path::new("/etc/group");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_group(&text, name))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_and_groups_exactly() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nairlock-general:x:990:990::/:/usr/sbin/nologin\nairlock-generalx:x:5:5::/:/x\n";
        assert_eq!(
            parse_passwd(passwd, "airlock-general"),
            Some(Ids { uid: 990, gid: 990 })
        );
        assert_eq!(parse_passwd(passwd, "airlock"), None);
        assert_eq!(
            parse_group(
                "wheel:x:10:a,b\nairlock-control:x:991:\n",
                "airlock-control"
            ),
            Some(991)
        );
        assert_eq!(parse_group("wheel:x:10:\n", "airlock-control"), None);
        let group = "kvm:x:104:airlock-general,airlock-classified\nrender:x:105:airlock-generalx\naudio:x:29:\n";
        assert_eq!(parse_member_groups(group, "airlock-general"), vec![104]);
        assert!(parse_member_groups(group, "nobody").is_empty());
    }
}
