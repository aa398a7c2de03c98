//! `airlock-kiosk`: the appliance's one graphical program.
//!
//! It drives the display itself through KMS (a dumb buffer on the first
//! connected output of the first usable `/dev/dri/card*`) and reads keyboards and pointers
//! straight from evdev, each grabbed exclusively (`EVIOCGRAB`), so no key
//! ever reaches the kernel's VT layer. There is no compositor: no second
//! client exists that could capture the screen, inject input or share a
//! clipboard (ARCHITECTURE §5), and the guests' QEMUs are never clients of
//! anything graphical — each exports its display as VNC on
//! `/run/airlock/<side>/display.sock`, which only the kiosk may connect to.
//!
//! Run-time contract (tests and the image rely on it):
//!
//! - **Screen**: a label strip across the top, [`layout::strip_height`]
//!   pixels high, solid [`layout::CLASSIFIED_RGB`] (red) with the white word
//!   `CLASSIFIED`, or [`layout::GENERAL_RGB`] (green) with `GENERAL`, and
//!   both guests' states. Below it the guest on screen, scaled to fit with
//!   its aspect kept (nearest neighbour), centred on black. A guest that is
//!   not running or not yet connected: the area is [`layout::NO_GUEST_RGB`]
//!   with its state written in white.
//! - **Messages for IT** ([`message`]): a guest whose disk is missing
//!   (supervisor state `no-disk`), or, while no supervisor answers, a PC
//!   without its machine settings file (`--machine-file`): the area is
//!   grey with an amber box ([`layout::MESSAGE_RGB`]) saying in black what
//!   is missing and the `airlock flash` command that provides it. Each is
//!   logged once when it appears: `airlock-kiosk: message for IT: <side>:
//!   no guest disk at <path>` or `airlock-kiosk: message for IT: this PC is
//!   not provisioned: no machine settings at <file>`.
//! - **Switch key**: `--switch-key` (default Scroll Lock): shows the other
//!   guest. It never reaches a guest; on every switch all keys held down are
//!   released to the guest being left. The classified guest is shown first.
//! - **Info page for IT** ([`info`]): Ctrl + the switch key shows, in the
//!   amber box over the guest, the image's name and version, the host name
//!   and the last update result (`--update-status`, written by
//!   `airlock-update`); the switch key (alone or with Ctrl) closes it. While
//!   it is open no key or pointer event reaches a guest. Logged as
//!   `airlock-kiosk: message for IT: info page: <lines joined by " | ">`
//!   and `airlock-kiosk: info page closed`.
//! - **Input**: every key and pointer event goes to the guest on screen only,
//!   as QEMU extended key events (raw scancodes: no keymap on the host).
//! - **Log**: one line on stderr per change of guest shown
//!   (`airlock-kiosk: showing <side>`).

pub mod confirm;
pub mod display;
pub mod info;
pub mod input;
pub mod keys;
pub mod layout;
pub mod message;
pub mod output;
pub mod rfb;
pub mod status;

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use anyhow::Result;

use crate::display::GuestDisplay;
use crate::input::Input;
use crate::keys::{KeyAction, KeyRouter};
use crate::layout::{Canvas, Label};

/// A guest's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Classified,
    General,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Classified => "classified",
            Side::General => "general",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Classified => Side::General,
            Side::General => Side::Classified,
        }
    }
}

/// Everything the kiosk's one loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// A guest's picture changed or its connection came or went.
    Display(Side),
    /// Both guests' states from the supervisor (or its absence).
    Status(status::GuestReport, status::GuestReport),
    Input(Input),
    /// A clipboard transfer waits for the confirm key (`None`: no longer).
    Pending(Option<confirm::Pending>),
    /// Periodic wake-up (input rescans).
    Tick,
}

/// Where the kiosk finds things (`airlock-kiosk --help`).
#[derive(Debug, Clone)]
pub struct Options {
    pub run_dir: PathBuf,
    /// A KMS device, or a directory of them (the first usable one).
    pub drm_device: PathBuf,
    pub input_dir: PathBuf,
    /// The machine settings file, only `stat`ed: absent (and no
    /// supervisor) means this PC is not provisioned.
    pub machine_file: PathBuf,
    /// The info page's sources ([`info::page`]).
    pub os_release: PathBuf,
    pub update_status: PathBuf,
    pub switch_key: u16,
    pub switch_key_name: String,
    /// Clipboard confirm mode: the gateway's confirm socket, the key that
    /// accepts, its name, and how long a transfer is shown as pending (the
    /// gateway's own timeout rejects it after that).
    pub confirm: Option<ConfirmOptions>,
}

#[derive(Debug, Clone)]
pub struct ConfirmOptions {
    pub socket: PathBuf,
    pub key: u16,
    pub key_name: String,
    pub timeout: std::time::Duration,
}

/// evdev codes of the pointer buttons, and their RFB button bits.
const BUTTONS: [(u16, u8); 4] = [(0x110, 1), (0x112, 2), (0x111, 4), (0x14a, 1)];

/// Runs the kiosk until a fatal error (the service manager restarts it).
pub fn run(options: &Options) -> Result<()> {
    let mut screen = if options.drm_device.is_dir() {
        output::Screen::open_first(&options.drm_device)?
    } else {
        output::Screen::open(&options.drm_device)?
    };
    let (events, inbox) = mpsc::channel();
    let answer = confirm::Answer::default();
    let displays: Vec<Arc<GuestDisplay>> = [Side::Classified, Side::General]
        .into_iter()
        .map(|side| {
            GuestDisplay::spawn(
                side,
                options.run_dir.join(side.name()).join("display.sock"),
                events.clone(),
            )
        })
        .collect();
    let display = |side: Side| &displays[side as usize];
    {
        let (events, socket) = (events.clone(), options.run_dir.join("control.sock"));
        let (status_events, machine_file) = (events.clone(), options.machine_file.clone());
        thread::spawn(move || status::follow(&socket, &machine_file, status_events));
        if let Some(c) = &options.confirm {
            let (events, socket, answer) = (events.clone(), c.socket.clone(), answer.clone());
            thread::spawn(move || confirm::follow(&socket, answer, events));
        }
        let dir = options.input_dir.clone();
        thread::spawn(move || input::watch(dir, events));
    }

    let mut router = KeyRouter::new(options.switch_key, Side::Classified);
    // The transfer the label shows as pending, and until when.
    let mut pending: Option<(confirm::Pending, std::time::Instant)> = None;
    display(Side::Classified).set_on_screen(true);
    eprintln!("airlock-kiosk: showing {}", Side::Classified.name());
    let mut label = Label {
        on_screen: Side::Classified,
        classified_state: status::NO_SUPERVISOR.into(),
        general_state: status::NO_SUPERVISOR.into(),
        hint: format!("{}: switch", options.switch_key_name),
        pending: None,
        classified_message: None,
        general_message: None,
        info: None,
    };
    let mut pixels = vec![0u32; (screen.width * screen.height) as usize];
    // The pointer on the screen, and the buttons held.
    let (mut pointer_x, mut pointer_y, mut buttons) = (screen.width / 2, screen.height / 2, 0u8);
    let mut redraw = true;
    loop {
        if redraw {
            let side = router.on_screen();
            let (width, height) = (screen.width, screen.height);
            display(side).with_frame(|frame| {
                layout::compose(
                    &mut Canvas {
                        width,
                        height,
                        pixels: &mut pixels,
                    },
                    &label,
                    frame,
                )
            });
            screen.present(&pixels)?;
            redraw = false;
        }
        // Block for one event, then take whatever else is queued before drawing.
        let first = inbox.recv()?;
        for event in std::iter::once(first).chain(inbox.try_iter()) {
            match event {
                Event::Display(side) => redraw |= side == router.on_screen(),
                Event::Status(c, g) => {
                    for line in message::new_log_lines(
                        [
                            label.classified_message.as_ref(),
                            label.general_message.as_ref(),
                        ],
                        [c.message.as_ref(), g.message.as_ref()],
                    ) {
                        eprintln!("{line}");
                    }
                    redraw |= c.state != label.classified_state
                        || g.state != label.general_state
                        || c.message != label.classified_message
                        || g.message != label.general_message;
                    (label.classified_state, label.general_state) = (c.state, g.state);
                    (label.classified_message, label.general_message) = (c.message, g.message);
                }
                Event::Tick => {
                    if pending
                        .as_ref()
                        .is_some_and(|(_, until)| std::time::Instant::now() >= *until)
                    {
                        pending = None;
                        router.set_confirm_key(None);
                        label.pending = None;
                        redraw = true;
                    }
                }
                Event::Pending(p) => {
                    let timeout = options
                        .confirm
                        .as_ref()
                        .map_or(std::time::Duration::ZERO, |c| c.timeout);
                    label.pending = p.as_ref().map(|p| pending_text(p, options));
                    // The confirm key is the host's while a transfer waits.
                    router.set_confirm_key(
                        options
                            .confirm
                            .as_ref()
                            .filter(|_| p.is_some())
                            .map(|c| c.key),
                    );
                    pending = p.map(|p| (p, std::time::Instant::now() + timeout));
                    redraw = true;
                }
                Event::Input(Input::Key { code, value }) if code >= 0x100 => {
                    if let Some(&(_, bit)) = BUTTONS.iter().find(|(c, _)| *c == code) {
                        match value {
                            1 => buttons |= bit,
                            0 => buttons &= !bit,
                            _ => {}
                        }
                    }
                }
                Event::Input(Input::Key { code, value }) => {
                    for action in router.key(code, value) {
                        match action {
                            KeyAction::Forward { side, code, down } => {
                                if let Some(scancode) = keys::xt_scancode(code) {
                                    display(side).send_key(scancode, down);
                                }
                            }
                            KeyAction::Info { shown } => {
                                // The pointer's buttons are released to the guest the page covers.
                                if shown && buttons != 0 {
                                    send_pointer(
                                        display(router.on_screen()),
                                        &screen,
                                        pointer_x,
                                        pointer_y,
                                        0,
                                    );
                                    buttons = 0;
                                }
                                label.info = shown.then(|| {
                                    let close = format!(
                                        "Ctrl+{} or {}: back to the guest",
                                        options.switch_key_name, options.switch_key_name
                                    );
                                    message::Message::Info {
                                        lines: info::page(
                                            &options.os_release,
                                            &options.update_status,
                                            &info::host_name(),
                                            &close,
                                        ),
                                    }
                                });
                                match &label.info {
                                    Some(page) => {
                                        eprintln!("{}", page.log_line(router.on_screen()))
                                    }
                                    None => eprintln!("airlock-kiosk: info page closed"),
                                }
                                redraw = true;
                            }
                            KeyAction::Confirm => {
                                router.set_confirm_key(None);
                                if let Some((p, _)) = pending.take() {
                                    let sent = answer.accept(p.transfer);
                                    eprintln!("airlock-kiosk: clipboard transfer {} confirmed by the user (sent: {sent})", p.transfer);
                                    label.pending = None;
                                    redraw = true;
                                }
                            }
                            KeyAction::Switch { to } => {
                                // The pointer's buttons are released to the guest being left too.
                                if buttons != 0 {
                                    send_pointer(
                                        display(to.other()),
                                        &screen,
                                        pointer_x,
                                        pointer_y,
                                        0,
                                    );
                                    buttons = 0;
                                }
                                display(to.other()).set_on_screen(false);
                                display(to).set_on_screen(true);
                                label.on_screen = to;
                                eprintln!("airlock-kiosk: showing {}", to.name());
                                redraw = true;
                            }
                        }
                    }
                }
                Event::Input(Input::Move { dx, dy }) => {
                    pointer_x = pointer_x.saturating_add_signed(dx).min(screen.width - 1);
                    pointer_y = pointer_y.saturating_add_signed(dy).min(screen.height - 1);
                }
                Event::Input(Input::AbsX(f)) => pointer_x = (f * (screen.width - 1) as f32) as u32,
                Event::Input(Input::AbsY(f)) => pointer_y = (f * (screen.height - 1) as f32) as u32,
                // Covered by the info page: the guest gets no pointer events.
                Event::Input(Input::Wheel(_) | Input::Sync) if label.info.is_some() => {}
                Event::Input(Input::Wheel(clicks)) => {
                    let bit = if clicks > 0 { 8 } else { 16 };
                    let guest = display(router.on_screen());
                    for _ in 0..clicks.unsigned_abs().min(10) {
                        send_pointer(guest, &screen, pointer_x, pointer_y, buttons | bit);
                        send_pointer(guest, &screen, pointer_x, pointer_y, buttons);
                    }
                }
                Event::Input(Input::Sync) => send_pointer(
                    display(router.on_screen()),
                    &screen,
                    pointer_x,
                    pointer_y,
                    buttons,
                ),
            }
        }
    }
}

/// What the label says about a pending transfer.
fn pending_text(p: &confirm::Pending, options: &Options) -> String {
    let key = options.confirm.as_ref().map_or("", |c| c.key_name.as_str());
    format!(
        "CLIPBOARD: {} {} bytes general->classified - {key}: paste",
        p.kind, p.bytes
    )
}

/// A pointer event at screen position (x, y), in the guest's coordinates.
fn send_pointer(guest: &GuestDisplay, screen: &output::Screen, x: u32, y: u32, buttons: u8) {
    let Some((gw, gh)) = guest.size() else { return };
    let (gx, gy) = layout::screen_to_guest(screen.width, screen.height, gw, gh, x, y);
    guest.send_with(|_, _| rfb::pointer_event(buttons, gx, gy).to_vec());
}
