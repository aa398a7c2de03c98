//! Where things go on the screen, and in which colour.

/// Label strip of the classified side (red).
pub const CLASSIFIED_RGB: [u8; 3] = [192, 0, 0];
/// Label strip of the general side (green).
pub const GENERAL_RGB: [u8; 3] = [0, 128, 0];
/// The guest area when the guest is not on screen yet (stopped, starting).
pub const NO_GUEST_RGB: [u8; 3] = [48, 48, 48];

/// Height of the label strip on a screen `screen_height` pixels high.
pub fn strip_height(screen_height: u32) -> u32 {
    (screen_height / 16).max(24)
}
