//! The control socket `/run/airlock/control.sock` (kiosk, update agent):
//! JSON lines, server to client only. A client gets the current status at
//! once, then one line per change:
//!
//! ```json
//! {"event":"status","phase":"running","ready":true,"both_off":false,
//!  "guests":{"classified":{"state":"running","pid":812,"restarts":0},
//!            "general":{"state":"restarting","delay_ms":2000,"reason":"...","restarts":1}},
//!  "gateway":{"state":"running","pid":830,"restarts":0}}
//! ```
//!
//! A guest's `state` ([`GuestState`]): `starting`, `running` (`pid`),
//! `restarting` (`delay_ms`, `reason`), `off`, `no-disk` (`path`: its disk
//! image is missing, QEMU is not started), `stopping`, `stopped`.
//!
//! `ready`: both guests run. `both_off`: both powered themselves off (the
//! host powers off next; `no-disk` never counts as off). `gateway`: the clipboard gateway
//! ([`GatewayState`]: `disabled`, `unavailable`, `starting`, `running`,
//! `restarting`, `stopped`); it does not count towards `ready`. The socket is `0660 root:<control_group>`; a
//! client that does not read is dropped rather than allowed to stall the
//! supervisor.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::config::Side;
use crate::lifecycle::{GatewayState, GuestState};

/// What the supervisor as a whole is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Running,
    /// Host shutdown in progress.
    Stopping,
    /// Both guests powered off; the power-off action runs.
    PoweringOff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestStatus {
    #[serde(flatten)]
    pub state: GuestState,
    /// Restarts after crashes since the supervisor started.
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayStatus {
    #[serde(flatten)]
    pub state: GatewayState,
    /// Restarts since the supervisor started.
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub event: &'static str,
    pub phase: Phase,
    pub ready: bool,
    pub both_off: bool,
    pub guests: BTreeMap<Side, GuestStatus>,
    pub gateway: GatewayStatus,
}

/// The status line for the given guest and gateway states.
pub fn status(
    phase: Phase,
    guests: &BTreeMap<Side, GuestStatus>,
    gateway: &GatewayStatus,
) -> Status {
    let all = |f: fn(&GuestState) -> bool| {
        Side::ALL
            .iter()
            .all(|s| guests.get(s).is_some_and(|g| f(&g.state)))
    };
    Status {
        event: "status",
        phase,
        ready: all(GuestState::is_running),
        both_off: all(|s| *s == GuestState::Off),
        guests: guests.clone(),
        gateway: gateway.clone(),
    }
}

/// The listening socket and its clients.
pub struct Server {
    clients: Arc<Mutex<Vec<UnixStream>>>,
    last: Arc<Mutex<String>>,
}

impl Server {
    /// Binds `path` (replacing a stale socket), `0660`, group `gid` if given.
    pub fn bind(path: &Path, gid: Option<u32>) -> Result<Server> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("chmod {}", path.display()))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("chgrp {gid} {}", path.display()))?;
        }
        let clients: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let last: Arc<Mutex<String>> = Arc::default();
        let (c, l) = (clients.clone(), last.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let mut clients = c.lock().unwrap_or_else(|p| p.into_inner());
                    let line = l.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if line.is_empty() || stream.write_all(line.as_bytes()).is_ok() {
                        clients.push(stream);
                    }
                }
            })?;
        Ok(Server { clients, last })
    }

    /// Sends `status` to every client (and to every later one on connect).
    pub fn publish(&self, status: &Status) {
        let mut line = serde_json::to_string(status).expect("status serialises");
        line.push('\n');
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = line.clone();
        clients.retain_mut(|c| c.write_all(line.as_bytes()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn guests(a: GuestState, b: GuestState) -> BTreeMap<Side, GuestStatus> {
        BTreeMap::from([
            (
                Side::Classified,
                GuestStatus {
                    state: a,
                    restarts: 0,
                },
            ),
            (
                Side::General,
                GuestStatus {
                    state: b,
                    restarts: 2,
                },
            ),
        ])
    }

    fn gw(state: GatewayState) -> GatewayStatus {
        GatewayStatus { state, restarts: 0 }
    }

    #[test]
    fn ready_and_both_off_need_both_guests() {
        let running = gw(GatewayState::Running { pid: 3 });
        let s = status(
            Phase::Running,
            &guests(
                GuestState::Running { pid: 1 },
                GuestState::Running { pid: 2 },
            ),
            &running,
        );
        assert!(s.ready && !s.both_off);
        let s = status(
            Phase::Running,
            &guests(
                GuestState::Running { pid: 1 },
                GuestState::Running { pid: 2 },
            ),
            &gw(GatewayState::Starting),
        );
        assert!(s.ready, "the gateway does not hold up `ready`");
        let s = status(
            Phase::Running,
            &guests(GuestState::Running { pid: 1 }, GuestState::Off),
            &running,
        );
        assert!(!s.ready && !s.both_off);
        let s = status(
            Phase::PoweringOff,
            &guests(GuestState::Off, GuestState::Off),
            &GatewayStatus {
                state: GatewayState::Stopped,
                restarts: 1,
            },
        );
        assert!(!s.ready && s.both_off);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"event":"status","phase":"powering-off","ready":false,"both_off":true,"guests":{"classified":{"state":"off","restarts":0},"general":{"state":"off","restarts":2}},"gateway":{"state":"stopped","restarts":1}}"#
        );
    }

    #[test]
    fn clients_get_the_current_status_then_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let server = Server::bind(&path, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        server.publish(&status(
            Phase::Running,
            &guests(GuestState::Starting, GuestState::Starting),
            &gw(GatewayState::Disabled),
        ));
        let mut client = BufReader::new(UnixStream::connect(&path).unwrap());
        let mut line = String::new();
        client.read_line(&mut line).unwrap();
        assert!(line.contains("\"starting\""), "{line}");
        // The accept thread may still be adding the client; publish until it hears.
        for _ in 0..50 {
            server.publish(&status(
                Phase::Running,
                &guests(GuestState::Off, GuestState::Off),
                &gw(GatewayState::Disabled),
            ));
            if server.clients.lock().unwrap().len() == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        line.clear();
        client.read_line(&mut line).unwrap();
        assert!(line.contains("\"both_off\":true"), "{line}");
    }
}
