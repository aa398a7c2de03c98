//! airlock: builds immutable two-domain appliance images.
pub mod qemu;
