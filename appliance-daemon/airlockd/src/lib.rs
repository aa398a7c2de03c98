//! `airlockd`, the guest supervisor (see `../README.md` and `../../README.md`).
//!
//! Pure decisions live in their own modules and are unit-tested: the
//! configuration ([`config`]), the QEMU command line ([`qemu`]), cgroup limit
//! values ([`cgroup`]), how a QEMU exit is read and the restart back-off
//! ([`lifecycle`]), the control socket's messages ([`control`]), the
//! clipboard gateway's command line ([`gateway`]). The code
//! that acts on them ([`launch`], [`supervisor`]) is thin and covered by the
//! host integration test (`tests/supervisor.rs`).

pub mod cgroup;
pub mod config;
pub mod control;
pub mod gateway;
pub mod launch;
pub mod lifecycle;
pub mod log;
pub mod netapply;
pub mod qemu;
pub mod qmp;
pub mod signals;
pub mod supervisor;
pub mod users;

/// The configuration the image ships (`/etc/airlock/appliance.toml`), for
/// unit tests: the overlay file itself, so tests and image cannot drift.
#[cfg(test)]
pub(crate) const SHIPPED_CONFIG_TEXT: &str =
    include_str!("../../../overlay/etc/airlock/appliance.toml");
