//! `airlock-kiosk`: the appliance's one graphical program.
//!
//! It drives the display itself through KMS (a dumb buffer on the first
//! connected output of `/dev/dri/card0`) and reads keyboards and pointers
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
//! - **Switch key**: `--switch-key` (default Scroll Lock): shows the other
//!   guest. It never reaches a guest; on every switch all keys held down are
//!   released to the guest being left. The classified guest is shown first.
//! - **Input**: every key and pointer event goes to the guest on screen only,
//!   as QEMU extended key events (raw scancodes: no keymap on the host).
//! - **Log**: one line on stderr per change of guest shown
//!   (`airlock-kiosk: showing <side>`).

pub mod layout;
