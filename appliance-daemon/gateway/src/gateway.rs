//! The gateway proper: one client connection per guest's vdagent socket
//! (QEMU listens, `server=on`), reconnecting with back-off, and one event
//! loop that owns all state and is the only writer to either socket.
//!
//! The one-way rule is structural: the only messages ever written to the
//! general guest are our capability announcement, our max-clipboard, a
//! request for a type the general guest itself just offered, and an empty
//! answer (`CLIPBOARD` of type `NONE`, what the agents and spice-gtk send
//! when they cannot serve a request) to any request it makes. None of them
//! depends on anything the classified guest sent, nor on its timing.
//!
//! A transfer: general grabs → we request at once (with a timeout) → the
//! data goes to a fresh sanitiser process → the sanitised item becomes our
//! offer: we grab the classified clipboard with its one type and answer
//! classified's requests from it.

use crate::audit::{AuditLog, Direction, Record};
use crate::confirm::{self, Verdict};
use crate::runner::{Outcome, Runner};
use crate::sanitise::Clean;
use airlock_vdagent::{cap, encode, Capabilities, ClipboardType, DecodeError, Decoder, Message};
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender as Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First and largest pause between connection attempts.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the back-off.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// A write that blocks this long drops the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound cap on the classified side: we never ask it for data, so only
/// control messages are ever needed from it.
const CLASSIFIED_MAX_MESSAGE: u32 = 4096;

/// Events queued between the threads and the event loop.
const EVENT_QUEUE: usize = 256;

/// Types accepted from the general guest, best first.
const PREFERENCE: [ClipboardType; 4] = [
    ClipboardType::Utf8Text,
    ClipboardType::Png,
    ClipboardType::Bmp,
    ClipboardType::Jpg,
];

/// Everything the gateway needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub classified: PathBuf,
    pub general: PathBuf,
    /// Largest clipboard item accepted from the general guest, bytes.
    pub max_bytes: u32,
    /// How long the general guest has to answer our request.
    pub request_timeout: Duration,
    pub runner: Runner,
    pub audit_log: Option<PathBuf>,
    /// Confirm mode: the kiosk's socket, how long the user has, and the
    /// socket's group.
    pub confirm: Option<ConfirmConfig>,
}

/// Confirm mode ([`crate::confirm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmConfig {
    pub socket: PathBuf,
    /// How long the user has to accept a pending transfer.
    pub timeout: Duration,
    /// The group (gid) the socket is given to, mode 0660: the kiosk's way
    /// in. `None`: the socket stays 0600, the gateway's user's alone.
    pub group: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Classified,
    General,
}

impl Side {
    fn idx(self) -> usize {
        match self {
            Side::Classified => 0,
            Side::General => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Side::Classified => "classified",
            Side::General => "general",
        }
    }
}

macro_rules! log {
    ($level:literal, $($arg:tt)*) => {
        eprintln!("airlock-gateway: {}: {}", $level, format_args!($($arg)*))
    };
}

enum Event {
    Connected {
        side: Side,
        conn: u64,
        stream: UnixStream,
    },
    Closed {
        side: Side,
        conn: u64,
        reason: String,
    },
    Msg {
        side: Side,
        conn: u64,
        msg: Message,
    },
    Refused {
        side: Side,
        conn: u64,
        err: DecodeError,
    },
    Sanitised {
        transfer: u64,
        ty: ClipboardType,
        size_in: usize,
        outcome: Outcome,
    },
    KioskConnected {
        stream: UnixStream,
    },
    Verdict(Verdict),
}

/// A sanitised item waiting for the user's confirmation.
struct Awaiting {
    transfer: u64,
    ty: ClipboardType,
    size_in: usize,
    clean: Clean,
    deadline: Instant,
}

struct Conn {
    id: u64,
    stream: UnixStream,
}

struct Pending {
    transfer: u64,
    ty: ClipboardType,
    deadline: Instant,
}

struct Offer {
    ty: ClipboardType,
    /// The `CLIPBOARD` answer, encoded once (chunks of 2048 bytes).
    answer: Arc<Vec<u8>>,
    len: usize,
}

/// The capabilities we announce to both guests.
pub fn our_capabilities() -> Capabilities {
    Capabilities::from_bits(&[cap::CLIPBOARD_BY_DEMAND, cap::MAX_CLIPBOARD])
}

/// Runs the gateway until the process is stopped.
pub fn run(cfg: Config) -> Result<()> {
    let audit = match &cfg.audit_log {
        Some(p) => AuditLog::open(p)?,
        None => AuditLog::stderr(),
    };
    // Bounded: a guest flooding messages blocks its own reader thread
    // (and so its socket), not the gateway's memory.
    let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
    if let Some(c) = &cfg.confirm {
        let listener = confirm::bind(&c.socket, c.group)
            .with_context(|| format!("binding confirm socket {}", c.socket.display()))?;
        let (t1, t2) = (tx.clone(), tx.clone());
        std::thread::Builder::new()
            .name("confirm".into())
            .spawn(move || {
                confirm::serve(
                    listener,
                    |stream| t1.send(Event::KioskConnected { stream }).is_ok(),
                    |v| t2.send(Event::Verdict(v)).is_ok(),
                )
            })
            .context("starting the confirm thread")?;
    }
    for (side, path, cap) in [
        (
            Side::General,
            cfg.general.clone(),
            cfg.max_bytes.saturating_add(4),
        ),
        (
            Side::Classified,
            cfg.classified.clone(),
            CLASSIFIED_MAX_MESSAGE,
        ),
    ] {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("conn-{}", side.name()))
            .spawn(move || connection_loop(side, path, cap, tx))
            .context("starting a connection thread")?;
    }
    let mut core = Core {
        cfg,
        tx,
        conns: [None, None],
        pending: None,
        offer: None,
        next_transfer: 1,
        latest_applied: 0,
        audit,
        kiosk: None,
        awaiting: None,
        sanitising: None,
        queued: None,
    };
    log!(
        "info",
        "started; general {}, classified {}",
        core.cfg.general.display(),
        core.cfg.classified.display()
    );
    loop {
        let next = [
            core.pending.as_ref().map(|p| p.deadline),
            core.awaiting.as_ref().map(|a| a.deadline),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = next.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(ev) => core.handle(ev),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("all event sources ended"),
        }
        core.check_deadline();
    }
}

/// Connects to `path` again and again; reads, decodes and forwards
/// messages while connected.
fn connection_loop(side: Side, path: PathBuf, cap: u32, tx: Sender<Event>) {
    let mut backoff = BACKOFF_MIN;
    let mut conn = 0u64;
    let mut last_error = String::new();
    loop {
        match UnixStream::connect(&path) {
            Ok(stream) => {
                conn += 1;
                last_error.clear();
                let writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(e) => {
                        log!("error", "{}: duplicating the socket: {e}", side.name());
                        std::thread::sleep(backoff);
                        continue;
                    }
                };
                let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
                if tx
                    .send(Event::Connected {
                        side,
                        conn,
                        stream: writer,
                    })
                    .is_err()
                {
                    return;
                }
                let started = Instant::now();
                let reason = read_loop(side, conn, &stream, cap, &tx);
                let _ = stream.shutdown(Shutdown::Both);
                if tx.send(Event::Closed { side, conn, reason }).is_err() {
                    return;
                }
                if started.elapsed() >= STABLE_CONNECTION {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    log!(
                        "warn",
                        "{}: cannot connect to {}: {msg}; retrying with back-off",
                        side.name(),
                        path.display()
                    );
                    last_error = msg;
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn read_loop(
    side: Side,
    conn: u64,
    mut stream: &UnixStream,
    cap: u32,
    tx: &Sender<Event>,
) -> String {
    let mut decoder = Decoder::new(cap);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return "end of stream".into(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return format!("read error: {e}"),
        };
        for item in decoder.feed(&buf[..n]) {
            let fatal = item
                .as_ref()
                .err()
                .map(DecodeError::is_fatal)
                .unwrap_or(false);
            let reason = item.as_ref().err().map(ToString::to_string);
            let ev = match item {
                Ok(msg) => Event::Msg { side, conn, msg },
                Err(err) => Event::Refused { side, conn, err },
            };
            if tx.send(ev).is_err() {
                return "gateway stopping".into();
            }
            if fatal {
                return format!(
                    "dropped after framing error: {}",
                    reason.unwrap_or_default()
                );
            }
        }
    }
}

struct Core {
    cfg: Config,
    tx: Sender<Event>,
    conns: [Option<Conn>; 2],
    pending: Option<Pending>,
    offer: Option<Offer>,
    next_transfer: u64,
    latest_applied: u64,
    audit: AuditLog,
    kiosk: Option<UnixStream>,
    awaiting: Option<Awaiting>,
    /// The transfer whose sanitiser is running (at most one).
    sanitising: Option<u64>,
    /// The newest item waiting for the sanitiser.
    queued: Option<(u64, ClipboardType, Vec<u8>)>,
}

impl Core {
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Connected { side, conn, stream } => {
                log!("info", "{}: connected", side.name());
                self.conns[side.idx()] = Some(Conn { id: conn, stream });
                if side == Side::General {
                    self.pending = None;
                }
                self.send(
                    side,
                    &Message::AnnounceCapabilities {
                        request: true,
                        caps: our_capabilities(),
                    },
                );
                self.session_start(side);
            }
            Event::Closed { side, conn, reason } => {
                if self.is_current(side, conn) {
                    log!("warn", "{}: connection closed: {reason}", side.name());
                    self.conns[side.idx()] = None;
                    if side == Side::General {
                        if let Some(p) = self.pending.take() {
                            self.reject(
                                p.transfer,
                                Direction::GeneralToClassified,
                                &p.ty.name(),
                                0,
                                "general guest disconnected before answering",
                            );
                        }
                    }
                }
            }
            Event::Msg { side, conn, msg } => {
                if self.is_current(side, conn) {
                    match side {
                        Side::General => self.on_general(msg),
                        Side::Classified => self.on_classified(msg),
                    }
                }
            }
            Event::Refused { side, conn, err } => {
                if !self.is_current(side, conn) {
                    return;
                }
                log!("warn", "{}: input dropped: {err}", side.name());
                if let DecodeError::FileTransferRefused { msg_type, size } = err {
                    let transfer = self.new_transfer();
                    let direction = match side {
                        Side::General => Direction::GeneralToClassified,
                        Side::Classified => Direction::ClassifiedToGeneral,
                    };
                    self.reject(
                        transfer,
                        direction,
                        &format!("file-transfer-{msg_type}"),
                        size as usize,
                        "file transfer refused",
                    );
                } else if side == Side::General {
                    // A refused message from general may be the answer we
                    // wait for (too large, malformed): fail the transfer now
                    // rather than at the timeout.
                    let size = match &err {
                        DecodeError::MessageTooLarge {
                            msg_type: 4, size, ..
                        } => Some(*size as usize),
                        DecodeError::BadPayload { msg_type: 4, .. } => Some(0),
                        e if e.is_fatal() => Some(0),
                        _ => None,
                    };
                    if let Some(size) = size {
                        if let Some(p) = self.pending.take() {
                            self.reject(
                                p.transfer,
                                Direction::GeneralToClassified,
                                &p.ty.name(),
                                size,
                                &err.to_string(),
                            );
                        }
                    }
                }
            }
            Event::Sanitised {
                transfer,
                ty,
                size_in,
                outcome,
            } => self.sanitised(transfer, ty, size_in, outcome),
            Event::KioskConnected { stream } => {
                log!("info", "confirm: kiosk connected");
                self.kiosk = Some(stream);
                if let Some(a) = &self.awaiting {
                    let line =
                        confirm::pending_line(a.transfer, &a.clean.ty.name(), a.clean.data.len());
                    self.notify_kiosk(&line);
                }
            }
            Event::Verdict(v) => match self.awaiting.take_if(|a| a.transfer == v.transfer) {
                Some(a) if v.accept => self.offer(a.transfer, a.ty, a.size_in, a.clean),
                Some(a) => self.reject(
                    a.transfer,
                    Direction::GeneralToClassified,
                    &a.ty.name(),
                    a.size_in,
                    "refused at the confirmation prompt",
                ),
                None => log!(
                    "warn",
                    "confirm: verdict for transfer {} which is not pending; ignored",
                    v.transfer
                ),
            },
        }
    }

    fn is_current(&self, side: Side, conn: u64) -> bool {
        self.conns[side.idx()]
            .as_ref()
            .is_some_and(|c| c.id == conn)
    }

    /// The guest's agent is (again) ready: tell it our limit, and give the
    /// classified guest our current offer.
    fn session_start(&mut self, side: Side) {
        match side {
            Side::General => {
                let max = i32::try_from(self.cfg.max_bytes).unwrap_or(i32::MAX);
                self.send(side, &Message::MaxClipboard(max));
            }
            Side::Classified => {
                // We never take data from the classified guest: limit 0.
                self.send(side, &Message::MaxClipboard(0));
                if let Some(ty) = self.offer.as_ref().map(|o| o.ty) {
                    self.send(side, &Message::ClipboardGrab(vec![ty]));
                }
            }
        }
    }

    fn announce_reply(&mut self, side: Side, request: bool, caps: &Capabilities) {
        if !caps.has(cap::CLIPBOARD_BY_DEMAND) {
            log!(
                "warn",
                "{}: agent does not announce CLIPBOARD_BY_DEMAND",
                side.name()
            );
        }
        if request {
            self.send(
                side,
                &Message::AnnounceCapabilities {
                    request: false,
                    caps: our_capabilities(),
                },
            );
            self.session_start(side);
        }
    }

    fn on_general(&mut self, msg: Message) {
        match msg {
            Message::AnnounceCapabilities { request, caps } => {
                self.announce_reply(Side::General, request, &caps)
            }
            Message::ClipboardGrab(types) => {
                let transfer = self.new_transfer();
                if let Some(p) = self.pending.take() {
                    self.reject(
                        p.transfer,
                        Direction::GeneralToClassified,
                        &p.ty.name(),
                        0,
                        "superseded by a newer copy",
                    );
                }
                let offered = types.iter().map(|t| t.name()).collect::<Vec<_>>().join(",");
                let Some(ty) = PREFERENCE.into_iter().find(|t| types.contains(t)) else {
                    let why = if types.contains(&ClipboardType::FileList) {
                        "file copy refused".to_string()
                    } else {
                        format!("no accepted type among {offered}")
                    };
                    self.reject(transfer, Direction::GeneralToClassified, &offered, 0, &why);
                    return;
                };
                log!(
                    "info",
                    "transfer {transfer}: general offers {offered}; requesting {}",
                    ty.name()
                );
                self.pending = Some(Pending {
                    transfer,
                    ty,
                    deadline: Instant::now() + self.cfg.request_timeout,
                });
                self.send(Side::General, &Message::ClipboardRequest(ty));
            }
            Message::Clipboard { ty, data } => {
                let Some(p) = self
                    .pending
                    .take_if(|p| p.ty == ty || ty == ClipboardType::None)
                else {
                    log!(
                        "warn",
                        "general: unrequested clipboard data ({}, {} bytes) dropped",
                        ty.name(),
                        data.len()
                    );
                    return;
                };
                if ty == ClipboardType::None {
                    self.reject(
                        p.transfer,
                        Direction::GeneralToClassified,
                        &p.ty.name(),
                        0,
                        "general guest sent no data",
                    );
                    return;
                }
                if let Some(busy) = self.sanitising {
                    // One sanitiser at a time; the newest copy waits, an
                    // older waiting one is dropped.
                    log!(
                        "info",
                        "transfer {}: queued behind transfer {busy}",
                        p.transfer
                    );
                    if let Some((old, old_ty, old_data)) =
                        self.queued.replace((p.transfer, ty, data))
                    {
                        self.reject(
                            old,
                            Direction::GeneralToClassified,
                            &old_ty.name(),
                            old_data.len(),
                            "superseded by a newer copy",
                        );
                    }
                    return;
                }
                self.start_sanitiser(p.transfer, ty, data);
            }
            Message::ClipboardRequest(ty) => {
                // We never own the general clipboard; whatever it asks for,
                // the answer is empty and immediate.
                log!("info", "general: request for {} answered empty", ty.name());
                self.send(
                    Side::General,
                    &Message::Clipboard {
                        ty: ClipboardType::None,
                        data: Vec::new(),
                    },
                );
            }
            Message::ClipboardRelease => log!("info", "general: clipboard released"),
            Message::MaxClipboard(_) => {}
        }
    }

    fn on_classified(&mut self, msg: Message) {
        match msg {
            Message::AnnounceCapabilities { request, caps } => {
                self.announce_reply(Side::Classified, request, &caps)
            }
            Message::ClipboardGrab(types) => {
                // The classified guest took its own clipboard: our offer is
                // gone there. Nothing is forwarded, nothing is requested.
                self.offer = None;
                let offered = types.iter().map(|t| t.name()).collect::<Vec<_>>().join(",");
                let transfer = self.new_transfer();
                self.reject(
                    transfer,
                    Direction::ClassifiedToGeneral,
                    &offered,
                    0,
                    "reverse direction is never forwarded",
                );
            }
            Message::ClipboardRequest(ty) => {
                match self
                    .offer
                    .as_ref()
                    .filter(|o| o.ty == ty)
                    .map(|o| (Arc::clone(&o.answer), o.len))
                {
                    Some((answer, len)) => {
                        log!(
                            "info",
                            "classified: request for {} answered ({len} bytes)",
                            ty.name()
                        );
                        self.send_encoded(Side::Classified, &answer, "clipboard");
                    }
                    None => {
                        log!(
                            "info",
                            "classified: request for {} answered empty",
                            ty.name()
                        );
                        self.send(
                            Side::Classified,
                            &Message::Clipboard {
                                ty: ClipboardType::None,
                                data: Vec::new(),
                            },
                        );
                    }
                }
            }
            Message::Clipboard { ty, data } => {
                log!(
                    "warn",
                    "classified: unrequested clipboard data ({}, {} bytes) dropped",
                    ty.name(),
                    data.len()
                );
            }
            Message::ClipboardRelease => log!("info", "classified: clipboard released"),
            Message::MaxClipboard(_) => {}
        }
    }

    fn start_sanitiser(&mut self, transfer: u64, ty: ClipboardType, data: Vec<u8>) {
        self.sanitising = Some(transfer);
        let tx = self.tx.clone();
        let runner = self.cfg.runner.clone();
        std::thread::spawn(move || {
            let size_in = data.len();
            let outcome = runner.run(ty, data);
            let _ = tx.send(Event::Sanitised {
                transfer,
                ty,
                size_in,
                outcome,
            });
        });
    }

    fn sanitised(&mut self, transfer: u64, ty: ClipboardType, size_in: usize, outcome: Outcome) {
        self.sanitising = None;
        if let Some((next, next_ty, next_data)) = self.queued.take() {
            self.start_sanitiser(next, next_ty, next_data);
        }
        let rss = outcome.peak_rss_kib.map_or("?".into(), |k| k.to_string());
        log!(
            "info",
            "transfer {transfer}: sanitiser took {} ms, sanitiser peak RSS {rss} KiB",
            outcome.elapsed.as_millis()
        );
        match outcome.result {
            Err(why) => self.reject(
                transfer,
                Direction::GeneralToClassified,
                &ty.name(),
                size_in,
                &why,
            ),
            Ok(_) if transfer < self.latest_applied => self.reject(
                transfer,
                Direction::GeneralToClassified,
                &ty.name(),
                size_in,
                "superseded by a newer copy",
            ),
            Ok(clean) => {
                self.latest_applied = transfer;
                match self.cfg.confirm.as_ref().map(|c| c.timeout) {
                    None => self.offer(transfer, ty, size_in, clean),
                    Some(timeout) => {
                        if let Some(old) = self.awaiting.take() {
                            self.reject(
                                old.transfer,
                                Direction::GeneralToClassified,
                                &old.ty.name(),
                                old.size_in,
                                "superseded by a newer copy",
                            );
                        }
                        let line =
                            confirm::pending_line(transfer, &clean.ty.name(), clean.data.len());
                        self.awaiting = Some(Awaiting {
                            transfer,
                            ty,
                            size_in,
                            clean,
                            deadline: Instant::now() + timeout,
                        });
                        if !self.notify_kiosk(&line) {
                            let a = self.awaiting.take().expect("just set");
                            self.reject(
                                a.transfer,
                                Direction::GeneralToClassified,
                                &a.ty.name(),
                                a.size_in,
                                "no confirmation client connected",
                            );
                        }
                    }
                }
            }
        }
    }

    /// Makes `clean` the classified guest's offer (audited as accepted).
    fn offer(&mut self, transfer: u64, ty: ClipboardType, size_in: usize, clean: Clean) {
        self.audit.record(&Record {
            transfer,
            direction: Direction::GeneralToClassified,
            ty: &format!("{}->{}", ty.name(), clean.ty.name()),
            size_in,
            delivered: Some(&clean.data),
            rejected: None,
        });
        log!(
            "info",
            "transfer {transfer}: offering {} ({} bytes) to classified",
            clean.ty.name(),
            clean.data.len()
        );
        let out_ty = clean.ty;
        let len = clean.data.len();
        let answer = encode(&Message::Clipboard {
            ty: out_ty,
            data: clean.data,
        });
        self.offer = Some(Offer {
            ty: out_ty,
            answer: Arc::new(answer),
            len,
        });
        self.send(Side::Classified, &Message::ClipboardGrab(vec![out_ty]));
    }

    fn notify_kiosk(&mut self, line: &str) -> bool {
        let Some(k) = &mut self.kiosk else {
            return false;
        };
        if confirm::notify(k, line) {
            true
        } else {
            log!("warn", "confirm: kiosk connection lost");
            self.kiosk = None;
            false
        }
    }

    fn check_deadline(&mut self) {
        if let Some(a) = self.awaiting.take_if(|a| Instant::now() >= a.deadline) {
            self.reject(
                a.transfer,
                Direction::GeneralToClassified,
                &a.ty.name(),
                a.size_in,
                "not confirmed in time",
            );
        }
        if let Some(p) = self.pending.take_if(|p| Instant::now() >= p.deadline) {
            let ms = self.cfg.request_timeout.as_millis();
            self.reject(
                p.transfer,
                Direction::GeneralToClassified,
                &p.ty.name(),
                0,
                &format!("general guest did not answer within {ms} ms"),
            );
        }
    }

    fn new_transfer(&mut self) -> u64 {
        let t = self.next_transfer;
        self.next_transfer += 1;
        t
    }

    fn reject(&mut self, transfer: u64, direction: Direction, ty: &str, size_in: usize, why: &str) {
        log!("warn", "transfer {transfer} rejected: {why}");
        self.audit.record(&Record {
            transfer,
            direction,
            ty,
            size_in,
            delivered: None,
            rejected: Some(why),
        });
    }

    fn send(&mut self, side: Side, msg: &Message) {
        self.send_encoded(side, &encode(msg), msg_kind(msg));
    }

    fn send_encoded(&mut self, side: Side, bytes: &[u8], kind: &str) {
        let Some(conn) = &mut self.conns[side.idx()] else {
            log!("info", "{}: not connected; {kind} not sent", side.name());
            return;
        };
        if let Err(e) = conn.stream.write_all(bytes) {
            log!(
                "warn",
                "{}: write failed ({e}); dropping the connection",
                side.name()
            );
            let _ = conn.stream.shutdown(Shutdown::Both);
            self.conns[side.idx()] = None;
        }
    }
}

fn msg_kind(msg: &Message) -> &'static str {
    match msg {
        Message::AnnounceCapabilities { .. } => "announce",
        Message::ClipboardGrab(_) => "grab",
        Message::ClipboardRequest(_) => "request",
        Message::Clipboard { .. } => "clipboard",
        Message::ClipboardRelease => "release",
        Message::MaxClipboard(_) => "max-clipboard",
    }
}
