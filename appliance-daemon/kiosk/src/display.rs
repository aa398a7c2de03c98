//! One guest's display: a thread that keeps a VNC connection to the side's
//! QEMU (`display.sock`), reconnecting whenever it drops, and keeps the
//! latest picture for the kiosk to draw. Only the guest on screen is asked
//! for updates, so a hidden guest that redraws all the time costs nothing.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::rfb::{self, Framebuffer, Update};
use crate::{Event, Side};

/// Pause before reconnecting to a display that is not there (yet).
const RECONNECT: Duration = Duration::from_millis(500);

/// The kiosk's handle on one guest's display.
pub struct GuestDisplay {
    side: Side,
    /// The picture as last received; `None` until the first update after
    /// (re)connecting.
    frame: Mutex<Option<Framebuffer>>,
    /// Where input and update requests go; `None` while disconnected.
    writer: Mutex<Option<(UnixStream, u16, u16)>>,
    on_screen: AtomicBool,
    /// QEMU acknowledged extended key events on this connection.
    extended_keys: AtomicBool,
}

impl GuestDisplay {
    /// Starts following `socket`; every change is announced as
    /// [`Event::Display`] on `events`.
    pub fn spawn(side: Side, socket: PathBuf, events: Sender<Event>) -> Arc<Self> {
        let display = Arc::new(GuestDisplay {
            side,
            frame: Mutex::new(None),
            writer: Mutex::new(None),
            on_screen: AtomicBool::new(false),
            extended_keys: AtomicBool::new(false),
        });
        let me = Arc::clone(&display);
        thread::spawn(move || me.run(&socket, &events));
        display
    }

    /// Runs `f` on the current picture, if any.
    pub fn with_frame<T>(&self, f: impl FnOnce(Option<&Framebuffer>) -> T) -> T {
        f(self.frame.lock().unwrap().as_ref())
    }

    /// The guest's screen size, once connected.
    pub fn size(&self) -> Option<(u16, u16)> {
        self.writer
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, w, h)| (*w, *h))
    }

    /// Marks this guest as on screen or not; coming on screen asks for a
    /// whole new picture.
    pub fn set_on_screen(&self, on_screen: bool) {
        self.on_screen.store(on_screen, Ordering::SeqCst);
        if on_screen {
            self.send_with(|w, h| rfb::update_request(false, w, h).to_vec());
        }
    }

    /// Sends one input message (built from the guest's current size);
    /// dropped while disconnected.
    pub fn send_with(&self, message: impl FnOnce(u16, u16) -> Vec<u8>) {
        let mut writer = self.writer.lock().unwrap();
        if let Some((stream, w, h)) = writer.as_mut() {
            // A failed write means the connection is going; the reader
            // thread notices and reconnects.
            let _ = stream.write_all(&message(*w, *h));
        }
    }

    /// Sends a key as a raw scancode; dropped until QEMU has acknowledged
    /// extended key events (it does so right after the handshake).
    pub fn send_key(&self, scancode: u16, down: bool) {
        if self.extended_keys.load(Ordering::SeqCst) {
            self.send_with(|_, _| rfb::key_event(scancode, down).to_vec());
        }
    }

    fn run(&self, socket: &std::path::Path, events: &Sender<Event>) {
        let mut last_error = String::new();
        loop {
            let why = match self.session(socket, events) {
                Ok(()) => "closed by QEMU".to_owned(),
                Err(e) => e.to_string(),
            };
            *self.writer.lock().unwrap() = None;
            self.extended_keys.store(false, Ordering::SeqCst);
            *self.frame.lock().unwrap() = None;
            if events.send(Event::Display(self.side)).is_err() {
                return;
            }
            if why != last_error {
                eprintln!(
                    "airlock-kiosk: {} display {}: {why}; reconnecting",
                    self.side.name(),
                    socket.display()
                );
                last_error = why;
            }
            thread::sleep(RECONNECT);
        }
    }

    /// One connection, until it fails.
    fn session(
        &self,
        socket: &std::path::Path,
        events: &Sender<Event>,
    ) -> Result<(), rfb::RfbError> {
        let mut stream = UnixStream::connect(socket)?;
        let init = rfb::handshake(&mut stream)?;
        eprintln!(
            "airlock-kiosk: {} display connected ({}x{})",
            self.side.name(),
            init.width,
            init.height
        );
        let mut fb = Framebuffer::new(init.width, init.height);
        *self.writer.lock().unwrap() = Some((stream.try_clone()?, init.width, init.height));
        let mut reader = BufReader::with_capacity(1 << 16, stream);
        // The first picture is fetched even off screen, so a switch shows
        // something at once.
        self.send_with(|w, h| rfb::update_request(false, w, h).to_vec());
        let mut extended_keys = false;
        let mut first_picture = true;
        loop {
            let update = rfb::read_message(&mut reader, &mut fb, &mut extended_keys)?;
            self.extended_keys.store(extended_keys, Ordering::SeqCst);
            if update == Update::Nothing {
                continue;
            }
            if first_picture {
                eprintln!("airlock-kiosk: {} display: first picture", self.side.name());
                first_picture = false;
            }
            if let Some((_, w, h)) = self.writer.lock().unwrap().as_mut() {
                (*w, *h) = (fb.width, fb.height);
            }
            let mut kept = self.frame.lock().unwrap();
            match kept.as_mut() {
                Some(same) if same.width == fb.width && same.height == fb.height => {
                    same.pixels.copy_from_slice(&fb.pixels)
                }
                _ => *kept = Some(fb.clone()),
            }
            drop(kept);
            if events.send(Event::Display(self.side)).is_err() {
                return Ok(());
            }
            if self.on_screen.load(Ordering::SeqCst) {
                self.send_with(|w, h| rfb::update_request(true, w, h).to_vec());
            }
        }
    }
}
