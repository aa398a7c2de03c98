//! airlock's acceptance-suite harness: boots built disk images under QEMU
//! and drives them.
//!
//! - [`machine`]: a disk plus its firmware state, booted as often as needed;
//! - [`outside`]: the test machine's outside world (its uplinks' far end, in a
//!   network namespace of the CI host);
//! - [`vm`]: one QEMU process (own process group, logs, sockets, killpg on drop);
//! - [`qmp`]: QEMU's control protocol (keys, screendumps, reset, events);
//! - [`console`]: reading the serial console log;
//! - [`screen`]: decoding and comparing screendumps;
//! - [`try_boot`]: `cargo xtask boot`, to try all of it by hand.
//!
//! Commands run in the guest through `airlock_test_agent::AgentClient`
//! ([`vm::Vm::agent`]).

pub mod acceptance;
pub mod bench;
pub mod console;
pub mod machine;
pub mod outside;
pub mod plain;
pub mod qmp;
pub mod screen;
pub mod swtpm;
pub mod try_boot;
pub mod vm;

pub use machine::Machine;
pub use qmp::Qmp;
pub use screen::images_differ;
pub use vm::Vm;
