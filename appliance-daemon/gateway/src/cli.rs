//! Command lines of `airlock-gateway` and `airlock-sanitiser`.

use crate::gateway::{Config, ConfirmConfig};
use crate::runner::Runner;
use crate::sanitise::Limits;
use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// One-way clipboard gateway: copies made in the general guest become
/// pastable, sanitised, in the classified guest; nothing goes back.
#[derive(Debug, Parser)]
#[command(name = "airlock-gateway", version)]
pub struct GatewayOpts {
    /// The classified guest's vdagent socket (QEMU listens on it).
    #[arg(long, value_name = "PATH")]
    pub classified: PathBuf,
    /// The general guest's vdagent socket (QEMU listens on it).
    #[arg(long, value_name = "PATH")]
    pub general: PathBuf,
    /// Largest clipboard item taken from the general guest, and largest
    /// sanitised text, in bytes.
    #[arg(long, value_name = "N", default_value_t = 32 << 20, value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
    pub max_bytes: u32,
    /// Largest image width and height, pixels.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_image_dimension: u32,
    /// Largest image area, pixels.
    #[arg(long, value_name = "N", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Append-only audit log (one line per transfer attempt); standard
    /// error if not given.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// How long the general guest has to send the data it announced.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub request_timeout_ms: u64,
    /// Wall-clock limit for one sanitiser run.
    #[arg(long, value_name = "MS", default_value_t = 15000)]
    pub sanitiser_timeout_ms: u64,
    /// Confirm mode: listen here for the kiosk, and offer each sanitised
    /// item to classified only once the user accepts it. The socket is
    /// 0600 unless --confirm-group is given.
    #[arg(long, value_name = "PATH")]
    pub confirm_socket: Option<PathBuf>,
    /// Confirm mode: how long the user has to accept.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 30000,
        requires = "confirm_socket"
    )]
    pub confirm_timeout_ms: u64,
    /// Confirm mode: give the socket to this group (numeric gid; this
    /// program's user must be a member), mode 0660, so that the kiosk (a
    /// member too) may connect. If the group cannot be set, a warning is
    /// logged and the socket stays 0600.
    #[arg(long, value_name = "GID", requires = "confirm_socket")]
    pub confirm_group: Option<u32>,
    /// The sanitiser program (default: `airlock-sanitiser` beside this
    /// program).
    #[arg(long, value_name = "PATH")]
    pub sanitiser: Option<PathBuf>,
}

impl GatewayOpts {
    pub fn into_config(self) -> Result<Config> {
        let program = match self.sanitiser {
            Some(p) => p,
            None => std::env::current_exe()
                .context("locating this program")?
                .with_file_name("airlock-sanitiser"),
        };
        Ok(Config {
            classified: self.classified,
            general: self.general,
            max_bytes: self.max_bytes,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            runner: Runner {
                program,
                limits: Limits {
                    max_text_bytes: self.max_bytes as usize,
                    max_image_bytes: self.max_bytes as usize,
                    max_dimension: self.max_image_dimension,
                    max_pixels: self.max_image_pixels,
                },
                timeout: Duration::from_millis(self.sanitiser_timeout_ms),
            },
            audit_log: self.audit_log,
            confirm: self.confirm_socket.map(|socket| ConfirmConfig {
                socket,
                timeout: Duration::from_millis(self.confirm_timeout_ms),
                group: self.confirm_group,
            }),
        })
    }
}

/// Sanitises one clipboard item read from standard input and writes the
/// result to standard output (started by airlock-gateway, one process per
/// transfer; confined by rlimits and seccomp before reading input).
#[derive(Debug, Parser)]
#[command(name = "airlock-sanitiser", version)]
pub struct SanitiserOpts {
    #[arg(long, value_name = "N")]
    pub max_text_bytes: usize,
    #[arg(long, value_name = "N")]
    pub max_image_bytes: usize,
    #[arg(long, value_name = "N")]
    pub max_dimension: u32,
    #[arg(long, value_name = "N")]
    pub max_pixels: u64,
    /// Test hook: after confinement, try to open a file (the seccomp
    /// filter must kill the process).
    #[arg(long, hide = true)]
    pub probe_forbidden_syscall: bool,
}

impl SanitiserOpts {
    pub fn limits(&self) -> Limits {
        Limits {
            max_text_bytes: self.max_text_bytes,
            max_image_bytes: self.max_image_bytes,
            max_dimension: self.max_dimension,
            max_pixels: self.max_pixels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_cli() {
        let o =
            GatewayOpts::try_parse_from(["g", "--classified", "/c", "--general", "/g"]).unwrap();
        assert_eq!(o.max_bytes, 32 << 20);
        let c = GatewayOpts::try_parse_from([
            "g",
            "--classified",
            "/c",
            "--general",
            "/g",
            "--max-bytes",
            "10",
            "--sanitiser",
            "/s",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(c.runner.limits.max_text_bytes, 10);
        assert_eq!(c.runner.program, PathBuf::from("/s"));
        assert!(GatewayOpts::try_parse_from(["g", "--classified", "/c"]).is_err());
        assert!(GatewayOpts::try_parse_from([
            "g",
            "--classified",
            "/c",
            "--general",
            "/g",
            "--max-bytes",
            "0"
        ])
        .is_err());
        assert!(GatewayOpts::try_parse_from([
            "g",
            "--classified",
            "/c",
            "--general",
            "/g",
            "--max-bytes",
            "4294967295"
        ])
        .is_err());
    }

    #[test]
    fn confirm_options() {
        let parse = |extra: &[&str]| {
            GatewayOpts::try_parse_from(
                [
                    "g",
                    "--classified",
                    "/c",
                    "--general",
                    "/g",
                    "--sanitiser",
                    "/s",
                ]
                .iter()
                .chain(extra),
            )
            .map(|o| o.into_config().unwrap().confirm)
        };
        assert_eq!(parse(&[]).unwrap(), None);
        let c = parse(&["--confirm-socket", "/r/confirm.sock"])
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            ConfirmConfig {
                socket: "/r/confirm.sock".into(),
                timeout: Duration::from_millis(30000),
                group: None
            }
        );
        let c = parse(&[
            "--confirm-socket",
            "/r/c.sock",
            "--confirm-group",
            "985",
            "--confirm-timeout-ms",
            "5000",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.group, c.timeout),
            (Some(985), Duration::from_millis(5000))
        );
        // A group without a socket, or not a gid, is refused.
        assert!(parse(&["--confirm-group", "985"]).is_err());
        assert!(parse(&[
            "--confirm-socket",
            "/r/c.sock",
            "--confirm-group",
            "airlock-confirm"
        ])
        .is_err());
        assert!(parse(&["--confirm-socket", "/r/c.sock", "--confirm-group", "-1"]).is_err());
    }
}
