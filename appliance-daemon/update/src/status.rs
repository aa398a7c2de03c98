//! `airlock-update status`: the slots as the GPT describes them, which one
//! is booted (by the running `roothash=`), the ESP entries and their boot
//! counting state, the stored security epoch and the last result.

use serde::Serialize;

use anyhow::Result;

use crate::config::Config;
use crate::esp::Esp;
use crate::slots;
use crate::system::{self, LastResult};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub running_version: String,
    pub running_epoch: u32,
    pub stored_epoch: u32,
    pub disk: String,
    pub slots: Vec<SlotReport>,
    pub entries: Vec<EntryReport>,
    pub last: Option<LastResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    pub slot: char,
    /// `<name>_<version>`, or `None` when the slot is `_empty` (or mid-update).
    pub image: Option<String>,
    pub booted: bool,
    pub root_partition: u32,
    pub verity_partition: u32,
    /// Boot counting state of this image's ESP entry, if it has one.
    pub entry: Option<String>,
    pub blessing: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryReport {
    pub file: String,
    pub blessing: String,
}

pub fn report(cfg: &Config) -> Result<Report> {
    let image = system::load_os_release(&cfg.os_release)?;
    let root_hash = system::load_root_hash(&cfg.cmdline)?;
    let state = system::load_state(&cfg.state_file())?;
    let disk = crate::apply::open_disk(cfg, &root_hash)?;
    let all = slots::slots(&disk.table()?)?;
    let esp = Esp::open(&cfg.esp)?;
    let entries = esp.entries()?;
    let slots = all
        .iter()
        .map(|s| {
            let image = s.stem().map(str::to_owned);
            let entry = image
                .as_ref()
                .and_then(|st| entries.iter().find(|e| &e.stem == st));
            SlotReport {
                slot: s.name,
                booted: s.holds(&root_hash),
                root_partition: s.root.number,
                verity_partition: s.verity.number,
                entry: entry.map(|e| e.file.clone()),
                blessing: entry.map(|e| e.blessing().to_string()),
                image,
            }
        })
        .collect();
    Ok(Report {
        running_version: image.version.to_string(),
        running_epoch: image.security_epoch,
        stored_epoch: state.security_epoch,
        disk: disk.path.display().to_string(),
        slots,
        entries: entries
            .iter()
            .map(|e| EntryReport {
                file: e.file.clone(),
                blessing: e.blessing().to_string(),
            })
            .collect(),
        last: state.last,
    })
}

/// The report as text for a person (pure).
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "running {} (security epoch {}, stored {}), disk {}\n",
        r.running_version, r.running_epoch, r.stored_epoch, r.disk
    );
    for s in &r.slots {
        out.push_str(&format!(
            "slot {}: {}{} (partitions {}+{}){}\n",
            s.slot,
            s.image.as_deref().unwrap_or("empty"),
            if s.booted { ", booted" } else { "" },
            s.root_partition,
            s.verity_partition,
            match (&s.entry, &s.blessing) {
                (Some(e), Some(b)) => format!(", entry {e}: {b}"),
                _ => ", no boot entry".into(),
            }
        ));
    }
    for e in &r.entries {
        if !r.slots.iter().any(|s| s.entry.as_deref() == Some(&e.file)) {
            out.push_str(&format!("ESP entry {} (no slot): {}\n", e.file, e.blessing));
        }
    }
    match &r.last {
        Some(l) => out.push_str(&format!("last: {} {}: {}\n", l.action, l.result, l.message)),
        None => out.push_str("last: nothing recorded\n"),
    }
    out
}
