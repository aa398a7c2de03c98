//! Termination signals, delivered as messages: the main thread blocks
//! SIGTERM, SIGINT and SIGHUP before starting any other thread (so every
//! thread inherits the mask), and one thread takes them with `sigwait`.
//! Children get an empty mask back before exec (`launch`; std's `Command`
//! resets it too).

use std::sync::mpsc::Sender;

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

#[allow(unsafe_code)]
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread (and so in every
/// thread it starts afterwards). Call first thing in `main`.
#[allow(unsafe_code)]
pub fn block() {
    let set = signal_set();
    // SAFETY: a valid set; the old mask is not needed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Starts the thread that turns each termination signal into `make(signal)`
/// sent on `tx`.
pub fn forward<T: Send + 'static>(tx: Sender<T>, make: fn(i32) -> T) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = signal_set();
            let mut signal: libc::c_int = 0;
            // SAFETY: valid set and out-pointer.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc == 0 && tx.send(make(signal)).is_err() {
                return;
            }
        })
        .expect("starting the signal thread");
}
