//! The guest lifecycle (P5): both guests start at start-up; a guest whose
//! disk image is missing is not started (`no-disk`, looked at again every
//! [`DISK_RECHECK`]; neither a crash nor off); a crashed guest
//! is restarted with back-off; a guest that powered itself off stays off;
//! when both are off the power-off action runs; SIGTERM presses both ACPI
//! power buttons, waits (bounded), then pulls the plug. The clipboard
//! gateway (`[clipboard]`) runs beside the guests, as its own user in its
//! own cgroup, is restarted with back-off whenever it ends, and is stopped
//! at host shutdown and before the power-off action.
//!
//! One thread per guest ([`runner`]) starts its QEMU, watches it and decides
//! what its exit means; one thread ([`gateway_runner`]) does the same for
//! the gateway; the main thread ([`run`]) owns the state table, publishes it
//! on the control socket and handles signals. They talk over one channel of
//! [`Msg`].

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cgroup;
use crate::config::{Accel, Boot, Config, Guest, Side, Supervisor};
use crate::control::{self, GatewayStatus, GuestStatus, Phase};
use crate::gateway::{self, GatewayPaths};
use crate::launch::{self, Spec};
use crate::lifecycle::{self, ExitKind, GatewayState, GuestState};
use crate::log;
use crate::qemu::{self, GuestPaths};
use crate::qmp::{Commander, Session, Shutdown};
use crate::signals;
use crate::users::{self, Account, Ids};

/// Hardware virtualisation.
const KVM_DEVICE: &str = "/dev/kvm";
/// How long swtpm may take to create its control socket.
const SWTPM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started QEMU may take to answer QMP.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a runner looks whether its QEMU has exited.
const POLL: Duration = Duration::from_millis(100);
/// After the shutdown timeout, how long killed QEMUs get to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How long the power-off action may run.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of QEMU's log quoted when it fails.
const LOG_TAIL: usize = 4;
/// How long the gateway has to end after SIGTERM before it is killed.
const GATEWAY_STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a guest without its disk image looks again. On an appliance
/// the disk only arrives by flashing, which reboots, so this rarely
/// matters; but the runner has to stay alive anyway (it answers a host
/// shutdown with `stopped`, and its end must not read as the guest's), and
/// waiting in steps of one `stat` is the simplest way to do that which also
/// starts the guest, without a reboot, once a disk is put there.
const DISK_RECHECK: Duration = Duration::from_secs(10);

/// Runner → main thread.
enum Msg {
    State(Side, GuestState),
    Restarted(Side),
    Gateway(GatewayState),
    GatewayRestarted,
    Signal(i32),
}

/// Shared between the main thread and the runners.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    kill_now: AtomicBool,
    wake: (Mutex<()>, Condvar),
    commanders: Mutex<BTreeMap<Side, Commander>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sleeps up to `delay`; returns early when a host shutdown begins.
    fn sleep(&self, delay: Duration) {
        let deadline = Instant::now() + delay;
        let mut guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            guard = self
                .wake
                .1
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.1.notify_all();
    }

    fn power_down(&self, side: Side) {
        if let Some(c) = self
            .commanders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&side)
        {
            match c.system_powerdown() {
                Ok(()) => log::info(format!("{side}: ACPI power-down sent")),
                Err(e) => log::warn(format!("{side}: sending ACPI power-down: {e}")),
            }
        }
    }
}

/// What a runner needs that the main thread worked out once.
#[derive(Clone)]
struct RunnerContext {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    sup: Supervisor,
    user: Option<Account>,
    selinux: bool,
    cgroup_root: Option<PathBuf>,
    /// Who gets the guest's vdagent and display sockets after each start.
    socket_groups: SocketGroups,
}

/// The groups the sockets of each new QEMU are handed to, each socket alone
/// to its one client's group; `None`: that socket stays QEMU's user's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SocketGroups {
    /// The clipboard gateway's: `vdagent.sock`.
    gateway: Option<u32>,
    /// The kiosk's (`supervisor.display_group`): `display.sock`.
    kiosk: Option<u32>,
}

/// What the gateway runner needs, worked out once.
struct GatewayPlan {
    program: PathBuf,
    args: Vec<String>,
    user: Option<Account>,
    cpu_percent: u32,
    memory_max_mib: u64,
}

struct GatewayContext {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    cgroup_root: Option<PathBuf>,
    strict_limits: bool,
}

/// Runs the supervisor until the host powers off or it is told to stop.
/// Returns after the power-off action ran (both guests off) or after a
/// host shutdown (SIGTERM) stopped both guests.
pub fn run(config: Config) -> Result<()> {
    signals::block();
    let sup = config.supervisor.clone();
    let root = users::is_root();
    if !root {
        log::warn("not running as root: QEMU runs as the supervisor's own user");
    }
    let selinux = launch::selinux_enabled();
    if selinux {
        log::info("SELinux enabled: each QEMU runs in system_u:system_r:airlock_vm_<side>_t:s0");
    } else {
        log::warn("SELinux is not enabled: QEMU runs without an SELinux domain transition");
    }
    let cgroup_root = match cgroup::prepare_root(&sup.cgroup) {
        Ok(dir) => {
            log::info(format!("guest cgroups under {}", dir.display()));
            Some(dir)
        }
        Err(e) if sup.strict_limits => {
            return Err(e.context("setting up cgroups (strict_limits is on)"))
        }
        Err(e) => {
            log::warn(format!(
                "guests run without their own cgroups and limits: {e:#}"
            ));
            None
        }
    };

    fs::create_dir_all(&sup.run_dir)
        .with_context(|| format!("creating {}", sup.run_dir.display()))?;
    fs::set_permissions(&sup.run_dir, fs::Permissions::from_mode(0o755))?;
    let mut users_by_side = BTreeMap::new();
    for side in Side::ALL {
        let guest = config.guest(side);
        let user = if root {
            Some(users::lookup_account(&guest.user)?)
        } else {
            None
        };
        prepare_guest_files(guest, &sup, user.as_ref().map(|a| a.ids))?;
        users_by_side.insert(side, user);
    }

    let control_gid = match users::lookup_group(&sup.control_group) {
        Ok(Some(gid)) => Some(gid),
        Ok(None) => {
            log::warn(format!(
                "group {:?} does not exist: the control socket is root-only",
                sup.control_group
            ));
            None
        }
        Err(e) => {
            log::warn(format!("the control socket is root-only: {e:#}"));
            None
        }
    };
    let control = control::Server::bind(&sup.control_socket(), control_gid)?;
    // The kiosk runs as its own unit, not under the supervisor; all it gets
    // from here is each guest's display socket, handed to its group.
    let kiosk_gid = if !root {
        None
    } else {
        match users::lookup_group(&sup.display_group) {
            Ok(Some(gid)) => Some(gid),
            Ok(None) => {
                log::warn(format!(
                    "group {:?} does not exist: the guests' display sockets stay their QEMU's own, no kiosk can show them",
                    sup.display_group
                ));
                None
            }
            Err(e) => {
                log::warn(format!(
                    "the guests' display sockets stay their QEMU's own: {e:#}"
                ));
                None
            }
        }
    };

    // The gateway, once both sides' run directories exist (it connects to
    // the vdagent sockets in them as QEMU creates them). A gateway that
    // cannot run leaves the guests running without a clipboard.
    let gateway_plan: Result<Option<GatewayPlan>, String> = if !config.clipboard.enabled {
        log::info("clipboard gateway disabled (clipboard.enabled = false)");
        Ok(None)
    } else {
        prepare_gateway(&config, root).map(Some).map_err(|e| {
            log::error(format!(
                "clipboard gateway cannot run: {e:#}; the guests run without a clipboard"
            ));
            format!("{e:#}")
        })
    };
    let mut gateway_status = GatewayStatus {
        state: match &gateway_plan {
            Ok(None) => GatewayState::Disabled,
            Err(reason) => GatewayState::Unavailable {
                reason: reason.clone(),
            },
            Ok(Some(_)) => GatewayState::Starting,
        },
        restarts: 0,
    };
    let gateway_plan = gateway_plan.ok().flatten();
    let socket_groups = SocketGroups {
        gateway: gateway_plan
            .as_ref()
            .and_then(|p| p.user.as_ref())
            .map(|a| a.ids.gid),
        kiosk: kiosk_gid,
    };

    let (tx, rx) = mpsc::channel();
    signals::forward(tx.clone(), Msg::Signal);
    let shared = Arc::new(Shared::default());
    let mut runners = Vec::new();
    let mut states: BTreeMap<Side, GuestStatus> = Side::ALL
        .iter()
        .map(|s| {
            (
                *s,
                GuestStatus {
                    state: GuestState::Starting,
                    restarts: 0,
                },
            )
        })
        .collect();
    for side in Side::ALL {
        let ctx = RunnerContext {
            tx: tx.clone(),
            shared: shared.clone(),
            sup: sup.clone(),
            user: users_by_side[&side].clone(),
            selinux,
            cgroup_root: cgroup_root.clone(),
            socket_groups,
        };
        let guest = config.guest(side).clone();
        runners.push(
            thread::Builder::new()
                .name(format!("guest-{side}"))
                .spawn(move || runner(guest, ctx))?,
        );
    }
    // The gateway's runner is the thread that spawns it, so it must live as
    // long as the gateway (the parent-death signal follows the thread).
    let mut gateway_thread = match gateway_plan {
        Some(plan) => {
            let ctx = GatewayContext {
                tx: tx.clone(),
                shared: shared.clone(),
                cgroup_root: cgroup_root.clone(),
                strict_limits: sup.strict_limits,
            };
            Some(
                thread::Builder::new()
                    .name("gateway".into())
                    .spawn(move || gateway_runner(plan, ctx))?,
            )
        }
        None => None,
    };
    let stop_gateway = |thread: &mut Option<thread::JoinHandle<()>>| {
        if let Some(t) = thread.take() {
            shared.begin_stop();
            let _ = t.join();
        }
    };
    drop(tx);
    let mut phase = Phase::Running;
    control.publish(&control::status(phase, &states, &gateway_status));
    sd_notify("READY=1\nSTATUS=starting both guests");

    let mut deadline: Option<Instant> = None;
    let result = loop {
        let msg = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match msg {
            Ok(Msg::State(side, state)) => {
                let entry = states.get_mut(&side).expect("both sides");
                entry.state = state;
                if phase == Phase::Running
                    && control::status(phase, &states, &gateway_status).both_off
                {
                    phase = Phase::PoweringOff;
                }
                control.publish(&control::status(phase, &states, &gateway_status));
                sd_notify(&format!("STATUS={}", describe(&states, &gateway_status)));
                if phase == Phase::PoweringOff {
                    log::info("both guests have powered off: stopping the clipboard gateway, powering the host off");
                    stop_gateway(&mut gateway_thread);
                    break run_poweroff(&sup.poweroff_command);
                }
                if phase == Phase::Stopping
                    && states
                        .values()
                        .all(|g| matches!(g.state, GuestState::Stopped | GuestState::Off))
                {
                    log::info("both guests are stopped");
                    break Ok(());
                }
            }
            Ok(Msg::Restarted(side)) => states.get_mut(&side).expect("both sides").restarts += 1,
            Ok(Msg::Gateway(state)) => {
                gateway_status.state = state;
                control.publish(&control::status(phase, &states, &gateway_status));
            }
            Ok(Msg::GatewayRestarted) => gateway_status.restarts += 1,
            Ok(Msg::Signal(signal)) if phase == Phase::Running => {
                log::info(format!(
                    "signal {signal}: host shutdown, powering both guests down (up to {:?})",
                    sup.shutdown_timeout
                ));
                phase = Phase::Stopping;
                shared.begin_stop();
                for side in Side::ALL {
                    shared.power_down(side);
                }
                deadline = Some(Instant::now() + sup.shutdown_timeout);
                control.publish(&control::status(phase, &states, &gateway_status));
                sd_notify("STOPPING=1");
            }
            Ok(Msg::Signal(signal)) => {
                log::warn(format!("signal {signal} again: killing the guests now"));
                shared.begin_stop();
                shared.kill_now.store(true, Ordering::SeqCst);
                deadline = Some(Instant::now() + KILL_GRACE);
            }
            Err(RecvTimeoutError::Timeout) if !shared.kill_now.load(Ordering::SeqCst) => {
                log::warn(format!(
                    "guests still running {:?} after ACPI power-down: killing them",
                    sup.shutdown_timeout
                ));
                shared.kill_now.store(true, Ordering::SeqCst);
                deadline = Some(Instant::now() + KILL_GRACE);
            }
            Err(RecvTimeoutError::Timeout) => {
                break Err(anyhow::anyhow!(
                    "killed guests were not reaped within {KILL_GRACE:?}"
                ))
            }
            Err(RecvTimeoutError::Disconnected) => break Ok(()),
        }
    };
    // Every runner has ended (its guest is off or stopped) except after a
    // failed stop; then the caller exits and systemd kills what is left.
    if result.is_ok() {
        stop_gateway(&mut gateway_thread);
        for r in runners {
            let _ = r.join();
        }
    }
    if let Some(root) = &cgroup_root {
        for name in Side::ALL
            .map(|side| format!("guest-{side}"))
            .into_iter()
            .chain([gateway::CGROUP.to_owned()])
        {
            // Only succeeds once empty.
            let _ = fs::remove_dir(root.join(name));
        }
    }
    result
}

/// `classified: running, general: off, clipboard: running`.
fn describe(states: &BTreeMap<Side, GuestStatus>, gateway: &GatewayStatus) -> String {
    fn name<T: serde::Serialize>(state: &T) -> String {
        serde_json::to_value(state)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
    states
        .iter()
        .map(|(side, g)| format!("{side}: {}", name(&g.state)))
        .chain([format!("clipboard: {}", name(&gateway.state))])
        .collect::<Vec<_>>()
        .join(", ")
}

/// The side's run and log directories, and the UEFI variable store.
fn prepare_guest_files(guest: &Guest, sup: &Supervisor, user: Option<Ids>) -> Result<()> {
    let paths = GuestPaths::new(sup, guest.side);
    for dir in [&paths.run_dir, &paths.config_dir, &paths.log_dir] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // QEMU creates its sockets in the run dir (0770, umask 007). Others may
    // pass through but not list it: the gateway reaches the vdagent socket
    // and the kiosk the display socket, each handed to its group after each
    // start, and nothing else.
    fs::set_permissions(
        &paths.run_dir,
        fs::Permissions::from_mode(qemu::SIDE_RUN_DIR_MODE),
    )?;
    fs::set_permissions(&paths.config_dir, fs::Permissions::from_mode(0o750))?;
    fs::set_permissions(&paths.log_dir, fs::Permissions::from_mode(0o750))?;
    if let Some(ids) = user {
        launch::chown(&paths.run_dir, ids)?;
        // QEMU may read its command line and reach the serial log; the
        // directories stay root's.
        launch::chown(
            &paths.config_dir,
            Ids {
                uid: 0,
                gid: ids.gid,
            },
        )?;
        launch::chown(
            &paths.log_dir,
            Ids {
                uid: 0,
                gid: ids.gid,
            },
        )?;
    }
    if sup.test_mode {
        // QEMU opens the serial log itself.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&paths.serial_log)
            .with_context(|| format!("creating {}", paths.serial_log.display()))?;
        drop(log);
        if let Some(ids) = user {
            launch::chown(&paths.serial_log, ids)?;
        }
    }
    if let Boot::Firmware(fw) = &guest.boot {
        if !fw.vars.exists() {
            fs::copy(&fw.vars_template, &fw.vars).with_context(|| {
                format!(
                    "copying UEFI variables {} to {}",
                    fw.vars_template.display(),
                    fw.vars.display()
                )
            })?;
            fs::set_permissions(&fw.vars, fs::Permissions::from_mode(0o600))?;
            if let Some(ids) = user {
                launch::chown(&fw.vars, ids)?;
            }
            log::info(format!(
                "{}: new UEFI variable store {}",
                guest.side,
                fw.vars.display()
            ));
        }
    }
    if guest.tpm {
        fs::create_dir_all(&paths.tpm_state)
            .with_context(|| format!("creating {}", paths.tpm_state.display()))?;
        fs::set_permissions(&paths.tpm_state, fs::Permissions::from_mode(0o700))?;
        if let Some(ids) = user {
            launch::chown(&paths.tpm_state, ids)?;
        }
    }
    Ok(())
}

/// One guest's life: start, watch, restart or stay off.
fn runner(guest: Guest, ctx: RunnerContext) {
    let side = guest.side;
    let send = |state: GuestState| {
        let _ = ctx.tx.send(Msg::State(side, state));
    };
    let mut crashes = lifecycle::Crashes::default();
    // Whether `no-disk` is what was last reported (logged once per change).
    let mut no_disk = false;
    loop {
        if ctx.shared.stopping() {
            send(GuestState::Stopped);
            return;
        }
        if let Some(why) = missing_disk(&guest.disk) {
            if !no_disk {
                log::error(format!(
                    "{side}: no guest disk: {} {why}; QEMU not started (looking again every {DISK_RECHECK:?}; provision it with airlock flash --guest {side}=FILE)",
                    guest.disk.display()
                ));
                send(GuestState::NoDisk {
                    path: guest.disk.display().to_string(),
                });
                no_disk = true;
            }
            ctx.shared.sleep(DISK_RECHECK);
            continue;
        }
        if std::mem::take(&mut no_disk) {
            log::info(format!(
                "{side}: the guest disk {} is there now",
                guest.disk.display()
            ));
        }
        send(GuestState::Starting);
        let started = Instant::now();
        let outcome =
            run_once(&guest, &ctx).unwrap_or_else(|e| ExitKind::Crashed(format!("{e:#}")));
        if ctx.shared.stopping() {
            log::info(format!("{side}: QEMU ended during host shutdown"));
            send(GuestState::Stopped);
            return;
        }
        match outcome {
            ExitKind::PoweredOff => {
                log::info(format!(
                    "{side}: the guest powered itself off; it stays off"
                ));
                send(GuestState::Off);
                return;
            }
            ExitKind::Rebooted => {
                log::info(format!("{side}: the guest rebooted; starting it again"));
                crashes.reset();
            }
            ExitKind::Crashed(reason) => {
                let (in_a_row, delay) = crashes.record(started.elapsed());
                log::error(format!(
                    "{side}: guest crashed: {reason}; restart {in_a_row} in a row, in {delay:?}"
                ));
                let _ = ctx.tx.send(Msg::Restarted(side));
                send(GuestState::Restarting {
                    delay_ms: delay.as_millis() as u64,
                    reason,
                });
                ctx.shared.sleep(delay);
            }
        }
    }
}

/// Why the guest's disk image plainly cannot be used (`is missing`, `is
/// not a regular file`), or `None`. Only what `stat` shows (the supervisor
/// runs as root): any other error is left for QEMU to report, as a crash
/// with its log, rather than shown as a missing disk.
fn missing_disk(disk: &Path) -> Option<&'static str> {
    match fs::metadata(disk) {
        Ok(m) if m.is_file() => None,
        Ok(_) => Some("is not a regular file"),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Some("is missing")
        }
        Err(_) => None,
    }
}

/// Starts QEMU once and waits for it to end.
fn run_once(guest: &Guest, ctx: &RunnerContext) -> Result<ExitKind> {
    let side = guest.side;
    let paths = GuestPaths::new(&ctx.sup, side);
    let args = qemu::command_line(guest, &ctx.sup)?;
    if guest.accel == Accel::Kvm && !Path::new(KVM_DEVICE).exists() {
        // Said plainly (the kiosk shows the reason), not emulated slowly.
        bail!("KVM is not available on this PC ({KVM_DEVICE} is missing: virtualisation off in the firmware, or no kvm module)");
    }

    let cgroup_procs = match &ctx.cgroup_root {
        Some(root) => {
            let cg = cgroup::prepare_guest(root, side, &guest.limits, &guest.disk)?;
            log::info(format!("{side}: {}", cg.summary()));
            if ctx.sup.strict_limits && !cg.all_applied() {
                bail!("not every configured limit could be applied and strict_limits is on");
            }
            Some(cg.procs_file())
        }
        None => None,
    };
    for sock in [
        &paths.qmp,
        &paths.display,
        &paths.vdagent,
        &paths.test,
        &paths.qmp_test,
        &paths.swtpm,
    ] {
        let _ = fs::remove_file(sock);
    }
    let shown = format!("{} {}\n", ctx.sup.qemu.display(), args.join(" "));
    fs::write(paths.config_dir.join("cmdline"), &shown)
        .with_context(|| format!("writing {}", paths.config_dir.display()))?;
    let mut log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&paths.qemu_log)
        .with_context(|| format!("opening {}", paths.qemu_log.display()))?;
    let log_start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    writeln!(log_file, "airlockd: starting {side}: {}", shown.trim_end())?;

    let context = ctx.selinux.then(|| launch::vm_context(side));
    // The vTPM first: QEMU connects to it at start-up. It dies with QEMU
    // (--terminate), and is killed if it outlives it.
    let swtpm = if guest.tpm {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&paths.swtpm_log)
            .with_context(|| format!("opening {}", paths.swtpm_log.display()))?;
        let mut child = launch::spawn(Spec {
            program: ctx.sup.swtpm.clone(),
            args: qemu::swtpm_command_line(&paths),
            cgroup_procs: cgroup_procs.clone(),
            selinux_context: context.clone(),
            user: ctx.user.clone(),
            log,
        })?;
        let deadline = Instant::now() + SWTPM_TIMEOUT;
        while !paths.swtpm.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "swtpm {} before creating {}; see {}",
                    describe_status(status),
                    paths.swtpm.display(),
                    paths.swtpm_log.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "swtpm did not create {} within {SWTPM_TIMEOUT:?}",
                    paths.swtpm.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        log::info(format!("{side}: swtpm started, pid {}", child.id()));
        Some(KillOnDrop(child))
    } else {
        None
    };
    let child = launch::spawn(Spec {
        program: ctx.sup.qemu.clone(),
        args,
        cgroup_procs,
        selinux_context: context,
        user: ctx.user.clone(),
        log: log_file,
    })?;
    let pid = child.id();
    log::info(format!("{side}: QEMU started, pid {pid}"));
    let child = std::cell::RefCell::new(child);

    let session = Session::connect(&paths.qmp, QMP_TIMEOUT, || {
        matches!(child.borrow_mut().try_wait(), Ok(None))
    });
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            let mut child = child.into_inner();
            let _ = child.kill();
            let status = child.wait()?;
            let tail = log_tail(&paths.qemu_log, log_start);
            bail!(
                "QMP did not come up ({e:#}); QEMU {}; its log ends: {tail}",
                describe_status(status)
            );
        }
    };
    let commander = session.commander()?;
    ctx.shared
        .commanders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(side, commander);
    // QMP answers once every chardev and the VNC server exist, so the
    // vdagent and display sockets are there.
    for (socket, client, gid) in handovers(&paths, ctx.socket_groups) {
        match hand_over(socket, gid) {
            Ok(()) => log::info(format!(
                "{side}: {} handed to {client}'s group",
                socket.display()
            )),
            Err(e) => log::warn(format!("{side}: {client} cannot reach this guest: {e:#}")),
        }
    }
    if ctx.shared.stopping() {
        ctx.shared.power_down(side);
    }
    let last_shutdown: Arc<Mutex<Option<Shutdown>>> = Arc::default();
    let reader = {
        let last_shutdown = last_shutdown.clone();
        thread::Builder::new()
            .name(format!("qmp-{side}"))
            .spawn(move || {
                while let Some(event) = session.next_event() {
                    if let Some(s) = event.shutdown() {
                        log::info(format!(
                            "{side}: QMP SHUTDOWN (guest: {}, reason: {})",
                            s.guest, s.reason
                        ));
                        *last_shutdown.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                    } else if matches!(
                        event.name.as_str(),
                        "POWERDOWN" | "RESET" | "GUEST_PANICKED" | "STOP"
                    ) {
                        log::info(format!("{side}: QMP {}", event.name));
                    }
                }
            })?
    };
    let _ = ctx.tx.send(Msg::State(side, GuestState::Running { pid }));

    let mut child: Child = child.into_inner();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if ctx.shared.kill_now.load(Ordering::SeqCst) {
            let _ = child.kill();
        }
        thread::sleep(POLL);
    };
    let _ = reader.join();
    drop(swtpm);
    ctx.shared
        .commanders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&side);
    let shutdown = last_shutdown
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    log::info(format!(
        "{side}: QEMU (pid {pid}) {}",
        describe_status(status)
    ));
    let kind = lifecycle::classify(status.code(), status.signal(), shutdown.as_ref());
    Ok(match kind {
        ExitKind::Crashed(reason) if status.code().is_some_and(|c| c != 0) => {
            ExitKind::Crashed(format!(
                "{reason}; its log ends: {}",
                log_tail(&paths.qemu_log, log_start)
            ))
        }
        other => other,
    })
}

/// The sockets of a guest's QEMU handed over after each start, with their
/// one client and its group: `vdagent.sock` to the clipboard gateway's
/// group, `display.sock` to the kiosk's. QMP, swtpm's and the test ports
/// never leave QEMU's user.
fn handovers(paths: &GuestPaths, groups: SocketGroups) -> Vec<(&Path, &'static str, u32)> {
    [
        (&paths.vdagent, "the clipboard gateway", groups.gateway),
        (&paths.display, "the kiosk", groups.kiosk),
    ]
    .into_iter()
    .filter_map(|(socket, client, gid)| Some((socket.as_path(), client, gid?)))
    .collect()
}

/// Gives one client's group (alone) access to a new socket of a guest's
/// QEMU: group `gid`, mode 0660 ([`qemu::HANDED_SOCKET_MODE`]), the owner
/// stays QEMU's user.
fn hand_over(socket: &Path, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(socket, None, Some(gid))
        .with_context(|| format!("chgrp {gid} {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(qemu::HANDED_SOCKET_MODE))
        .with_context(|| format!("chmod {:o} {}", qemu::HANDED_SOCKET_MODE, socket.display()))
}

/// Checks that the gateway can run here and prepares its files: program
/// present, its user known, the audit log its own, and in confirm mode its
/// run directory. (The sanitiser is the gateway's business: the supervisor
/// never touches it, not even to look.)
fn prepare_gateway(config: &Config, root: bool) -> Result<GatewayPlan> {
    let paths = GatewayPaths::new(&config.supervisor);
    if !paths.program.is_file() {
        bail!("{} is missing", paths.program.display());
    }
    let user = if root {
        Some(users::lookup_account(&config.clipboard.user)?)
    } else {
        None
    };
    let ids = user.as_ref().map(|a| a.ids);
    prepare_audit_log(&paths.audit_log, ids)?;
    // Confirm mode: the socket's directory, shared with the kiosk through
    // the confirm group (pass through, no listing), or private without it.
    // Not root: no group (the supervisor could not give it away).
    let confirm_gid = if root {
        gateway::lookup_confirm_group(config)
    } else {
        None
    };
    if config.clipboard.confirm {
        let dir = &paths.confirm_dir;
        let (mode, owner) = gateway::confirm_dir_access(ids, confirm_gid);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(
            dir,
            fs::Permissions::from_mode(gateway::CONFIRM_DIR_PRIVATE_MODE),
        )?;
        if let Some(owner) = owner {
            launch::chown(dir, owner)?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", dir.display()))?;
    }
    let args = gateway::command_line(config, confirm_gid);
    log::info(format!(
        "clipboard gateway: {} {} (as {})",
        paths.program.display(),
        args.join(" "),
        user.as_ref()
            .map_or("the supervisor's user", |a| a.name.as_str())
    ));
    Ok(GatewayPlan {
        program: paths.program,
        args,
        user,
        cpu_percent: config.clipboard.cpu_percent,
        memory_max_mib: config.clipboard.memory_max_mib,
    })
}

/// The audit log (append-only for the gateway): created `0640` for the
/// gateway's user if missing (SELinux lets only the supervisor set its owner).
fn prepare_audit_log(path: &Path, owner: Option<Ids>) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => bail!("{} is not a regular file", path.display()),
        Ok(m) => {
            if let Some(ids) = owner.filter(|ids| (m.uid(), m.gid()) != (ids.uid, ids.gid)) {
                log::warn(format!(
                    "{} belonged to {}:{}; giving it to the gateway's user",
                    path.display(),
                    m.uid(),
                    m.gid()
                ));
                launch::chown(path, ids)?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            if let Some(ids) = owner {
                launch::chown(path, ids)?;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    }
    Ok(())
}

/// The gateway's life: start, watch, restart with back-off; stop when the
/// supervisor stops.
fn gateway_runner(plan: GatewayPlan, ctx: GatewayContext) {
    let send = |state: GatewayState| {
        let _ = ctx.tx.send(Msg::Gateway(state));
    };
    let mut crashes = lifecycle::Crashes::default();
    loop {
        if ctx.shared.stopping() {
            send(GatewayState::Stopped);
            return;
        }
        send(GatewayState::Starting);
        let started = Instant::now();
        let reason = match run_gateway_once(&plan, &ctx) {
            Ok(None) => {
                send(GatewayState::Stopped);
                return;
            }
            Ok(Some(reason)) => reason,
            Err(e) => format!("{e:#}"),
        };
        if let Some(root) = &ctx.cgroup_root {
            // A sanitiser it left behind.
            cgroup::kill_all(&root.join(gateway::CGROUP));
        }
        if ctx.shared.stopping() {
            send(GatewayState::Stopped);
            return;
        }
        let (in_a_row, delay) = crashes.record(started.elapsed());
        log::error(format!(
            "clipboard gateway: {reason}; restart {in_a_row} in a row, in {delay:?}"
        ));
        let _ = ctx.tx.send(Msg::GatewayRestarted);
        send(GatewayState::Restarting {
            delay_ms: delay.as_millis() as u64,
            reason,
        });
        ctx.shared.sleep(delay);
    }
}

/// Starts the gateway once and waits for it to end (`Some(why)`) or for
/// the supervisor to stop (`None`: stopped on purpose).
fn run_gateway_once(plan: &GatewayPlan, ctx: &GatewayContext) -> Result<Option<String>> {
    let cgroup_procs = match &ctx.cgroup_root {
        Some(root) => {
            let cg = cgroup::prepare_gateway(root, plan.cpu_percent, plan.memory_max_mib)?;
            log::info(format!("clipboard gateway: {}", cg.summary()));
            if ctx.strict_limits && !cg.all_applied() {
                bail!("not every configured limit could be applied and strict_limits is on");
            }
            Some(cg.procs_file())
        }
        None => None,
    };
    // Its log lines go where the supervisor's go (the journal).
    let log = File::from(
        std::os::fd::AsFd::as_fd(&std::io::stderr())
            .try_clone_to_owned()
            .context("duplicating stderr")?,
    );
    let mut child = launch::spawn(Spec {
        program: plan.program.clone(),
        args: plan.args.clone(),
        cgroup_procs,
        // Its domain comes from the type transition on its program's type
        // (airlock_gateway_exec_t → airlock_gateway_t), not from us; and no
        // NoNewPrivileges, so that its own transition to the sanitiser's
        // domain is allowed (the sanitiser sets it on itself).
        selinux_context: None,
        user: plan.user.clone(),
        log,
    })?;
    let pid = child.id();
    log::info(format!("clipboard gateway started, pid {pid}"));
    let _ = ctx.tx.send(Msg::Gateway(GatewayState::Running { pid }));
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(format!(
                "the gateway (pid {pid}) {}",
                describe_status(status)
            )));
        }
        if ctx.shared.stopping() {
            launch::terminate(pid as i32);
            let deadline = Instant::now() + GATEWAY_STOP_GRACE;
            while child.try_wait()?.is_none() {
                if Instant::now() >= deadline {
                    log::warn(format!("clipboard gateway (pid {pid}) still runs {GATEWAY_STOP_GRACE:?} after SIGTERM: killing it"));
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            log::info(format!("clipboard gateway (pid {pid}) stopped"));
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

/// A helper process (swtpm) that must not outlive its QEMU.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last lines QEMU wrote to its log since `from`.
fn log_tail(path: &Path, from: u64) -> String {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) => return format!("(could not read {}: {e})", path.display()),
    };
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("airlockd: "))
        .collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
    if tail.is_empty() {
        "(nothing)".into()
    } else {
        tail.join(" | ")
    }
}

/// Runs the power-off action and waits (bounded) for it.
fn run_poweroff(command: &[String]) -> Result<()> {
    log::info(format!("running {}", command.join(" ")));
    let mut child = std::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting the power-off action {}", command.join(" ")))?;
    let deadline = Instant::now() + POWEROFF_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!(
                "the power-off action {} {}",
                command.join(" "),
                describe_status(status)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!(
                "the power-off action {} did not finish within {POWEROFF_TIMEOUT:?}",
                command.join(" ")
            );
        }
        thread::sleep(POLL);
    }
}

/// Tells systemd about readiness and status (`Type=notify`); a no-op
/// outside systemd.
fn sd_notify(message: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    if let (Ok(addr), Ok(sock)) = (addr, UnixDatagram::unbound()) {
        let _ = sock.send_to_addr(message.as_bytes(), &addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixListener;

    fn paths_in(dir: &Path) -> GuestPaths {
        let text = format!(
            "[supervisor]\ntest_mode = true\nrun_dir = \"{}\"\n{}",
            dir.display(),
            config::tests::MINIMAL
        );
        GuestPaths::new(
            &config::parse("t.toml", &text).unwrap().supervisor,
            Side::General,
        )
    }

    #[test]
    fn a_disk_is_a_regular_file_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("windows.qcow2");
        assert_eq!(missing_disk(&disk), Some("is missing"));
        assert_eq!(missing_disk(&disk.join("below-a-file")), Some("is missing"));
        fs::create_dir(&disk).unwrap();
        assert_eq!(missing_disk(&disk), Some("is not a regular file"));
        fs::remove_dir(&disk).unwrap();
        fs::write(&disk, b"").unwrap();
        assert_eq!(missing_disk(&disk), None);
        // A symlink is followed: what counts is the file QEMU would open.
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&disk, &link).unwrap();
        assert_eq!(missing_disk(&link), None);
        fs::remove_file(&disk).unwrap();
        assert_eq!(missing_disk(&link), Some("is missing"));
        assert_eq!(missing_disk(&disk.join("below-a-file")), Some("is missing"));
    }

    /// A guest without its disk: the runner reports `no-disk` once, never
    /// starts QEMU (here a program that would leave a mark), counts no
    /// crash, and answers a host shutdown with `stopped`; two such guests
    /// never make `both_off`.
    #[test]
    fn a_missing_disk_neither_starts_qemu_nor_counts_as_off() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("qemu-ran");
        let fake_qemu = dir.path().join("qemu");
        fs::write(
            &fake_qemu,
            format!("#!/bin/sh\ntouch {}\nexit 1\n", mark.display()),
        )
        .unwrap();
        fs::set_permissions(&fake_qemu, fs::Permissions::from_mode(0o755)).unwrap();
        let text = format!(
            "[supervisor]\ntest_mode = true\nrun_dir = \"{0}/run\"\nstate_dir = \"{0}/state\"\nlog_dir = \"{0}/log\"\nqemu = \"{1}\"\n\
             [guest.classified]\ndisk = \"{0}/state/classified/disk/windows.qcow2\"\naccel = \"tcg\"\n\
             [guest.general]\ndisk = \"{0}/state/general/disk/windows.qcow2\"\naccel = \"tcg\"\n",
            dir.path().display(),
            fake_qemu.display()
        );
        let config = config::parse("t.toml", &text).unwrap();
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let guest = config.guest(Side::General).clone();
        let disk = guest.disk.clone();
        // Everything else QEMU's start needs is there: were it started, it would leave its mark.
        let paths = GuestPaths::new(&config.supervisor, Side::General);
        for d in [&paths.run_dir, &paths.config_dir, &paths.log_dir] {
            fs::create_dir_all(d).unwrap();
        }
        let ctx = RunnerContext {
            tx,
            shared: shared.clone(),
            sup: config.supervisor.clone(),
            user: None,
            selinux: false,
            cgroup_root: None,
            socket_groups: SocketGroups::default(),
        };
        let thread = thread::spawn(move || runner(guest, ctx));
        let first = rx.recv_timeout(Duration::from_secs(10)).expect("a state");
        let Msg::State(Side::General, state) = first else {
            panic!("not a guest state")
        };
        assert_eq!(
            state,
            GuestState::NoDisk {
                path: disk.display().to_string()
            }
        );
        // It waits (DISK_RECHECK) without another word and without QEMU.
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(300)),
            Err(RecvTimeoutError::Timeout)
        ));
        assert!(!mark.exists(), "QEMU was started");
        shared.begin_stop();
        let Ok(Msg::State(Side::General, GuestState::Stopped)) =
            rx.recv_timeout(Duration::from_secs(10))
        else {
            panic!("no `stopped` after the host shutdown began")
        };
        thread.join().unwrap();
        assert!(
            rx.try_recv().is_err(),
            "nothing after `stopped`: no restart counted"
        );
        assert!(!mark.exists(), "QEMU was started");

        let no_disk = |side: Side| GuestStatus {
            state: GuestState::NoDisk {
                path: format!("/var/lib/airlock/{side}/disk/w"),
            },
            restarts: 0,
        };
        let states = BTreeMap::from([
            (Side::Classified, no_disk(Side::Classified)),
            (Side::General, no_disk(Side::General)),
        ]);
        let status = control::status(
            Phase::Running,
            &states,
            &GatewayStatus {
                state: GatewayState::Disabled,
                restarts: 0,
            },
        );
        assert!(!status.both_off && !status.ready);
        assert_eq!(
            describe(&states, &status.gateway),
            "classified: no-disk, general: no-disk, clipboard: disabled"
        );
    }

    /// Each socket to its one client's group, and nothing else of the guest.
    #[test]
    fn vdagent_goes_to_the_gateway_and_display_to_the_kiosk() {
        let paths = paths_in(Path::new("/run/airlock"));
        let both = handovers(
            &paths,
            SocketGroups {
                gateway: Some(991),
                kiosk: Some(992),
            },
        );
        assert_eq!(
            both,
            vec![
                (
                    Path::new("/run/airlock/general/vdagent.sock"),
                    "the clipboard gateway",
                    991
                ),
                (
                    Path::new("/run/airlock/general/display.sock"),
                    "the kiosk",
                    992
                ),
            ]
        );
        // A client that is not there (disabled gateway, missing group) gets nothing.
        assert_eq!(
            handovers(
                &paths,
                SocketGroups {
                    gateway: None,
                    kiosk: Some(992)
                }
            ),
            vec![(paths.display.as_path(), "the kiosk", 992)]
        );
        assert_eq!(
            handovers(
                &paths,
                SocketGroups {
                    gateway: Some(991),
                    kiosk: None
                }
            ),
            vec![(paths.vdagent.as_path(), "the clipboard gateway", 991)]
        );
        assert!(handovers(&paths, SocketGroups::default()).is_empty());
    }

    /// On real sockets made as QEMU makes them (0770): the handed ones
    /// become 0660 of the client's group, QMP stays as it was. (Our own
    /// group stands in for the client's: no root needed.)
    #[test]
    fn hand_over_sets_group_and_mode_of_those_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths_in(dir.path());
        fs::create_dir_all(&paths.run_dir).unwrap();
        let _listeners: Vec<UnixListener> = [&paths.qmp, &paths.display, &paths.vdagent]
            .into_iter()
            .map(|p| {
                let l = UnixListener::bind(p).unwrap();
                fs::set_permissions(p, fs::Permissions::from_mode(0o770)).unwrap();
                l
            })
            .collect();
        let gid = fs::metadata(dir.path()).unwrap().gid();
        for (socket, _, gid) in handovers(
            &paths,
            SocketGroups {
                gateway: Some(gid),
                kiosk: Some(gid),
            },
        ) {
            hand_over(socket, gid).unwrap();
        }
        for socket in [&paths.display, &paths.vdagent] {
            let m = fs::metadata(socket).unwrap();
            assert!(m.file_type().is_socket());
            assert_eq!(
                (m.gid(), m.mode() & 0o7777),
                (gid, 0o660),
                "{}",
                socket.display()
            );
        }
        assert_eq!(
            fs::metadata(&paths.qmp).unwrap().mode() & 0o7777,
            0o770,
            "QMP is never handed over"
        );
        // A socket QEMU did not create is an error (logged; the guest runs on).
        let err = hand_over(&paths.run_dir.join("missing.sock"), gid).unwrap_err();
        assert!(format!("{err:#}").contains("missing.sock"), "{err:#}");
    }
}
