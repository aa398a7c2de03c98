//! Keyboards and pointers, read straight from evdev. Each one the kiosk
//! uses is grabbed (`EVIOCGRAB`): its events reach the kiosk alone — not the
//! kernel's VT keyboard handler (no Ctrl-Alt-F console switch, no SysRq), not
//! any other reader. Devices that are neither (power button, lid switch) are
//! left alone for the service manager. New devices (a USB keyboard plugged
//! in later) are picked up by a rescan every [`RESCAN`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use evdev::raw_stream::RawDevice;
use evdev::{AbsoluteAxisCode, EventType, KeyCode, RelativeAxisCode};

use crate::Event;

/// How often `/dev/input` is scanned for new devices.
pub const RESCAN: Duration = Duration::from_secs(2);

/// One input event, as the kiosk needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    /// A key or button: evdev code, value 1 press / 0 release / 2 repeat.
    Key {
        code: u16,
        value: i32,
    },
    /// Relative pointer motion.
    Move {
        dx: i32,
        dy: i32,
    },
    /// Absolute pointer position along one axis, 0.0–1.0 of its range.
    AbsX(f32),
    AbsY(f32),
    /// Wheel clicks (positive: away from the user).
    Wheel(i32),
    /// End of one batch of events from a device.
    Sync,
}

/// What a device is to the kiosk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Keyboard,
    Pointer,
    Ignored,
}

fn kind(device: &RawDevice) -> Kind {
    let keys = device.supported_keys();
    let has_key = |k: KeyCode| keys.is_some_and(|set| set.contains(k));
    if has_key(KeyCode::KEY_A) && has_key(KeyCode::KEY_ENTER) {
        return Kind::Keyboard;
    }
    let relative = device
        .supported_relative_axes()
        .is_some_and(|a| a.contains(RelativeAxisCode::REL_X));
    let absolute = device
        .supported_absolute_axes()
        .is_some_and(|a| a.contains(AbsoluteAxisCode::ABS_X));
    if (relative || absolute) && (has_key(KeyCode::BTN_LEFT) || has_key(KeyCode::BTN_TOUCH)) {
        return Kind::Pointer;
    }
    Kind::Ignored
}

/// Scans `dir` now and every [`RESCAN`], grabbing keyboards and pointers and
/// sending their events to `events`. Runs until `events` is closed.
pub fn watch(dir: PathBuf, events: Sender<Event>) {
    let open: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
    let mut ignored: HashSet<PathBuf> = HashSet::new();
    loop {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                eprintln!("airlock-kiosk: cannot list {}: {e}", dir.display());
                thread::sleep(RESCAN);
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_event_node = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("event"));
            if !is_event_node || ignored.contains(&path) || open.lock().unwrap().contains(&path) {
                continue;
            }
            match take(&path) {
                Ok(Some((device, kind))) => {
                    eprintln!(
                        "airlock-kiosk: using {} ({:?}, {:?})",
                        path.display(),
                        device.name().unwrap_or("?"),
                        kind
                    );
                    open.lock().unwrap().insert(path.clone());
                    let (open, events) = (Arc::clone(&open), events.clone());
                    thread::spawn(move || {
                        let why = read_events(device, &events);
                        eprintln!("airlock-kiosk: {} gone: {why}", path.display());
                        open.lock().unwrap().remove(&path);
                    });
                }
                Ok(None) => {
                    ignored.insert(path);
                }
                Err(e) => eprintln!("airlock-kiosk: cannot use {}: {e}", path.display()),
            }
        }
        if events.send(Event::Tick).is_err() {
            return;
        }
        thread::sleep(RESCAN);
    }
}

/// Opens and grabs `path` if it is a keyboard or pointer.
fn take(path: &Path) -> std::io::Result<Option<(RawDevice, Kind)>> {
    // Read-only: the kiosk never writes to an input device (no event
    // injection; the unit's device cgroup and the policy allow reading only).
    // Not RawDevice::open, which tries read-write first.
    let file = std::fs::File::open(path)?;
    let mut device = RawDevice::from_fd(file.into())?;
    let kind = kind(&device);
    if kind == Kind::Ignored {
        return Ok(None);
    }
    device.grab()?;
    Ok(Some((device, kind)))
}

/// Forwards `device`'s events until it fails; the error says why.
fn read_events(mut device: RawDevice, events: &Sender<Event>) -> String {
    let ranges = device.get_abs_state().ok();
    let fraction = |axis: AbsoluteAxisCode, value: i32| -> f32 {
        let Some(info) = ranges.as_ref().map(|r| r[axis.0 as usize]) else {
            return 0.0;
        };
        let span = (info.maximum - info.minimum).max(1) as f32;
        ((value - info.minimum) as f32 / span).clamp(0.0, 1.0)
    };
    loop {
        let batch = match device.fetch_events() {
            Ok(batch) => batch.collect::<Vec<_>>(),
            Err(e) => return e.to_string(),
        };
        for ev in batch {
            let input = match ev.event_type() {
                EventType::KEY => Input::Key {
                    code: ev.code(),
                    value: ev.value(),
                },
                EventType::RELATIVE => match RelativeAxisCode(ev.code()) {
                    RelativeAxisCode::REL_X => Input::Move {
                        dx: ev.value(),
                        dy: 0,
                    },
                    RelativeAxisCode::REL_Y => Input::Move {
                        dx: 0,
                        dy: ev.value(),
                    },
                    RelativeAxisCode::REL_WHEEL => Input::Wheel(ev.value()),
                    _ => continue,
                },
                EventType::ABSOLUTE => match AbsoluteAxisCode(ev.code()) {
                    AbsoluteAxisCode::ABS_X => {
                        Input::AbsX(fraction(AbsoluteAxisCode::ABS_X, ev.value()))
                    }
                    AbsoluteAxisCode::ABS_Y => {
                        Input::AbsY(fraction(AbsoluteAxisCode::ABS_Y, ev.value()))
                    }
                    _ => continue,
                },
                EventType::SYNCHRONIZATION => Input::Sync,
                _ => continue,
            };
            if events.send(Event::Input(input)).is_err() {
                return "kiosk stopping".into();
            }
        }
    }
}
