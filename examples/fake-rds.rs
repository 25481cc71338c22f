//! Runs the tests' fake RouterOS (ROSE Data Server) SSH server on its own, for trying the driver
//! or a plain `ssh` client against an "RDS" by hand:
//!
//! ```sh
//! cargo run --example fake-rds -- --port 0 --generate-client-key /tmp/fake-rds
//! # prints:  address: 127.0.0.1:PORT
//! #          host key: ssh-ed25519 AAAA...        (also in /tmp/fake-rds/rds_host_key.pub)
//! #          known_hosts: /tmp/fake-rds/known_hosts
//! #          client key: /tmp/fake-rds/id_ed25519
//! ssh -i /tmp/fake-rds/id_ed25519 -o UserKnownHostsFile=/tmp/fake-rds/known_hosts \
//!     -p PORT admin@127.0.0.1 '/disk print detail where mount-point="storage-pool"'
//! ```
//!
//! Flags: `--port N` (0: any free port; default 0), `--authorized-key FILE` (repeatable: an
//! authorized_keys-style file of client public keys), `--generate-client-key DIR` (writes a new
//! ed25519 client key `DIR/id_ed25519` and authorizes it; the host key and known_hosts files go
//! to `DIR` too), `--user NAME` (default `admin`), `--pool-total BYTES`, `--pool-free BYTES`,
//! `--latency-ms N`, `--volume SLOT=BYTES` (repeatable: a Go-driver-style volume to start with),
//! `--verbose` (prints each command and its answer as it is answered).
//! At least one of `--authorized-key` and `--generate-client-key` is required. Serves until
//! Ctrl-C.

#[path = "../tests/support/fake_rds.rs"]
mod fake_rds;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fake_rds::{client_keypair, parse_authorized_keys, Disk, FakeRds, FakeRdsConfig};

struct Args {
    port: u16,
    authorized_keys: Vec<PathBuf>,
    generate_client_key: Option<PathBuf>,
    user: String,
    pool_total: Option<u64>,
    pool_free: Option<u64>,
    latency_ms: u64,
    volumes: Vec<(String, u64)>,
    verbose: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: fake-rds [--port N] (--authorized-key FILE | --generate-client-key DIR)... \
         [--user NAME] [--pool-total BYTES] [--pool-free BYTES] [--latency-ms N] \
         [--volume SLOT=BYTES]... [--verbose]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        port: 0,
        authorized_keys: vec![],
        generate_client_key: None,
        user: "admin".into(),
        pool_total: None,
        pool_free: None,
        latency_ms: 0,
        volumes: vec![],
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage())
        };
        let number = |v: String| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--port" => args.port = value().parse().unwrap_or_else(|_| usage()),
            "--authorized-key" => args.authorized_keys.push(PathBuf::from(value())),
            "--generate-client-key" => args.generate_client_key = Some(PathBuf::from(value())),
            "--user" => args.user = value(),
            "--pool-total" => args.pool_total = Some(number(value())),
            "--pool-free" => args.pool_free = Some(number(value())),
            "--latency-ms" => args.latency_ms = number(value()),
            "--volume" => {
                let v = value();
                let (slot, bytes) = v.split_once('=').unwrap_or_else(|| usage());
                args.volumes
                    .push((slot.to_string(), number(bytes.to_string())));
            }
            "--verbose" => args.verbose = true,
            _ => usage(),
        }
    }
    if args.authorized_keys.is_empty() && args.generate_client_key.is_none() {
        usage();
    }
    args
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = parse_args();
    let mut config = FakeRdsConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], args.port)),
        user: args.user,
        latency: Duration::from_millis(args.latency_ms),
        ..Default::default()
    };
    if let Some(total) = args.pool_total {
        config.pool_total_bytes = total;
        config.pool_free_bytes = config.pool_free_bytes.min(total);
    }
    if let Some(free) = args.pool_free {
        config.pool_free_bytes = free;
    }
    for file in &args.authorized_keys {
        let text = std::fs::read_to_string(file)?;
        let keys = parse_authorized_keys(&text)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", file.display())))?;
        config.authorized_keys.extend(keys);
    }
    let client_key = args.generate_client_key.as_ref().map(|dir| {
        let (path, public) = client_keypair(dir);
        config.authorized_keys.push(public);
        path
    });

    let rds = FakeRds::try_start(config).await?;
    for (slot, bytes) in &args.volumes {
        rds.add_disk(Disk::volume(slot, *bytes))
            .map_err(std::io::Error::other)?;
    }

    let mut out = std::io::stdout().lock();
    writeln!(out, "address: {}", rds.address())?;
    writeln!(out, "host key: {}", rds.host_public_key_openssh())?;
    if let Some(dir) = &args.generate_client_key {
        writeln!(out, "host key file: {}", rds.write_host_key(dir).display())?;
        writeln!(out, "known_hosts: {}", rds.write_known_hosts(dir).display())?;
    } else {
        writeln!(out, "known_hosts line: {}", rds.known_hosts_line())?;
    }
    if let Some(path) = &client_key {
        writeln!(out, "client key: {}", path.display())?;
    }
    out.flush()?;
    drop(out);

    if args.verbose {
        let rds = rds.clone();
        tokio::spawn(async move {
            let mut shown = std::collections::HashSet::new();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for r in rds.commands() {
                    if r.exit_status.is_none() || !shown.insert(r.seq) {
                        continue;
                    }
                    println!(
                        "[conn {} ch {}] {}\n{}(exit {})",
                        r.connection,
                        r.channel,
                        r.command,
                        r.output.as_deref().unwrap_or(""),
                        r.exit_status.unwrap_or_default()
                    );
                }
            }
        });
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
