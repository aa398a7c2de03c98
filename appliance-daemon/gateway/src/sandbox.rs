//! The sanitiser's confinement, applied by the sanitiser to itself before
//! it reads a byte of input: resource limits (address space, CPU time, no
//! new files, no core dumps, no child processes) and a seccomp-BPF filter
//! built with `seccompiler` (the filter compiler of Firecracker, pure
//! Rust). The filter allows reading fd 0, writing fds 1 and 2, memory
//! management without executable mappings, and exiting; any other system
//! call kills the process (`SECCOMP_RET_KILL_PROCESS`). `seccompiler` sets
//! `PR_SET_NO_NEW_PRIVS` when it installs the filter.

use anyhow::{Context, Result};
use rustix::process::{setrlimit, Resource, Rlimit};
use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule,
};
use std::collections::BTreeMap;

/// Address-space limit: generous for a 40-megapixel decode, far below the
/// host's memory.
pub const ADDRESS_SPACE_BYTES: u64 = 1536 << 20;
/// CPU seconds before the kernel kills the sanitiser.
pub const CPU_SECONDS: u64 = 20;

/// Applies the resource limits, then the seccomp filter.
pub fn confine() -> Result<()> {
    let limit = |r, v: u64| {
        setrlimit(
            r,
            Rlimit {
                current: Some(v),
                maximum: Some(v),
            },
        )
        .with_context(|| format!("setrlimit {r:?}"))
    };
    limit(Resource::As, ADDRESS_SPACE_BYTES)?;
    limit(Resource::Cpu, CPU_SECONDS)?;
    limit(Resource::Nofile, 3)?;
    limit(Resource::Fsize, 0)?;
    limit(Resource::Core, 0)?;
    limit(Resource::Nproc, 0)?;
    let program = filter().context("building the seccomp filter")?;
    apply_filter(&program).context("installing the seccomp filter")?;
    Ok(())
}

fn arg_eq(arg: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
}

fn no_exec(arg: u8) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
}

/// The allow-list.
pub fn filter() -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let always = Vec::new();
    rules.insert(libc::SYS_read, vec![SeccompRule::new(vec![arg_eq(0, 0)?])?]);
    rules.insert(
        libc::SYS_write,
        vec![
            SeccompRule::new(vec![arg_eq(0, 1)?])?,
            SeccompRule::new(vec![arg_eq(0, 2)?])?,
        ],
    );
    rules.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![no_exec(2)?])?]);
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![no_exec(2)?])?],
    );
    for sys in [
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        rules.insert(sys, always.clone());
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .context("seccomp: unsupported architecture")?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(filter.try_into()?)
}
