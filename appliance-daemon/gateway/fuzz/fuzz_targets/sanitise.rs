//! Feeds arbitrary bytes to the sanitiser rules as text, PNG, BMP or JPEG
//! (first byte picks the type) with small limits: no panic, no output that
//! breaks the output rules, images always come out as PNG within limits.
#![no_main]

use airlock_gateway::sanitise::{is_clean_text, looks_like_png, sanitise, Limits};
use airlock_vdagent::ClipboardType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else { return };
    let ty = match sel % 4 {
        0 => ClipboardType::Utf8Text,
        1 => ClipboardType::Png,
        2 => ClipboardType::Bmp,
        _ => ClipboardType::Jpg,
    };
    let limits = Limits { max_text_bytes: 4096, max_image_bytes: 1 << 20, max_dimension: 512, max_pixels: 65536 };
    if let Ok(clean) = sanitise(ty, data, &limits) {
        match ty {
            ClipboardType::Utf8Text => {
                assert_eq!(clean.ty, ClipboardType::Utf8Text);
                assert!(is_clean_text(&clean.data, limits.max_text_bytes));
            }
            _ => {
                assert_eq!(clean.ty, ClipboardType::Png);
                assert!(looks_like_png(&clean.data));
                let img = image::load_from_memory_with_format(&clean.data, image::ImageFormat::Png).unwrap();
                assert!(u64::from(img.width()) * u64::from(img.height()) <= limits.max_pixels);
            }
        }
    }
});
