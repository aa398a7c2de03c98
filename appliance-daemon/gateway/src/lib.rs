//! One-way clipboard gateway, general → classified (requirements P12, P13):
//! the host side of the SPICE vdagent protocol on both guests' ports
//! ([`gateway`]), a sanitiser run in its own confined process per transfer
//! ([`sanitise`] rules, [`sandbox`] confinement, [`ipc`] pipe protocol,
//! [`runner`] process handling), the audit log ([`audit`]) and the optional
//! kiosk confirmation ([`confirm`]).
//! The binaries in `src/bin/` only parse their command line and call in here.

pub mod audit;
pub mod cli;
pub mod confirm;
pub mod gateway;
pub mod ipc;
pub mod runner;
pub mod sandbox;
pub mod sanitise;
