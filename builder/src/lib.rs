//! airlock: builds immutable two-domain appliance images.
pub mod manifest;
pub mod qemu;
