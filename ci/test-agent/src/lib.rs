//! The acceptance suite's in-guest test agent and its host-side client.
//!
//! Like crosvm's end-to-end guest agent: no SSH and no network. Test-profile
//! images run `/usr/lib/airlock/airlock-test-agent` as root; it talks over the
//! virtio-serial port `org.airlock.test.0`, which QEMU bridges to a unix
//! socket on the host. One JSON object per line each way ([`wire`]).
//!
//! - guest side: [`serve`] (protocol loop, port reopening) and `exec`
//!   (running one command with a timeout);
//! - host side: [`client::AgentClient`];
//! - both: [`wire`], the message types, and [`lines`], deadline-aware line
//!   reading (also used by xtask's QMP client).

pub mod client;
mod exec;
pub mod lines;
pub mod serve;
pub mod wire;

pub use client::{AgentClient, ClientError, CommandFailed, CommandOutput};
