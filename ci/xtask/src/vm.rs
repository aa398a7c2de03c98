//! One running QEMU: [`Vm`] spawns `qemu-system-x86_64` with the arguments
//! `airlock::qemu::qemu_args` decides, in its own process group, with its
//! console log, QEMU's own log and the QMP and agent sockets in a private
//! temp dir; and it kills the whole group when dropped.
//!
//! A `Vm` is one power-on. Booting the same disk again (after a clean
//! shutdown or [`Vm::kill`]) is a new `Vm` on the same [`VmConfig`] — see
//! `machine::Machine`, which also keeps the firmware's variables (boot
//! entries, boot counting) across those boots. QEMU locks the disk and the
//! variable store, so two `Vm`s of one machine cannot run at once.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use airlock::qemu::{qemu_args, Accel, Serial, VmConfig};
use airlock_test_agent::AgentClient;
use anyhow::{bail, Context, Result};

use crate::console;
use crate::qmp::Qmp;

/// QEMU's program name, unless `AIRLOCK_QEMU` names another.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("AIRLOCK_QEMU").map_or_else(|| "qemu-system-x86_64".into(), PathBuf::from)
}

/// How long QEMU may take to start answering QMP.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting to an existing socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a QEMU that hung up on QMP at startup gets to finish exiting.
const EXIT_SETTLE: Duration = Duration::from_secs(2);

/// Pause between two looks at the serial log or at QEMU's state.
const POLL: Duration = Duration::from_millis(100);

/// Lines of the serial console quoted in errors.
const SERIAL_TAIL: usize = 40;

/// Lines of QEMU's own output quoted in errors.
const QEMU_LOG_TAIL: usize = 15;

struct Process {
    child: Child,
    /// Set once QEMU was reaped.
    status: Option<ExitStatus>,
}

/// A running (or finished) QEMU; see the module documentation.
pub struct Vm {
    dir: tempfile::TempDir,
    pid: i32,
    process: Mutex<Process>,
    qmp: Option<Qmp>,
    agent: Option<AgentClient>,
    /// The machine's TPM, if it has one; stopped after QEMU (field order).
    _tpm: Option<crate::swtpm::Swtpm>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("pid", &self.pid)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Vm {
    /// Starts QEMU for `cfg` and waits until it answers QMP. The serial
    /// console, QMP socket and agent socket of `cfg` are replaced by files in
    /// the VM's own temp dir.
    pub fn start(cfg: VmConfig) -> Result<Vm> {
        Vm::start_in_netns(cfg, None)
    }

    /// Like [`start`](Self::start), with QEMU in the network namespace
    /// `netns` (a file such as `/run/netns/NAME`): its `-netdev tap`
    /// devices are then that namespace's, and none appears in the host's.
    /// Its other sockets are path-named Unix sockets, which work across
    /// network namespaces. Such a QEMU is killed when the thread that
    /// started it ends (`PR_SET_PDEATHSIG`): start it from the thread that
    /// owns the `Vm`.
    pub fn start_in_netns(mut cfg: VmConfig, netns: Option<&Path>) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix("airlock-vm-")
            .tempdir()
            .context("creating the VM's temp dir")?;
        let serial = dir.path().join("serial.log");
        cfg.serial = Serial::File(serial.clone());
        cfg.qmp_socket = Some(dir.path().join("qmp.sock"));
        cfg.agent_socket = Some(dir.path().join("agent.sock"));
        File::create(&serial).with_context(|| format!("creating {}", serial.display()))?;
        let log_path = dir.path().join("qemu.log");
        let mut log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

        let qemu = qemu_binary();
        let mut args = qemu_args(&cfg);
        // Why the machine reset, if it does: QEMU logs "Triple fault" and
        // the CPU state for every reset (a handful of lines per boot).
        args.push("-d".into());
        args.push("cpu_reset".into());
        args.push("-D".into());
        args.push(dir.path().join("qemu-debug.log").into());
        let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        writeln!(log, "$ {} {}", qemu.display(), shown.join(" ")).context("writing qemu.log")?;
        if let Some(ns) = netns {
            writeln!(log, "# in network namespace {}", ns.display()).context("writing qemu.log")?;
        }
        // A TPM: its swtpm keeps its state in the socket's directory
        // (`Machine::with_tpm`) and must listen before QEMU connects.
        let tpm = match &cfg.tpm_socket {
            Some(socket) => Some(crate::swtpm::Swtpm::start(
                socket.parent().context("TPM socket without a directory")?,
            )?),
            None => None,
        };
        let mut command = Command::new(&qemu);
        let ns_file = netns
            .map(|ns| {
                File::open(ns)
                    .with_context(|| format!("opening network namespace {}", ns.display()))
            })
            .transpose()?;
        if let Some(ns) = &ns_file {
            let fd = ns.as_raw_fd();
            // SAFETY: setns(2) and prctl(2) are async-signal-safe and touch
            // no memory of ours; `fd` stays open until spawn returns (it is
            // CLOEXEC, so QEMU does not inherit it).
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // A suite killed outright (no Drop) takes this QEMU with
                    // it, so nothing keeps the namespace and its taps alive;
                    // the next run deletes the stale name.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .args(&args)
            // Its own group, so Drop can kill QEMU and anything it started.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating qemu.log")?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "{} not found: the VM tests need QEMU and OVMF (run ci/install-host-deps.sh as root)",
                    qemu.display()
                ),
                _ => anyhow::Error::new(e).context(format!("starting {}", qemu.display())),
            })?;
        let pid = i32::try_from(child.id()).context("QEMU's pid does not fit a pid_t")?;
        let mut vm = Vm {
            dir,
            pid,
            process: Mutex::new(Process {
                child,
                status: None,
            }),
            qmp: None,
            agent: None,
            _tpm: tpm,
        };
        let hint = match cfg.accel {
            // detect_accel's probe can pass where the real boot does not.
            Accel::Kvm => " under KVM (AIRLOCK_ACCEL=tcg forces TCG)",
            Accel::Tcg => "",
        };
        if let Err(e) = vm.connect_qmp() {
            // The error points at the logs; keep them.
            vm.dir.disable_cleanup(true);
            return Err(e.context(format!("starting QEMU{hint} for {}", cfg.disk.display())));
        }
        Ok(vm)
    }

    /// Connects QMP early, so no event of this power-on is missed.
    fn connect_qmp(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let stream = self.connect_socket("qmp.sock", deadline)?;
        match Qmp::handshake(stream, deadline) {
            Ok(qmp) => {
                self.qmp = Some(qmp);
                Ok(())
            }
            Err(e) => {
                // QEMU hangs up when it fails to start; let it finish exiting
                // so the error shows its status and last words.
                let _ = self.wait_exit(EXIT_SETTLE);
                Err(e.context(self.describe_state()))
            }
        }
    }

    /// Connects to the socket `name` in the VM's dir, retrying while QEMU
    /// has not created it yet, but only as long as QEMU runs.
    fn connect_socket(&self, name: &str, deadline: Instant) -> Result<UnixStream> {
        let socket = self.dir.path().join(name);
        loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => return Ok(stream),
                Err(e) if !self.is_running() || Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "connecting to {}; {}",
                            socket.display(),
                            self.describe_state()
                        )
                    })
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The VM's temp dir: `serial.log`, `qemu.log`, `qmp.sock`, `agent.sock`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn serial_path(&self) -> PathBuf {
        self.dir.path().join("serial.log")
    }

    /// QEMU's pid, which is also its process group id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn lock(&self) -> MutexGuard<'_, Process> {
        self.process.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// QEMU's exit status, reaping it if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut p = self.lock();
        if p.status.is_none() {
            if let Ok(Some(status)) = p.child.try_wait() {
                // Anything QEMU started dies with it.
                kill_group(self.pid);
                p.status = Some(status);
            }
        }
        p.status
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Pulls the plug: kills QEMU's process group at once, as a power cut
    /// would, and reaps it. The disk keeps whatever had reached it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.write_event_log();
        self.qmp = None;
        self.agent = None;
        let mut p = self.lock();
        if let Some(status) = p.status {
            return Ok(status);
        }
        kill_group(self.pid);
        let status = p.child.wait().context("reaping QEMU")?;
        p.status = Some(status);
        Ok(status)
    }

    /// Waits up to `timeout` for QEMU to exit (after a guest shutdown or
    /// QMP `quit`); `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                self.write_event_log();
                self.qmp = None;
                self.agent = None;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole serial console so far, without escape sequences.
    pub fn serial_log(&self) -> String {
        let raw = console::read_from(&self.serial_path(), 0).unwrap_or_default();
        String::from_utf8_lossy(&console::strip_escapes(&raw).0).into_owned()
    }

    /// Current size of the serial log, for [`wait_for_serial_from`](Self::wait_for_serial_from).
    pub fn serial_position(&self) -> u64 {
        std::fs::metadata(self.serial_path()).map_or(0, |m| m.len())
    }

    /// Waits until `pattern` appears on the serial console (escape sequences
    /// ignored). Fails at the timeout, or as soon as QEMU exits.
    pub fn wait_for_serial(&self, pattern: &str, timeout: Duration) -> Result<()> {
        self.wait_for_serial_from(0, pattern, timeout).map(drop)
    }

    /// Like [`wait_for_serial`](Self::wait_for_serial), looking only after
    /// log position `from`; returns the position just past the match.
    pub fn wait_for_serial_from(&self, from: u64, pattern: &str, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            // Looked at before reading, so output QEMU wrote before exiting counts.
            let exited = !self.is_running();
            let raw = console::read_from(&self.serial_path(), from)?;
            if let Some(end) = console::find(&raw, from, pattern) {
                return Ok(end);
            }
            if exited || Instant::now() >= deadline {
                let full = console::read_from(&self.serial_path(), 0).unwrap_or_default();
                let why = if exited {
                    "QEMU exited first".to_owned()
                } else {
                    format!("timed out after {timeout:?}")
                };
                bail!(
                    "{why} waiting for {pattern:?} on the serial console; {}\nlast {SERIAL_TAIL} lines of {}:\n{}",
                    self.describe_state(),
                    self.serial_path().display(),
                    console::tail(&full, SERIAL_TAIL)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The QMP session (connected at start; reconnected if it was closed).
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            let stream = self.connect_socket("qmp.sock", deadline)?;
            self.qmp =
                Some(Qmp::handshake(stream, deadline).with_context(|| self.describe_state())?);
        }
        Ok(self.qmp.as_mut().expect("just connected"))
    }

    /// The test agent client, connected on first use. Call
    /// `wait_ready` on it before the first command of each boot.
    pub fn agent(&mut self) -> Result<&mut AgentClient> {
        if self.agent.is_none() {
            let stream = self.connect_socket("agent.sock", Instant::now() + CONNECT_TIMEOUT)?;
            self.agent =
                Some(AgentClient::from_stream(stream).context("setting up the test agent client")?);
        }
        Ok(self.agent.as_mut().expect("just connected"))
    }

    /// "QEMU is running", or how it ended and the end of its own log.
    fn describe_state(&self) -> String {
        match self.exit_status() {
            None => format!(
                "QEMU (pid {}) is still running; VM files in {}",
                self.pid,
                self.dir().display()
            ),
            Some(status) => {
                let log =
                    console::read_from(&self.dir.path().join("qemu.log"), 0).unwrap_or_default();
                format!(
                    "QEMU exited ({}); VM files in {}; QEMU's output ends with:\n{}",
                    describe_status(status),
                    self.dir().display(),
                    console::tail(&log, QEMU_LOG_TAIL)
                )
            }
        }
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

impl Vm {
    /// Keeps the VM's files (serial log, QEMU log) after it is dropped, and
    /// says where: for a machine some test failed on.
    pub fn keep_files(&mut self) {
        self.dir.disable_cleanup(true);
        self.write_event_log();
        eprintln!("VM files kept in {}", self.dir.path().display());
    }
}

impl Vm {
    /// Writes every QMP event seen so far (RESET with its reason, WATCHDOG,
    /// SHUTDOWN, ...) to `qmp-events.log` in the VM's dir, each time the
    /// connection is about to close (a kept dir then has it).
    fn write_event_log(&mut self) {
        let running = self.is_running();
        let Some(qmp) = self.qmp.as_mut() else { return };
        if running {
            let _ = qmp.poll_events();
        }
        let lines: String = qmp.events().iter().map(|e| format!("{e:?}\n")).collect();
        if let Err(e) = std::fs::write(self.dir.path().join("qmp-events.log"), lines) {
            eprintln!("warning: writing qmp-events.log: {e}");
        }
    }
}

impl Vm {
    /// How many QMP events called `name` arrived so far (polls first; 0 when
    /// QMP is not connected).
    pub fn qmp_event_count(&mut self, name: &str) -> usize {
        let Some(qmp) = self.qmp.as_mut() else {
            return 0;
        };
        let _ = qmp.poll_events();
        qmp.events().iter().filter(|e| e.name == name).count()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.write_event_log();
        // Sockets first, so QEMU sees clients leave before it dies.
        self.qmp = None;
        self.agent = None;
        if let Err(e) = self.kill() {
            eprintln!("warning: stopping QEMU (pid {}): {e:#}", self.pid);
        }
        if thread::panicking() {
            // A failing test: keep the logs to look at.
            self.dir.disable_cleanup(true);
            eprintln!("VM files kept in {}", self.dir.path().display());
        }
    }
}

/// Sends SIGKILL to process group `pgid`; a group already gone is fine.
#[allow(unsafe_code)]
fn kill_group(pgid: i32) {
    // SAFETY: killpg has no memory-safety preconditions. `pgid` is QEMU's
    // pid, and QEMU is either not reaped yet or was reaped just now by our
    // caller, so the id still names the group QEMU led, not a recycled one.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}
