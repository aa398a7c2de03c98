//! The clipboard gateway as the supervisor starts it (`airlock-gateway`,
//! `../gateway/`): its paths and its command line, pure functions of the
//! configuration (the `[clipboard]` section and the supervisor's paths).
//!
//! The gateway is a client of both guests' vdagent sockets (QEMU listens,
//! `server=on,wait=off`) and reconnects with back-off by itself whenever a
//! guest's QEMU restarts, so the supervisor only has to keep the gateway
//! process itself alive (`supervisor`: own user, own cgroup `gateway`,
//! restart with back-off, stopped on shutdown).
//!
//! DAC: each side's run directory is `0751 airlock-<side>`
//! ([`qemu::SIDE_RUN_DIR_MODE`]: others may pass through, not list), QEMU
//! creates its sockets `0770` (umask 007) owned by the side's user, and
//! after each QEMU start the supervisor hands the vdagent socket alone to
//! the gateway's group (`0660`, [`qemu::HANDED_SOCKET_MODE`]; the display
//! socket goes to the kiosk's group the same way). So the gateway user
//! reaches both vdagent sockets and nothing else of either guest, without
//! SELinux; SELinux (`airlock_gateway_t`) says the same again.
//!
//! Confirm mode (`clipboard.confirm`): the gateway listens on
//! `<run_dir>/clipboard/confirm.sock` for the kiosk alone. The supervisor
//! makes that directory `0710 airlock-gateway:<clipboard.confirm_group>`
//! ([`confirm_dir_access`]) and passes the group's gid to the gateway
//! (`--confirm-group`), which gives the socket to it, `0660`. The group
//! (`airlock-confirm`, sysusers.d) has two members, the gateway's user and
//! the kiosk's: the kiosk passes through the directory (no listing) and
//! connects; nobody else gets in. Without the group both stay the gateway's
//! user's alone (`0700`, `0600`): no kiosk can confirm, every transfer is
//! rejected.
//!
//! [`qemu::SIDE_RUN_DIR_MODE`]: crate::qemu::SIDE_RUN_DIR_MODE
//! [`qemu::HANDED_SOCKET_MODE`]: crate::qemu::HANDED_SOCKET_MODE

use std::path::{Path, PathBuf};

use crate::config::{Config, Side, Supervisor};
use crate::users::Ids;

/// The audit log's file name in the log directory (run-time contract:
/// `/var/log/airlock/clipboard.log`).
pub const AUDIT_LOG: &str = "clipboard.log";
/// The sanitiser's file name, beside the gateway.
pub const SANITISER: &str = "airlock-sanitiser";
/// The name of the gateway's cgroup, a sibling of `guest-<side>`.
pub const CGROUP: &str = "gateway";

/// Where the gateway's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPaths {
    pub program: PathBuf,
    pub sanitiser: PathBuf,
    pub classified_vdagent: PathBuf,
    pub general_vdagent: PathBuf,
    pub audit_log: PathBuf,
    /// Confirm mode: the gateway's own run directory, holding its socket
    /// for the kiosk.
    pub confirm_dir: PathBuf,
    pub confirm_socket: PathBuf,
}

impl GatewayPaths {
    pub fn new(sup: &Supervisor) -> GatewayPaths {
        let vdagent = |side: Side| sup.run_dir.join(side.name()).join("vdagent.sock");
        let confirm_dir = sup.run_dir.join("clipboard");
        GatewayPaths {
            program: sup.gateway.clone(),
            sanitiser: sanitiser_of(&sup.gateway),
            classified_vdagent: vdagent(Side::Classified),
            general_vdagent: vdagent(Side::General),
            audit_log: sup.log_dir.join(AUDIT_LOG),
            confirm_socket: confirm_dir.join("confirm.sock"),
            confirm_dir,
        }
    }
}

/// The confirm directory's mode with the confirm group: its owner (the
/// gateway) creates the socket, the group (the kiosk) passes through to it,
/// without listing; others nothing.
pub const CONFIRM_DIR_SHARED_MODE: u32 = 0o710;
/// Without the group: the gateway's alone.
pub const CONFIRM_DIR_PRIVATE_MODE: u32 = 0o700;

/// The confirm directory's mode and owner, from the gateway's user (`None`:
/// the supervisor is not root and owns it itself) and the confirm group's
/// gid (`None`: missing, or not looked up).
pub fn confirm_dir_access(gateway: Option<Ids>, group: Option<u32>) -> (u32, Option<Ids>) {
    match (gateway, group) {
        (Some(ids), Some(gid)) => (CONFIRM_DIR_SHARED_MODE, Some(Ids { uid: ids.uid, gid })),
        (owner, _) => (CONFIRM_DIR_PRIVATE_MODE, owner),
    }
}

/// Confirm mode: the gid of `clipboard.confirm_group` from `/etc/group`;
/// a missing group (or an unreadable `/etc/group`) is logged as what it
/// means and gives `None`. Outside confirm mode, `None` without a look.
pub fn lookup_confirm_group(cfg: &Config) -> Option<u32> {
    let c = &cfg.clipboard;
    if !c.confirm {
        return None;
    }
    let consequence = "the confirm socket stays the gateway's alone (0600): no kiosk can connect, every transfer is rejected";
    match crate::users::lookup_group(&c.confirm_group) {
        Ok(Some(gid)) => Some(gid),
        Ok(None) => {
            crate::log::warn(format!(
                "group {:?} (clipboard.confirm_group) does not exist: {consequence}",
                c.confirm_group
            ));
            None
        }
        Err(e) => {
            crate::log::warn(format!(
                "group {:?} (clipboard.confirm_group): {e:#}; {consequence}",
                c.confirm_group
            ));
            None
        }
    }
}

/// `airlock-sanitiser` beside the gateway program.
pub fn sanitiser_of(gateway: &Path) -> PathBuf {
    gateway.with_file_name(SANITISER)
}

/// The gateway's arguments (without the program), from the configuration
/// and, in confirm mode, the gid of `clipboard.confirm_group` (`None`: the
/// group is missing, the socket stays the gateway's alone). Every limit is
/// passed explicitly, so what runs is what the configuration says even if
/// the gateway's own defaults change.
pub fn command_line(cfg: &Config, confirm_gid: Option<u32>) -> Vec<String> {
    let c = &cfg.clipboard;
    let paths = GatewayPaths::new(&cfg.supervisor);
    let p = |path: &Path| path.display().to_string();
    let mut args = vec![
        "--classified".to_owned(),
        p(&paths.classified_vdagent),
        "--general".to_owned(),
        p(&paths.general_vdagent),
        "--audit-log".to_owned(),
        p(&paths.audit_log),
        "--sanitiser".to_owned(),
        p(&paths.sanitiser),
        "--max-bytes".to_owned(),
        c.max_bytes.to_string(),
        "--max-image-dimension".to_owned(),
        c.max_image_dimension.to_string(),
        "--max-image-pixels".to_owned(),
        c.max_image_pixels.to_string(),
        "--request-timeout-ms".to_owned(),
        c.request_timeout_ms.to_string(),
        "--sanitiser-timeout-ms".to_owned(),
        c.sanitiser_timeout_ms.to_string(),
    ];
    if c.confirm {
        args.extend([
            "--confirm-socket".to_owned(),
            p(&paths.confirm_socket),
            "--confirm-timeout-ms".to_owned(),
            c.confirm_timeout_ms.to_string(),
        ]);
        if let Some(gid) = confirm_gid {
            args.extend(["--confirm-group".to_owned(), gid.to_string()]);
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use airlock_gateway::cli::GatewayOpts;
    use airlock_gateway::gateway::ConfirmConfig;
    use clap::Parser;
    use std::time::Duration;

    fn shipped() -> Config {
        config::parse("appliance.toml", crate::SHIPPED_CONFIG_TEXT).unwrap()
    }

    #[test]
    fn shipped_command_line() {
        let args = command_line(&shipped(), None);
        assert_eq!(
            args.join(" "),
            "--classified /run/airlock/classified/vdagent.sock --general /run/airlock/general/vdagent.sock \
             --audit-log /var/log/airlock/clipboard.log --sanitiser /usr/lib/airlock/airlock-sanitiser \
             --max-bytes 33554432 --max-image-dimension 16384 --max-image-pixels 40000000 \
             --request-timeout-ms 2000 --sanitiser-timeout-ms 15000"
        );
    }

    /// The gateway's own parser takes what we build, and reads it back as
    /// the configuration says (so the two cannot drift apart unnoticed).
    #[test]
    fn the_gateway_accepts_it() {
        let text = format!(
            "{}\n[clipboard]\nmax_bytes = 1000\nmax_image_dimension = 500\nmax_image_pixels = 250000\n\
             request_timeout_ms = 3000\nsanitiser_timeout_ms = 4000\nconfirm = true\nconfirm_timeout_ms = 5000\n",
            config::tests::MINIMAL
        );
        let cfg = config::parse("t.toml", &text).unwrap();
        let args = command_line(&cfg, Some(985));
        assert!(args.join(" ").ends_with("--confirm-socket /run/airlock/clipboard/confirm.sock --confirm-timeout-ms 5000 --confirm-group 985"), "{args:?}");
        let opts = GatewayOpts::try_parse_from(
            std::iter::once("airlock-gateway".to_owned()).chain(args.clone()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{args:?}"));
        let g = opts.into_config().unwrap();
        assert_eq!(
            g.classified,
            Path::new("/run/airlock/classified/vdagent.sock")
        );
        assert_eq!(g.general, Path::new("/run/airlock/general/vdagent.sock"));
        assert_eq!(
            g.audit_log.as_deref(),
            Some(Path::new("/var/log/airlock/clipboard.log"))
        );
        assert_eq!(g.max_bytes, 1000);
        assert_eq!(g.request_timeout, Duration::from_millis(3000));
        assert_eq!(
            g.runner.program,
            Path::new("/usr/lib/airlock/airlock-sanitiser")
        );
        assert_eq!(g.runner.timeout, Duration::from_millis(4000));
        assert_eq!(g.runner.limits.max_text_bytes, 1000);
        assert_eq!(g.runner.limits.max_dimension, 500);
        assert_eq!(g.runner.limits.max_pixels, 250000);
        assert_eq!(
            g.confirm,
            Some(ConfirmConfig {
                socket: PathBuf::from("/run/airlock/clipboard/confirm.sock"),
                timeout: Duration::from_millis(5000),
                group: Some(985)
            })
        );
        // Without the group, the socket stays the gateway's alone.
        let g = GatewayOpts::try_parse_from(
            std::iter::once("g".to_owned()).chain(command_line(&cfg, None)),
        )
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(g.confirm.map(|c| c.group), Some(None));
        // And with confirm mode off, no confirm socket (a gid changes nothing).
        let g = GatewayOpts::try_parse_from(
            std::iter::once("g".to_owned()).chain(command_line(&shipped(), Some(985))),
        )
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(g.confirm, None);
    }

    #[test]
    fn paths_follow_the_supervisor() {
        let text = format!(
            "[supervisor]\ntest_mode = true\nrun_dir = \"/tmp/r\"\nlog_dir = \"/tmp/l\"\ngateway = \"/opt/bin/airlock-gateway\"\n{}",
            config::tests::MINIMAL
        );
        let cfg = config::parse("t.toml", &text).unwrap();
        let p = GatewayPaths::new(&cfg.supervisor);
        assert_eq!(p.sanitiser, Path::new("/opt/bin/airlock-sanitiser"));
        assert_eq!(
            p.classified_vdagent,
            Path::new("/tmp/r/classified/vdagent.sock")
        );
        assert_eq!(p.audit_log, Path::new("/tmp/l/clipboard.log"));
        assert_eq!(p.confirm_socket, Path::new("/tmp/r/clipboard/confirm.sock"));
        // The vdagent socket the gateway is given is the one QEMU listens on.
        let qemu = crate::qemu::GuestPaths::new(&cfg.supervisor, Side::General);
        assert_eq!(qemu.vdagent, p.general_vdagent);
    }

    #[test]
    fn confirm_dir_is_shared_with_the_group_only() {
        let gw = Ids { uid: 990, gid: 990 };
        // The kiosk (group) may pass through, not list, not write; others nothing.
        assert_eq!(
            confirm_dir_access(Some(gw), Some(985)),
            (0o710, Some(Ids { uid: 990, gid: 985 }))
        );
        assert_eq!(CONFIRM_DIR_SHARED_MODE & 0o007, 0);
        assert_eq!(CONFIRM_DIR_SHARED_MODE & 0o070, 0o010);
        // No group: the gateway's alone.
        assert_eq!(confirm_dir_access(Some(gw), None), (0o700, Some(gw)));
        // Not root: the supervisor's own directory, private.
        assert_eq!(confirm_dir_access(None, Some(985)), (0o700, None));
        assert_eq!(confirm_dir_access(None, None), (0o700, None));
    }
}
