//! The pure part of the guest lifecycle: what a QEMU exit means, how long to
//! wait before restarting a crashed guest, and the states the control
//! socket reports.

use std::time::Duration;

use serde::Serialize;

use crate::qmp::Shutdown;

/// First restart delay after a crash; doubled per consecutive crash.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A guest that ran this long before crashing starts the back-off afresh.
pub const STABLE_RUN: Duration = Duration::from_secs(120);

/// How QEMU ended, as far as the supervisor is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// The guest shut itself down (ACPI S5): it stays off.
    PoweredOff,
    /// The guest rebooted (`-no-reboot` turns that into an exit): start it again at once.
    Rebooted,
    /// Anything else: killed, non-zero exit, panic, or stopped by someone
    /// other than the guest. Restarted with back-off.
    Crashed(String),
}

/// Reads QEMU's exit status (`code`, or the `signal` that killed it) and the
/// last `SHUTDOWN` event QMP reported, if any.
pub fn classify(code: Option<i32>, signal: Option<i32>, shutdown: Option<&Shutdown>) -> ExitKind {
    match (code, shutdown) {
        (Some(0), Some(s)) if s.guest && s.reason == "guest-shutdown" => ExitKind::PoweredOff,
        (Some(0), Some(s)) if s.guest && s.reason == "guest-reset" => ExitKind::Rebooted,
        (Some(0), Some(s)) => ExitKind::Crashed(format!(
            "QEMU exited 0 after SHUTDOWN reason {:?} (guest: {})",
            s.reason, s.guest
        )),
        (Some(0), None) => ExitKind::Crashed("QEMU exited 0 without a SHUTDOWN event".into()),
        (Some(c), _) => ExitKind::Crashed(format!("QEMU exited with status {c}")),
        (None, _) => ExitKind::Crashed(match signal {
            Some(s) => format!("QEMU was killed by signal {s}"),
            None => "QEMU ended without a status".into(),
        }),
    }
}

/// The delay before restart number `crashes` in a row (1-based).
pub fn backoff(crashes: u32) -> Duration {
    let shift = crashes.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(1 << shift).min(BACKOFF_MAX)
}

/// Crashes in a row of one process (a guest's QEMU, the gateway), for the
/// restart back-off.
#[derive(Debug, Default)]
pub struct Crashes(u32);

impl Crashes {
    /// Counts a crash after a run of `ran` (a run of [`STABLE_RUN`] or more
    /// starts the count afresh); returns crashes in a row and the delay
    /// before the restart.
    pub fn record(&mut self, ran: Duration) -> (u32, Duration) {
        if ran >= STABLE_RUN {
            self.0 = 0;
        }
        self.0 += 1;
        (self.0, backoff(self.0))
    }

    pub fn reset(&mut self) {
        self.0 = 0;
    }
}

/// What a guest is doing, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum GuestState {
    /// QEMU is being started.
    Starting,
    /// QEMU runs and answers QMP.
    Running { pid: u32 },
    /// It crashed; restart in `delay_ms`.
    Restarting { delay_ms: u64, reason: String },
    /// The guest powered itself off and stays off.
    Off,
    /// Its disk image (`guest.<side>.disk`) is missing or not a regular
    /// file: QEMU is not started. Neither a crash (no restart count, no
    /// back-off) nor powered off (never towards `both_off`: a PC without
    /// guest disks stays on and the kiosk says what is missing).
    NoDisk { path: String },
    /// Host shutdown: ACPI power-down sent, waiting.
    Stopping,
    /// Host shutdown: QEMU has ended.
    Stopped,
}

impl GuestState {
    pub fn is_running(&self) -> bool {
        matches!(self, GuestState::Running { .. })
    }
}

/// What the clipboard gateway is doing, as the control socket reports it.
/// Any exit of the gateway is a crash: it is restarted with [`backoff`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum GatewayState {
    /// `clipboard.enabled = false`.
    Disabled,
    /// It cannot run on this appliance (no program, no user); not retried.
    Unavailable {
        reason: String,
    },
    Starting,
    Running {
        pid: u32,
    },
    /// It ended; restart in `delay_ms`.
    Restarting {
        delay_ms: u64,
        reason: String,
    },
    /// Host shutdown or power-off: stopped.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd(guest: bool, reason: &str) -> Shutdown {
        Shutdown {
            guest,
            reason: reason.into(),
        }
    }

    #[test]
    fn only_a_guest_power_off_keeps_it_off() {
        assert_eq!(
            classify(Some(0), None, Some(&sd(true, "guest-shutdown"))),
            ExitKind::PoweredOff
        );
        assert_eq!(
            classify(Some(0), None, Some(&sd(true, "guest-reset"))),
            ExitKind::Rebooted
        );
        for (code, signal, shutdown) in [
            (None, Some(9), None),
            (Some(1), None, None),
            (Some(1), None, Some(sd(true, "guest-shutdown"))),
            (Some(0), None, None),
            (Some(0), None, Some(sd(false, "host-signal"))),
            (Some(0), None, Some(sd(false, "host-qmp-quit"))),
            (Some(0), None, Some(sd(true, "guest-panic"))),
        ] {
            assert!(
                matches!(
                    classify(code, signal, shutdown.as_ref()),
                    ExitKind::Crashed(_)
                ),
                "{code:?} {signal:?} {shutdown:?}"
            );
        }
        assert_eq!(
            classify(None, Some(9), None),
            ExitKind::Crashed("QEMU was killed by signal 9".into())
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }

    #[test]
    fn crashes_in_a_row_back_off_and_a_stable_run_forgives() {
        let mut c = Crashes::default();
        let short = Duration::from_secs(1);
        assert_eq!(c.record(short), (1, Duration::from_secs(1)));
        assert_eq!(c.record(short), (2, Duration::from_secs(2)));
        assert_eq!(c.record(short), (3, Duration::from_secs(4)));
        assert_eq!(c.record(STABLE_RUN), (1, Duration::from_secs(1)));
        c.record(short);
        c.reset();
        assert_eq!(c.record(short), (1, Duration::from_secs(1)));
    }

    #[test]
    fn states_serialise_for_the_control_socket() {
        assert_eq!(
            serde_json::to_string(&GuestState::Running { pid: 7 }).unwrap(),
            r#"{"state":"running","pid":7}"#
        );
        assert_eq!(
            serde_json::to_string(&GuestState::Off).unwrap(),
            r#"{"state":"off"}"#
        );
        assert_eq!(
            serde_json::to_string(&GuestState::NoDisk {
                path: "/var/lib/airlock/general/disk/windows.qcow2".into()
            })
            .unwrap(),
            r#"{"state":"no-disk","path":"/var/lib/airlock/general/disk/windows.qcow2"}"#
        );
        assert_eq!(
            serde_json::to_string(&GatewayState::Unavailable {
                reason: "no user".into()
            })
            .unwrap(),
            r#"{"state":"unavailable","reason":"no user"}"#
        );
    }
}
