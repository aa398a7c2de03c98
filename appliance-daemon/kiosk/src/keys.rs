//! Keyboard routing: which guest a key goes to, the host-owned switch key,
//! and the translation from Linux evdev key codes to the XT scancodes QEMU's
//! extended key events carry.

use std::collections::BTreeSet;

use crate::Side;

/// evdev `KEY_SCROLLLOCK`: the default switch key.
pub const KEY_SCROLLLOCK: u16 = 70;
/// evdev `KEY_LEFTCTRL` and `KEY_RIGHTCTRL`: Ctrl + the switch key opens
/// and closes the info page for IT.
const CTRL_KEYS: [u16; 2] = [29, 97];

/// The switch key by name (`--switch-key`): a key that has no use in the
/// guests' everyday work, so taking it from them costs nothing.
pub fn parse_switch_key(name: &str) -> Option<u16> {
    match name.to_ascii_lowercase().as_str() {
        "scrolllock" | "scroll_lock" => Some(KEY_SCROLLLOCK),
        "pause" => Some(119),
        "f12" => Some(88),
        "rightctrl" => Some(97),
        "menu" | "compose" => Some(127),
        _ => None,
    }
}

/// How the label names a host key given as `given` on the command line.
pub fn key_name(code: u16, given: &str) -> String {
    match code {
        KEY_SCROLLLOCK => "Scroll Lock".into(),
        119 => "Pause".into(),
        88 => "F12".into(),
        97 => "Right Ctrl".into(),
        127 => "Menu".into(),
        _ => given.to_owned(),
    }
}

/// QEMU's XT encoding of the evdev key `code`: codes 1–88 are the XT set 1
/// make codes themselves; the 0xe0-prefixed keys become `0x80 | code`.
/// `None`: a key the guests do not get (unknown or host-only).
pub fn xt_scancode(code: u16) -> Option<u16> {
    let extended = |c: u16| Some(0x80 | c);
    match code {
        1..=88 => Some(code),
        89 => Some(0x73),      // KEY_RO
        92 => Some(0x79),      // KEY_HENKAN
        93 => Some(0x70),      // KEY_KATAKANAHIRAGANA
        94 => Some(0x7b),      // KEY_MUHENKAN
        96 => extended(0x1c),  // KEY_KPENTER
        97 => extended(0x1d),  // KEY_RIGHTCTRL
        98 => extended(0x35),  // KEY_KPSLASH
        99 => extended(0x37),  // KEY_SYSRQ (Print Screen)
        100 => extended(0x38), // KEY_RIGHTALT
        102 => extended(0x47), // KEY_HOME
        103 => extended(0x48), // KEY_UP
        104 => extended(0x49), // KEY_PAGEUP
        105 => extended(0x4b), // KEY_LEFT
        106 => extended(0x4d), // KEY_RIGHT
        107 => extended(0x4f), // KEY_END
        108 => extended(0x50), // KEY_DOWN
        109 => extended(0x51), // KEY_PAGEDOWN
        110 => extended(0x52), // KEY_INSERT
        111 => extended(0x53), // KEY_DELETE
        113 => extended(0x20), // KEY_MUTE
        114 => extended(0x2e), // KEY_VOLUMEDOWN
        115 => extended(0x30), // KEY_VOLUMEUP
        117 => Some(0x59),     // KEY_KPEQUAL
        119 => extended(0x46), // KEY_PAUSE (QEMU's "pause")
        121 => Some(0x7e),     // KEY_KPCOMMA
        124 => Some(0x7d),     // KEY_YEN
        125 => extended(0x5b), // KEY_LEFTMETA
        126 => extended(0x5c), // KEY_RIGHTMETA
        127 => extended(0x5d), // KEY_COMPOSE (Menu)
        _ => None,
    }
}

/// What to do with one key event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Send the key to `side`'s guest.
    Forward { side: Side, code: u16, down: bool },
    /// Show the other guest (after the releases that precede this action).
    Switch { to: Side },
    /// The confirm key was pressed (clipboard confirm mode).
    Confirm,
    /// Ctrl + the switch key: open (`shown`) or close the info page. While
    /// it is open no key reaches a guest.
    Info { shown: bool },
}

/// Routes keys to the guest on screen; see the module documentation.
#[derive(Debug)]
pub struct KeyRouter {
    switch_key: u16,
    /// The host-owned key that releases a pending clipboard transfer; like
    /// the switch key it never reaches a guest.
    confirm_key: Option<u16>,
    on_screen: Side,
    /// Keys pressed while the guest on screen had the keyboard and not yet
    /// released: only they are released to it, here or on a switch.
    held: BTreeSet<u16>,
    /// Whether a Ctrl key is down (tracked whoever gets it).
    ctrl_down: bool,
    /// The info page is open: keys go to nobody.
    info_shown: bool,
}

impl KeyRouter {
    pub fn new(switch_key: u16, on_screen: Side) -> Self {
        KeyRouter {
            switch_key,
            confirm_key: None,
            on_screen,
            held: BTreeSet::new(),
            ctrl_down: false,
            info_shown: false,
        }
    }

    /// Takes `confirm_key` from the guests (while a clipboard transfer
    /// waits for it), or gives it back (`None`).
    pub fn set_confirm_key(&mut self, confirm_key: Option<u16>) {
        self.confirm_key = confirm_key;
    }

    pub fn on_screen(&self) -> Side {
        self.on_screen
    }

    /// One evdev key event (`value` 1 press, 0 release, 2 auto-repeat).
    pub fn key(&mut self, code: u16, value: i32) -> Vec<KeyAction> {
        let side = self.on_screen;
        if CTRL_KEYS.contains(&code) {
            self.ctrl_down = value != 0;
        }
        if code == self.switch_key {
            // The switch key itself never reaches a guest; it acts on press.
            if value != 1 {
                return Vec::new();
            }
            let mut actions: Vec<KeyAction> = std::mem::take(&mut self.held)
                .into_iter()
                .map(|code| KeyAction::Forward {
                    side,
                    code,
                    down: false,
                })
                .collect();
            if self.ctrl_down || self.info_shown {
                // Ctrl + switch opens or closes the page; the switch key
                // alone closes it too (back to the same guest).
                self.info_shown = !self.info_shown;
                actions.push(KeyAction::Info {
                    shown: self.info_shown,
                });
            } else {
                self.on_screen = side.other();
                actions.push(KeyAction::Switch { to: self.on_screen });
            }
            return actions;
        }
        if self.info_shown {
            // Covered by the page: the guest gets nothing (what was held
            // was released to it when the page opened).
            return Vec::new();
        }
        if Some(code) == self.confirm_key {
            return if value == 1 {
                vec![KeyAction::Confirm]
            } else {
                Vec::new()
            };
        }
        match value {
            1 => {
                self.held.insert(code);
                vec![KeyAction::Forward {
                    side,
                    code,
                    down: true,
                }]
            }
            // A repeat of a key this guest has: the guest sees it held on.
            2 if self.held.contains(&code) => vec![KeyAction::Forward {
                side,
                code,
                down: true,
            }],
            // Released: only to the guest that got the press (a key held
            // across a switch was already released to the other one).
            0 if self.held.remove(&code) => vec![KeyAction::Forward {
                side,
                code,
                down: false,
            }],
            _ => Vec::new(),
        }
    }

    /// Shows `side` (e.g. chosen by the program, not by a key), releasing
    /// held keys to the guest being left.
    pub fn show(&mut self, side: Side) -> Vec<KeyAction> {
        if side == self.on_screen {
            return Vec::new();
        }
        let left = self.on_screen;
        let mut actions: Vec<KeyAction> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|code| KeyAction::Forward {
                side: left,
                code,
                down: false,
            })
            .collect();
        self.on_screen = side;
        actions.push(KeyAction::Switch { to: side });
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeyAction::*;
    use Side::*;

    const A: u16 = 30;
    const CTRL: u16 = 29;
    const SHIFT: u16 = 42;

    #[test]
    fn ctrl_and_the_switch_key_open_the_info_page_and_no_key_reaches_a_guest_then() {
        let mut r = KeyRouter::new(KEY_SCROLLLOCK, Classified);
        assert_eq!(
            r.key(CTRL, 1),
            [Forward {
                side: Classified,
                code: CTRL,
                down: true
            }]
        );
        // The guest had Ctrl down: it is released to it as the page opens.
        assert_eq!(
            r.key(KEY_SCROLLLOCK, 1),
            [
                Forward {
                    side: Classified,
                    code: CTRL,
                    down: false
                },
                Info { shown: true }
            ]
        );
        assert_eq!(r.key(KEY_SCROLLLOCK, 0), []);
        assert_eq!(r.key(CTRL, 0), []);
        assert_eq!(r.key(A, 1), []);
        assert_eq!(r.key(A, 0), []);
        assert_eq!(r.on_screen(), Classified);
        // The switch key alone closes it, back to the same guest.
        assert_eq!(r.key(KEY_SCROLLLOCK, 1), [Info { shown: false }]);
        assert_eq!(r.on_screen(), Classified);
        assert_eq!(
            r.key(A, 1),
            [Forward {
                side: Classified,
                code: A,
                down: true
            }]
        );
        assert_eq!(
            r.key(A, 0),
            [Forward {
                side: Classified,
                code: A,
                down: false
            }]
        );
        // Right Ctrl works the same; Ctrl + switch again closes it.
        r.key(97, 1);
        assert_eq!(
            r.key(KEY_SCROLLLOCK, 1),
            [
                Forward {
                    side: Classified,
                    code: 97,
                    down: false
                },
                Info { shown: true }
            ]
        );
        assert_eq!(r.key(KEY_SCROLLLOCK, 1), [Info { shown: false }]);
        r.key(97, 0);
        assert_eq!(r.key(KEY_SCROLLLOCK, 1), [Switch { to: General }]);
    }

    #[test]
    fn keys_go_to_the_guest_on_screen_and_the_switch_key_to_nobody() {
        let mut r = KeyRouter::new(KEY_SCROLLLOCK, Classified);
        assert_eq!(
            r.key(A, 1),
            [Forward {
                side: Classified,
                code: A,
                down: true
            }]
        );
        assert_eq!(
            r.key(A, 0),
            [Forward {
                side: Classified,
                code: A,
                down: false
            }]
        );
        assert_eq!(r.key(KEY_SCROLLLOCK, 1), [Switch { to: General }]);
        assert_eq!(r.key(KEY_SCROLLLOCK, 2), []);
        assert_eq!(r.key(KEY_SCROLLLOCK, 0), []);
        assert_eq!(
            r.key(A, 1),
            [Forward {
                side: General,
                code: A,
                down: true
            }]
        );
        assert_eq!(r.on_screen(), General);
    }

    #[test]
    fn held_keys_are_released_to_the_guest_being_left_and_never_leak_over() {
        let mut r = KeyRouter::new(KEY_SCROLLLOCK, Classified);
        // (Ctrl + the switch key would open the info page instead.)
        r.key(SHIFT, 1);
        r.key(A, 1);
        assert_eq!(
            r.key(KEY_SCROLLLOCK, 1),
            [
                Forward {
                    side: Classified,
                    code: A,
                    down: false
                },
                Forward {
                    side: Classified,
                    code: SHIFT,
                    down: false
                },
                Switch { to: General }
            ]
        );
        // Their physical release and repeats go nowhere.
        assert_eq!(r.key(A, 2), []);
        assert_eq!(r.key(SHIFT, 0), []);
        assert_eq!(r.key(A, 0), []);
    }

    #[test]
    fn the_confirm_key_is_the_hosts_too() {
        let mut r = KeyRouter::new(KEY_SCROLLLOCK, Classified);
        r.set_confirm_key(Some(119));
        assert_eq!(r.key(119, 1), [Confirm]);
        assert_eq!(r.key(119, 2), []);
        assert_eq!(r.key(119, 0), []);
        r.set_confirm_key(None);
        assert_eq!(
            r.key(119, 1),
            [Forward {
                side: Classified,
                code: 119,
                down: true
            }]
        );
    }

    #[test]
    fn repeats_only_for_keys_the_guest_holds() {
        let mut r = KeyRouter::new(KEY_SCROLLLOCK, General);
        assert_eq!(r.key(A, 2), []);
        r.key(A, 1);
        assert_eq!(
            r.key(A, 2),
            [Forward {
                side: General,
                code: A,
                down: true
            }]
        );
    }

    #[test]
    fn show_releases_like_the_key() {
        let mut r = KeyRouter::new(KEY_SCROLLLOCK, Classified);
        assert_eq!(r.show(Classified), []);
        r.key(A, 1);
        assert_eq!(
            r.show(General),
            [
                Forward {
                    side: Classified,
                    code: A,
                    down: false
                },
                Switch { to: General }
            ]
        );
    }

    #[test]
    fn scancodes_follow_qemus_xt_encoding() {
        assert_eq!(xt_scancode(A), Some(0x1e));
        assert_eq!(xt_scancode(88), Some(0x58)); // F12
        assert_eq!(xt_scancode(96), Some(0x9c)); // keypad Enter = e0 1c
        assert_eq!(xt_scancode(125), Some(0xdb)); // left Windows = e0 5b
        assert_eq!(xt_scancode(0), None);
        assert_eq!(xt_scancode(0x2ff), None);
    }

    #[test]
    fn switch_key_names() {
        assert_eq!(parse_switch_key("ScrollLock"), Some(KEY_SCROLLLOCK));
        assert_eq!(parse_switch_key("pause"), Some(119));
        assert_eq!(parse_switch_key("a"), None);
    }
}
