//! Starting one QEMU the way the run-time contract says: in its guest's
//! cgroup, in its side's SELinux domain, as its side's user, with a private
//! umask, killed if the supervisor dies, stdout and stderr appended to the
//! side's QEMU log.
//!
//! The order in the child matters and is fixed here: join the cgroup while
//! still root (cgroup v2 checks write access to the common ancestor), ask
//! for the SELinux exec context (`/proc/thread-self/attr/exec`, as libvirt
//! does), drop supplementary groups, gid, uid (all three ids), then set the
//! parent-death signal (a credential change clears it), unblock signals
//! and exec. Only async-signal-safe calls run between fork and exec; every
//! string they need is prepared before the fork.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::users::{Account, Ids};

/// Where SELinux is mounted when it is enabled.
const SELINUXFS_ENFORCE: &str = "/sys/fs/selinux/enforce";

/// Whether the kernel has SELinux enabled (selinuxfs mounted).
pub fn selinux_enabled() -> bool {
    Path::new(SELINUXFS_ENFORCE).exists()
}

/// The SELinux context a side's QEMU runs in.
pub fn vm_context(side: crate::config::Side) -> String {
    format!("system_u:system_r:airlock_vm_{side}_t:s0")
}

/// Everything about how to start one process.
#[derive(Debug)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Write our pid to this `cgroup.procs` before exec.
    pub cgroup_procs: Option<PathBuf>,
    /// SELinux context for the exec (`None` when SELinux is disabled).
    pub selinux_context: Option<String>,
    /// Switch to this user and its groups (only when running as root).
    pub user: Option<Account>,
    /// Appended stdout and stderr.
    pub log: File,
}

/// What the child needs, as C strings made before the fork.
struct Prepared {
    cgroup_procs: Option<CString>,
    selinux_context: Option<CString>,
    user: Option<Ids>,
    groups: Vec<libc::gid_t>,
    parent: libc::pid_t,
}

/// Starts `spec`. The error names the steps the child was to take, since a
/// failure between fork and exec comes back as a bare errno.
pub fn spawn(spec: Spec) -> Result<Child> {
    let prepared = Prepared {
        cgroup_procs: spec
            .cgroup_procs
            .as_ref()
            .map(|p| CString::new(p.as_os_str().as_bytes()))
            .transpose()?,
        selinux_context: spec
            .selinux_context
            .as_ref()
            .map(|c| CString::new(c.as_bytes()))
            .transpose()?,
        user: spec.user.as_ref().map(|a| a.ids),
        groups: spec
            .user
            .as_ref()
            .map(|a| a.groups.clone())
            .unwrap_or_default(),
        // SAFETY: getpid has no preconditions.
        #[allow(unsafe_code)]
        parent: unsafe { libc::getpid() },
    };
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(spec.log.try_clone().context("duplicating the log file")?)
        .stderr(spec.log);
    // SAFETY: the closure runs in the child between fork and exec. It only
    // makes raw system calls (open, write, close, setgroups, setresgid,
    // setresuid, prctl, getppid, umask, sigprocmask) on data prepared before
    // the fork; it allocates nothing and takes no locks.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || child_setup(&prepared));
    }
    let steps = describe(
        &spec.cgroup_procs,
        &spec.selinux_context,
        spec.user.as_ref(),
    );
    command
        .spawn()
        .with_context(|| format!("starting {} ({steps})", spec.program.display()))
}

fn describe(cgroup: &Option<PathBuf>, context: &Option<String>, user: Option<&Account>) -> String {
    let mut steps = Vec::new();
    if let Some(c) = cgroup {
        steps.push(format!("joining {}", c.display()));
    }
    if let Some(c) = context {
        steps.push(format!("SELinux exec context {c}"));
    }
    if let Some(u) = user {
        steps.push(format!(
            "user {} (uid {} gid {} groups {:?})",
            u.name, u.ids.uid, u.ids.gid, u.groups
        ));
    }
    if steps.is_empty() {
        "as the supervisor's user".into()
    } else {
        steps.join(", ")
    }
}

#[allow(unsafe_code)]
fn write_file(path: &CString, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string; `data` is a valid
    // slice; the descriptor is closed on every path.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[allow(unsafe_code)]
fn child_setup(p: &Prepared) -> io::Result<()> {
    if let Some(procs) = &p.cgroup_procs {
        // "0" moves the writing process.
        write_file(procs, b"0")?;
    }
    if let Some(context) = &p.selinux_context {
        // The attribute is per thread; the child has one thread.
        static ATTR_EXEC: &[u8] = b"/proc/thread-self/attr/exec\0";
        // SAFETY: ATTR_EXEC is NUL-terminated; see write_file.
        unsafe {
            let fd = libc::open(ATTR_EXEC.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let bytes = context.as_bytes();
            let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n < 0 {
                return Err(err);
            }
        }
    }
    // SAFETY: plain system calls with valid arguments.
    unsafe {
        if let Some(ids) = p.user {
            if libc::setgroups(p.groups.len(), p.groups.as_ptr()) != 0
                || libc::setresgid(ids.gid, ids.gid, ids.gid) != 0
                || libc::setresuid(ids.uid, ids.uid, ids.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The supervisor died before the line above: do not outlive it.
        if libc::getppid() != p.parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // Sockets QEMU creates: owner and group (the kiosk, the gateway) only.
        libc::umask(0o007);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    Ok(())
}

/// Sends SIGKILL to `pid`; a process already gone is fine.
pub fn kill(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Sends SIGTERM to `pid`; a process already gone is fine.
pub fn terminate(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// `chown path uid:gid`.
pub fn chown(path: &Path, ids: Ids) -> Result<()> {
    std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
        .with_context(|| format!("chown {}:{} {}", ids.uid, ids.gid, path.display()))
}
