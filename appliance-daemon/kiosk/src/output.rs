//! The screen: KMS on `/dev/dri/card0` with one dumb buffer (XRGB8888) on
//! the first connected output, in its preferred mode. The kiosk is the DRM
//! master (the first opener of a device without a master becomes it), so no
//! other program can put anything on screen while it runs.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use drm::buffer::{Buffer as _, DrmFourcc};
use drm::control::{
    connector, dumbbuffer::DumbBuffer, framebuffer, ClipRect, Device as ControlDevice,
    ModeTypeFlags,
};

struct Card(File);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
impl drm::Device for Card {}
impl ControlDevice for Card {}

/// The display the kiosk draws on.
pub struct Screen {
    card: Card,
    buffer: DumbBuffer,
    framebuffer: framebuffer::Handle,
    pub width: u32,
    pub height: u32,
}

impl Screen {
    /// The first KMS device under `dir` (`card0`, `card1`, …) with a
    /// connected output. (Early in boot the firmware framebuffer's
    /// `simpledrm` may hold `card0` until the real driver replaces it.)
    pub fn open_first(dir: &Path) -> Result<Screen> {
        let mut cards: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("card"))
            })
            .collect();
        cards.sort();
        let mut errors = Vec::new();
        for card in &cards {
            match Screen::open(card) {
                Ok(screen) => return Ok(screen),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if errors.is_empty() {
            bail!("no display device in {}", dir.display());
        }
        bail!("no usable display: {}", errors.join("; "))
    }

    /// Opens `device`, picks the first connected output and its preferred
    /// mode, and puts a black buffer on it.
    pub fn open(device: &Path) -> Result<Screen> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .with_context(|| format!("opening {}", device.display()))?;
        let card = Card(file);
        let resources = card
            .resource_handles()
            .context("reading the display's resources (DRM)")?;
        let mut chosen = None;
        for &handle in resources.connectors() {
            let info = card
                .get_connector(handle, true)
                .context("reading a display connector")?;
            if info.state() == connector::State::Connected && !info.modes().is_empty() {
                chosen = Some(info);
                break;
            }
        }
        let Some(connector) = chosen else {
            bail!("no connected display on {}", device.display())
        };
        let modes = connector.modes();
        let mode = *modes
            .iter()
            .find(|m| m.mode_type().contains(ModeTypeFlags::PREFERRED))
            .unwrap_or(&modes[0]);
        let crtc = connector
            .current_encoder()
            .and_then(|e| card.get_encoder(e).ok())
            .and_then(|e| e.crtc())
            .or_else(|| {
                connector.encoders().iter().find_map(|&e| {
                    let info = card.get_encoder(e).ok()?;
                    resources
                        .filter_crtcs(info.possible_crtcs())
                        .first()
                        .copied()
                })
            })
            .context("no display controller (CRTC) for the connected output")?;
        let (w, h) = mode.size();
        let (width, height) = (u32::from(w), u32::from(h));
        let buffer = card
            .create_dumb_buffer((width, height), DrmFourcc::Xrgb8888, 32)
            .context("creating the screen buffer")?;
        let framebuffer = card
            .add_framebuffer(&buffer, 24, 32)
            .context("adding the screen framebuffer")?;
        card.set_crtc(
            crtc,
            Some(framebuffer),
            (0, 0),
            &[connector.handle()],
            Some(mode),
        )
        .context("setting the display mode (is another program the DRM master?)")?;
        eprintln!(
            "airlock-kiosk: screen {width}x{height} on {} ({:?})",
            device.display(),
            connector.interface()
        );
        Ok(Screen {
            card,
            buffer,
            framebuffer,
            width,
            height,
        })
    }

    /// Copies `pixels` (`width`×`height`, XRGB8888) to the screen.
    pub fn present(&mut self, pixels: &[u32]) -> Result<()> {
        let pitch = self.buffer.pitch() as usize;
        let row_bytes = self.width as usize * 4;
        {
            let mut map = self
                .card
                .map_dumb_buffer(&mut self.buffer)
                .context("mapping the screen buffer")?;
            let bytes: &mut [u8] = map.as_mut();
            for (y, row) in pixels
                .chunks_exact(self.width as usize)
                .enumerate()
                .take(self.height as usize)
            {
                let dst = &mut bytes[y * pitch..y * pitch + row_bytes];
                for (d, p) in dst.chunks_exact_mut(4).zip(row) {
                    d.copy_from_slice(&p.to_le_bytes());
                }
            }
        }
        // Drivers with a shadow buffer (virtio-gpu, bochs under some kernels)
        // copy on DIRTYFB; the others say it is not supported, which is fine.
        let clip = ClipRect::new(0, 0, self.width as u16, self.height as u16);
        let _ = self.card.dirty_framebuffer(self.framebuffer, &[clip]);
        Ok(())
    }
}
