//! `airlock-update`, the update agent: takes a signed bundle from a file,
//! the drop directory or a URL, verifies it completely against the trust
//! file and the running system before writing anything, writes the
//! inactive A/B slot while hashing, re-reads it, and installs the new UKI
//! with boot counting last (`apply`, module [`apply`] has the ordering and
//! its power-cut reasoning); gates the blessing of a new boot (`health`);
//! reports slots and entries (`status`). Run-time contract in
//! `appliance-daemon/README.md`.

pub mod apply;
pub mod cli;
pub mod config;
pub mod control;
pub mod esp;
pub mod fsutil;
pub mod health;
pub mod reboot;
pub mod refusal;
pub mod slots;
pub mod source;
pub mod status;
pub mod system;
