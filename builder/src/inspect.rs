//! `airlock inspect`: what a disk image is, read from the image itself —
//! the partition table (via `sfdisk --json`) and `/airlock/build.json` on
//! its ESP (via mtools, no mount).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use xshell::cmd;

use crate::build::BuildInfo;
use crate::disk::types;
use crate::exec::Runner;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub image: String,
    pub disk_uuid: String,
    pub partitions: Vec<InspectedPartition>,
    pub build: BuildInfo,
}

#[derive(Debug, Serialize)]
pub struct InspectedPartition {
    pub number: usize,
    pub label: String,
    pub type_uuid: String,
    pub uuid: String,
    pub start_sector: u64,
    pub sectors: u64,
}

pub fn inspect(image: &Path) -> Result<Inspection> {
    let runner = Runner::new(false)?;
    let sh = runner.sh();
    let json = runner.run(
        "reading the partition table",
        cmd!(sh, "sfdisk --json {image}"),
    )?;
    let table: serde_json::Value = serde_json::from_str(&json).context("parsing sfdisk --json")?;
    let table = &table["partitiontable"];
    let mut partitions = Vec::new();
    for (i, p) in table["partitions"]
        .as_array()
        .context("no partitions in table")?
        .iter()
        .enumerate()
    {
        partitions.push(InspectedPartition {
            number: i + 1,
            label: p["name"].as_str().unwrap_or("").to_string(),
            type_uuid: p["type"].as_str().unwrap_or("").to_lowercase(),
            uuid: p["uuid"].as_str().unwrap_or("").to_lowercase(),
            start_sector: p["start"].as_u64().unwrap_or(0),
            sectors: p["size"].as_u64().unwrap_or(0),
        });
    }
    let esp = partitions
        .iter()
        .find(|p| p.type_uuid == types::ESP)
        .with_context(|| {
            format!(
                "{} has no EFI system partition; not an airlock image",
                image.display()
            )
        })?;
    let esp_spec = format!("{}@@{}", image.display(), esp.start_sector * 512);
    let _env = sh.push_env("MTOOLS_SKIP_CHECK", "1");
    let info = runner
        .run(
            "reading /airlock/build.json from the ESP",
            cmd!(sh, "mtype -i {esp_spec} ::/airlock/build.json"),
        )
        .with_context(|| {
            format!(
                "{} has no airlock build information on its ESP",
                image.display()
            )
        })?;
    let build: BuildInfo = serde_json::from_str(&info).context("parsing /airlock/build.json")?;
    Ok(Inspection {
        image: image.display().to_string(),
        disk_uuid: table["id"].as_str().unwrap_or("").to_lowercase(),
        partitions,
        build,
    })
}

pub fn print_human(i: &Inspection) {
    let b = &i.build;
    println!("image        {}", i.image);
    println!("name         {} {}", b.name, b.version);
    println!("distro       {} {}", b.distro, b.distro_release);
    println!("profile      {:?}", b.profile);
    println!("packages     {}", b.package_count);
    println!("root hash    {}", b.root_hash);
    println!("cmdline      {}", b.kernel_cmdline);
    println!("disk uuid    {}", i.disk_uuid);
    println!("partitions");
    for p in &i.partitions {
        println!(
            "  {:>2} {:<24} {:>8} MiB  type {}  uuid {}",
            p.number,
            p.label,
            p.sectors * 512 / 1024 / 1024,
            p.type_uuid,
            p.uuid
        );
    }
}
