//! `loadgen quickstart`: the README's one command. With the configs of `deploy/quickstart/`
//! (or others given), it makes a private CA and certificates with `core-ingest certs`, starts
//! `core-ingest` and `edge-agent` (listen mode: the devices publish to the agent itself, no
//! broker), runs simulated devices for `--seconds` with a progress bar — CDRs and SenML sensor
//! readings — waits until the core holds everything the agent acknowledged, reads it all back
//! and proves nothing was lost or duplicated, then prints the figures and how to look at the
//! data.
//!
//! Everything lives under the configs' directories (`target/quickstart/` for the shipped ones,
//! wiped first). Ctrl-C stops the processes (killed by PID when dropped).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::agent::http_get;
use crate::bench_report::{BenchReport, Sample, write_report};
use crate::core_ingest::binary;
use crate::devices::{self, MqttArgs};
use crate::process::Proc;
use crate::prom::Exposition;
use crate::trace::Kind;
use crate::verify::{Verdict, Verifier};

/// How long a process gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `loadgen quickstart` options.
#[derive(Clone, Debug, Args)]
pub struct QuickstartArgs {
    /// Seconds the devices publish.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Simulated devices (half send CDRs, half SenML sensor readings).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    pub devices: u32,
    /// Messages per second, all devices together.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub rate: u64,
    /// The core's config.
    #[arg(long, default_value = "deploy/quickstart/core-ingest.toml")]
    pub core_config: PathBuf,
    /// The agent's config (must have a `[listen]` TCP listener).
    #[arg(long, default_value = "deploy/quickstart/edge-agent.toml")]
    pub agent_config: PathBuf,
    /// edge-agent binary (default: beside loadgen).
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// core-ingest binary (default: beside loadgen).
    #[arg(long, value_name = "PATH")]
    pub core_bin: Option<PathBuf>,
    /// Write `quickstart.{json,md,svg}` (rates over time, ack latency, counts) here.
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
}

/// What the quickstart needs to know of the two configs.
#[derive(Debug)]
struct Layout {
    core_data: PathBuf,
    core_admin: SocketAddr,
    certs: PathBuf,
    agent_data: PathBuf,
    agent_admin: SocketAddr,
    listen: SocketAddr,
    edge_id: String,
    /// The local object store directory, if the core tiers to one.
    objects: Option<PathBuf>,
}

fn toml_file(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse::<toml::Table>().with_context(|| format!("{}: not TOML", path.display()))
}

fn get<'a>(t: &'a toml::Table, path: &[&str], file: &Path) -> anyhow::Result<&'a str> {
    let mut v = t.get(path[0]);
    for k in &path[1..] {
        v = v.and_then(|v| v.get(*k));
    }
    v.and_then(|v| v.as_str()).with_context(|| format!("{}: no {}", file.display(), path.join(".")))
}

impl Layout {
    fn read(core: &Path, agent: &Path) -> anyhow::Result<Layout> {
        let (c, a) = (toml_file(core)?, toml_file(agent)?);
        let rel = |cfg: &Path, p: &str| cfg.parent().unwrap_or(Path::new(".")).join(p);
        let addr = |s: &str, what: &str| -> anyhow::Result<SocketAddr> {
            s.parse().with_context(|| format!("{what}: {s:?} is not an address"))
        };
        let ca = rel(core, get(&c, &["tls", "ca_file"], core)?);
        let listen = a
            .get("listen")
            .and_then(|l| l.get("tcp"))
            .and_then(|t| t.as_array())
            .and_then(|t| t.first())
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}: no [listen] tcp listener", agent.display()))?;
        let core_data = rel(core, get(&c, &["data_dir"], core)?);
        // The embedded default object store is DATA_DIR/bucket; a file:// URL names another.
        let objects = match c.get("tier").and_then(|t| t.get("object_store")).and_then(|o| o.as_str()) {
            None => Some(core_data.join("bucket")),
            Some(url) => url.strip_prefix("file://").map(PathBuf::from),
        };
        Ok(Layout {
            core_data,
            core_admin: addr(get(&c, &["admin_listen"], core)?, "admin_listen")?,
            certs: ca.parent().context("the CA file has a directory")?.to_path_buf(),
            agent_data: rel(agent, get(&a, &["data_dir"], agent)?),
            agent_admin: addr(get(&a, &["admin", "listen"], agent)?, "[admin] listen")?,
            listen: addr(listen, "[listen] tcp")?,
            edge_id: get(&a, &["edge_id"], agent)?.to_owned(),
            objects,
        })
    }
}

/// Runs `exe args…`, failing with its stderr.
fn run(exe: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe).args(args).output().with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} {}: {}\n{}", exe.display(), args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_ready(proc: &mut Proc, admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = proc.exited() {
            bail!("exited with {status}\n{}", proc.log_tail(30));
        }
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not ready after {READY_TIMEOUT:?}\n{}", proc.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn core_records(admin: SocketAddr) -> anyhow::Result<u64> {
    let (_, body) = http_get(admin, "/metrics").await?;
    let e = Exposition::parse(&body)?;
    e.value("backhaul_core_records_stored_total", "").map(|v| v as u64).context("no backhaul_core_records_stored_total")
}

fn count_files(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { u64::from(p.extension().is_some_and(|x| x == "seg")) }
        })
        .sum()
}

/// `loadgen quickstart`.
pub async fn run_quickstart(args: QuickstartArgs) -> anyhow::Result<Vec<String>> {
    let agent_exe = binary(&args.agent_bin, "edge-agent", "agent-bin")?;
    let core_exe = binary(&args.core_bin, "core-ingest", "core-bin")?;
    let l = Layout::read(&args.core_config, &args.agent_config)?;
    for d in [&l.core_data, &l.agent_data, &l.certs] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("wiping {}", d.display()))?;
        }
    }
    if let Some(o) = &l.objects {
        let _ = std::fs::remove_dir_all(o);
    }
    let certs = l.certs.to_str().context("a UTF-8 path")?;
    println!("== Backhaul quickstart\n-- certificates ({certs})");
    print!("{}", run(&core_exe, &["certs", "init", "--dir", certs, "--name", "localhost", "--name", "127.0.0.1"])?);
    print!("{}", run(&core_exe, &["certs", "issue", "--dir", certs, "--edge-id", &l.edge_id])?);
    let (core_cfg, agent_cfg) =
        (args.core_config.to_str().context("a UTF-8 path")?, args.agent_config.to_str().context("a UTF-8 path")?);
    run(&core_exe, &["validate", "--config", core_cfg])?;
    run(&agent_exe, &["validate", "--config", agent_cfg])?;
    let logs = l.core_data.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&logs)?;
    let mut c = Command::new(&core_exe);
    c.args(["run", "--config", core_cfg]).env("RUST_LOG", "info");
    let mut core = Proc::spawn("core-ingest", c, &logs.join("core-ingest.log"))?;
    wait_ready(&mut core, l.core_admin).await.context("core-ingest")?;
    let mut a = Command::new(&agent_exe);
    a.args(["run", "--config", agent_cfg]).env("RUST_LOG", "info");
    let mut agent = Proc::spawn("edge-agent", a, &logs.join("edge-agent.log"))?;
    wait_ready(&mut agent, l.agent_admin).await.context("edge-agent")?;
    println!(
        "-- core-ingest  pid {}  QUIC + admin http://{}/metrics  (log {})",
        core.pid(),
        l.core_admin,
        logs.join("core-ingest.log").display()
    );
    println!("-- edge-agent   pid {}  MQTT listener {}  admin http://{}/metrics", agent.pid(), l.listen, l.agent_admin);
    println!(
        "-- {} devices publish for {} s at {} msg/s (CDRs and SenML readings, QoS 1)",
        args.devices, args.seconds, args.rate
    );

    let before = core_records(l.core_admin).await?;
    let half = args.devices / 2;
    let device_args = |kind: Kind, devices: u32, rate: u64, topic: &str, seed: u64| MqttArgs {
        host: l.listen.ip().to_string(),
        port: l.listen.port(),
        devices,
        rate,
        seconds: args.seconds,
        kind,
        payload_bytes: 0,
        topic: topic.into(),
        qos: 1,
        burst: None,
        inflight: 100,
        connect_rate: 500,
        username: None,
        password: None,
        seed,
        client_prefix: format!("quickstart-{topic}").replace(['/', '{', '}'], "-"),
        manifest: None,
    };
    let cdr = devices::start(device_args(Kind::Cdr, half, args.rate / 2, "cdr/site-{site}/probe-{device}", 1));
    let senml = devices::start(device_args(
        Kind::Senml,
        args.devices - half,
        args.rate - args.rate / 2,
        "sensors/site-{site}/dev-{device}",
        2,
    ));
    // Rates over time: acknowledged by the agent, and stored at the core, once a second.
    let (stop_sampling, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let (a, b) = (cdr.live(), senml.live());
        let admin = l.core_admin;
        let t0 = cdr.schedule_start();
        tokio::spawn(async move {
            let mut series = Vec::new();
            let mut last = (0u64, 0u64);
            let mut tick = tokio::time::interval_at((t0 + Duration::from_secs(1)).into(), Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => return series,
                }
                let acked = a.acked() + b.acked();
                let stored = core_records(admin).await.map_or(last.1, |n| n.saturating_sub(before));
                series.push(Sample {
                    t: t0.elapsed().as_secs_f64(),
                    rates: vec![
                        ("acked by the agent".into(), acked.saturating_sub(last.0) as f64),
                        ("stored at the core".into(), stored.saturating_sub(last.1) as f64),
                    ],
                });
                last = (acked, stored);
            }
        })
    };
    let (cdr, senml) = tokio::try_join!(cdr.finish(), senml.finish())?;
    let acked = cdr.acked + senml.acked;

    // The agent forwards over QUIC; wait until the core holds everything acknowledged.
    let deadline = Instant::now() + Duration::from_secs(120);
    let stored = loop {
        let n = core_records(l.core_admin).await? - before;
        if n >= acked || Instant::now() > deadline {
            break n;
        }
        core.exited().map_or(Ok(()), |s| Err(anyhow::anyhow!("core-ingest exited with {s}")))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Closed segments go to the bucket once `tier_after` has passed: give the tierer a moment
    // to take the last ones, so the figures below include them.
    let tier_deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < tier_deadline {
        let (_, body) = http_get(l.core_admin, "/metrics").await?;
        let backlog = Exposition::parse(&body)?.value("backhaul_core_tier_backlog_segments", "");
        if backlog.is_none_or(|b| b == 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = stop_sampling.send(());
    let series = sampler.await.context("the sampler")?;
    let agent_stop = agent.terminate(Duration::from_secs(15))?;
    let core_stop = core.terminate(Duration::from_secs(15))?;

    // Read everything back — local segments and tiered objects alike — and check it record
    // by record.
    let data = l.core_data.to_str().context("a UTF-8 path")?;
    let verdict = |stream: &str, finished: &devices::Finished| -> anyhow::Result<Verdict> {
        let mut v = Verifier::new(&finished.manifest)?;
        let ndjson = run(&core_exe, &["read", "--config", core_cfg, "--stream", stream])?;
        v.read(ndjson.as_bytes())?;
        Ok(v.finish())
    };
    let (vc, vs) = (verdict("cdr", &cdr)?, verdict("sensors", &senml)?);
    let objects = l.objects.as_deref().map(count_files);
    println!("\n| | CDRs | sensor readings |\n|---|---:|---:|");
    for (k, a, b) in [
        ("published and acknowledged by the agent", cdr.acked, senml.acked),
        ("found at the core exactly once", vc.found, vs.found),
        ("lost", vc.lost, vs.lost),
        ("duplicated", vc.duplicated, vs.duplicated),
    ] {
        println!("| {k} | {a} | {b} |");
    }
    println!(
        "| stored at the core (records) | {stored} in all | |\n| objects tiered | {} | |",
        objects.map_or("(no local object store configured)".into(), |n| n.to_string())
    );
    let (lost, dup) = (vc.lost + vs.lost, vc.duplicated + vs.duplicated);
    println!(
        "RESULT acked={acked} stored={stored} found={} lost={lost} duplicated={dup} objects={} agent_exit={} core_exit={}",
        vc.found + vs.found,
        objects.unwrap_or(0),
        agent_stop.code().unwrap_or(-1),
        core_stop.code().unwrap_or(-1)
    );
    println!("\nLook at the data:");
    println!("  core-ingest read --config {core_cfg} --stream cdr --limit 5");
    println!("  core-ingest status --config {core_cfg}");
    println!("  core-ingest log verify --data-dir {data}");
    println!("  edge-agent log dump --data-dir {} --stream sensors --limit 5", l.agent_data.display());
    println!("  (the binaries are in target/release/; the logs beside the data in {})", logs.display());
    let mut failures = Vec::new();
    if lost > 0 || dup > 0 {
        failures.push(format!("{lost} lost, {dup} duplicated"));
    }
    if !agent_stop.success() || !core_stop.success() {
        failures.push(format!("agent exit {agent_stop}, core exit {core_stop}"));
    }
    if let Some(dir) = &args.report_dir {
        let mut r = BenchReport {
            scenario: "quickstart".into(),
            command: format!(
                "loadgen quickstart --seconds {} --devices {} --rate {}",
                args.seconds, args.devices, args.rate
            ),
            series,
            latency_ms: cdr.ack_latency_ms.iter().map(|(k, v)| (format!("CDRs: {k}"), *v)).collect(),
            failures: failures.clone(),
            ..BenchReport::default()
        };
        r.param("devices", args.devices);
        r.param("rate, msg/s", args.rate);
        r.param("seconds", args.seconds);
        r.result("acknowledged by the agent", acked);
        r.result("stored at the core", stored);
        r.result("found exactly once", vc.found + vs.found);
        r.result("lost", lost);
        r.result("duplicated", dup);
        r.result("objects tiered", objects.map_or("-".into(), |n| n.to_string()));
        write_report(dir, "quickstart", &r)?;
    }
    Ok(failures)
}
