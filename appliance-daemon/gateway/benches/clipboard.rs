//! Clipboard gateway benchmark (prints figures; not a test). Run with
//! `ci/bench-clipboard.sh` or `cargo bench -p airlock-gateway --bench
//! clipboard`.
//!
//! The release gateway and sanitiser between two fake agents on unix
//! sockets. Latency: from the general agent sending its grab to the
//! classified agent holding the sanitised data (the gateway's request,
//! the general answer, a sanitiser process, the classified grab, the
//! classified request and the chunked answer are all inside). Memory:
//! the gateway's peak RSS (VmHWM) and the largest sanitiser peak RSS
//! (its `VmHWM`, read by the gateway before it lets the sanitiser exit,
//! logged per transfer).

#[path = "../tests/common/mod.rs"]
mod common;

use airlock_vdagent::ClipboardType;
use common::*;
use std::time::{Duration, Instant};

fn text(len: usize) -> Vec<u8> {
    let line =
        b"The quick brown fox jumps over the lazy dog 0123456789 -- airlock clipboard bench\n";
    line.iter().copied().cycle().take(len).collect()
}

/// A 2048x2048 (4.19 megapixel) RGB PNG with screenshot-like structure
/// and some noise, so it neither compresses to nothing nor is pure noise.
fn image_4mp() -> Vec<u8> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(2048, 2048, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed & 0x0f) as u8;
        let band = ((y / 64) % 4) as u8 * 40;
        image::Rgb([
            ((x / 8) as u8).wrapping_add(n),
            band.wrapping_add(n),
            ((x ^ y) as u8) / 2,
        ])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo bench` passes --bench; an optional number scales the runs.
    let scale: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let gport = FakePort::bind(dir.path(), "general");
    let cport = FakePort::bind(dir.path(), "classified");
    let mut gw = Gateway::start(dir.path(), &["--max-bytes", &(64u32 << 20).to_string()]);
    let mut general = gport.accept();
    let mut classified = cport.accept();

    let workloads: Vec<(&str, ClipboardType, Vec<u8>, usize)> = vec![
        (
            "1 KiB text",
            ClipboardType::Utf8Text,
            text(1024),
            50 * scale,
        ),
        (
            "1 MiB text",
            ClipboardType::Utf8Text,
            text(1 << 20),
            20 * scale,
        ),
        (
            "4 MP image (2048x2048 PNG)",
            ClipboardType::Png,
            image_4mp(),
            10 * scale,
        ),
    ];
    println!(
        "clipboard bench: gateway {} (pid {})",
        env!("CARGO_BIN_EXE_airlock-gateway"),
        gw.pid()
    );
    println!(
        "{:<28} {:>6} {:>11} {:>11} {:>11} {:>11}",
        "workload", "runs", "input", "median", "p99", "max"
    );
    for (name, ty, data, runs) in &workloads {
        let mut times = Vec::with_capacity(*runs);
        let mut out_len = 0;
        for _ in 0..*runs {
            let start = Instant::now();
            general_copies(&mut general, *ty, data);
            let (_, got) = classified_pastes(&mut classified);
            times.push(start.elapsed());
            out_len = got.len();
        }
        times.sort();
        println!(
            "{:<28} {:>6} {:>9} B {:>11} {:>11} {:>11}   (output {} B)",
            name,
            runs,
            data.len(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap()),
            out_len
        );
    }
    gw.assert_running();
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    let sanitiser_peak = gw
        .stderr()
        .lines()
        .filter_map(|l| l.split("sanitiser peak RSS ").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .max();
    println!(
        "gateway peak RSS:   {} kB",
        hwm.trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches(" kB")
    );
    println!(
        "sanitiser peak RSS: {} kB (largest of all runs)",
        sanitiser_peak.map_or("?".into(), |k| k.to_string())
    );
    let accepted = gw
        .audit_lines()
        .iter()
        .filter(|l| l.contains("result=accepted"))
        .count();
    println!("audit: {accepted} accepted transfers");
}
